"""``qsmprep-train``: train (and optionally export) a neural QSM network from a TOML config.

Exit codes: 0 success, 64 bad usage (arguments, config file), 1 training failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from qsmprep.utils.errors import EX_FAILURE, EX_USAGE


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 64 (EX_USAGE) instead of argparse's 2
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qsmprep-train",
        description="Train a neural QSM network (DeepQSM, NeXtQSM background U-Net or VarNet) on simulated data.",
    )
    p.add_argument("config", metavar="CONFIG", help="TOML config (e.g. qsmprep/training/configs/deepqsm.toml)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="run directory: checkpoint.pt and loss.tsv")
    p.add_argument("--section", help="config section (network) when the file holds several, e.g. nextqsm-bg")
    p.add_argument("--steps", type=int, help="total number of steps (overrides the config)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop at step N (the learning-rate schedule still spans --steps); reproduces a timed-out run")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget for this invocation (checkpoints on stop)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (overrides num_threads)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that make the training data ahead (needs data_rng = \"per-step\" in the config; "
                        "the data do not depend on it); default 0: in the training process")
    p.add_argument("--seed", type=int, help="override the config seed")
    p.add_argument("--export", metavar="NAME", help="after training, write NAME.pt + NAME.json to --export-dir")
    p.add_argument("--export-dir", metavar="DIR", help="model directory for --export (default: the package model dir)")
    p.add_argument("--export-only", action="store_true", help="do not train; export the checkpoint in OUT_DIR")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT_DIR has a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    from qsmprep.training.train import ConfigError, TrainConfig, export, train

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.steps is not None and args.steps < 1:
            raise _UsageError(f"--steps must be >= 1, got {args.steps}")
        if args.threads is not None and args.threads < 1:
            raise _UsageError(f"--threads must be >= 1, got {args.threads}")
        if args.workers < 0:
            raise _UsageError(f"--workers must be >= 0, got {args.workers}")
        if args.stop_after is not None and args.stop_after < 1:
            raise _UsageError(f"--stop-after must be >= 1, got {args.stop_after}")
        if args.max_minutes is not None and not args.max_minutes > 0:
            raise _UsageError(f"--max-minutes must be positive, got {args.max_minutes}")
        if args.export_dir and not args.export:
            raise _UsageError("--export-dir needs --export NAME")
        if args.export_only and not args.export:
            raise _UsageError("--export-only needs --export NAME")
        cfg = TrainConfig.from_toml(args.config, section=args.section, steps=args.steps,
                                    num_threads=args.threads, seed=args.seed)
        if args.workers and cfg.data_rng != "per-step" and not args.export_only:
            raise _UsageError(f"--workers needs data_rng = \"per-step\" in the config section; [{cfg.name}] has "
                              f"{cfg.data_rng!r}")
    except (_UsageError, ConfigError) as exc:
        print(f"qsmprep-train: error: {exc}", file=sys.stderr)
        return EX_USAGE
    try:
        if not args.export_only:
            summary = train(cfg, args.out_dir, resume=not args.no_resume, device=args.device,
                            max_minutes=args.max_minutes, progress=not args.quiet, stop_after=args.stop_after,
                            workers=args.workers)
            print(json.dumps(summary, indent=2))
        if args.export:
            card = export(args.out_dir, args.export, args.export_dir)
            print(f"exported {card['name']} ({card['sha256'][:12]}...) to {args.export_dir or 'the model directory'}")
    except ConfigError as exc:
        print(f"qsmprep-train: error: {exc}", file=sys.stderr)
        return EX_USAGE
    except (FileNotFoundError, FloatingPointError) as exc:
        print(f"qsmprep-train: error: {exc}", file=sys.stderr)
        return EX_FAILURE
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
