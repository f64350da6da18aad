"""``qsmprep-demo DIR``: simulate a small BIDS dataset and run qsmprep on it.

Writes ``DIR/bids`` (a simulated multi-echo GRE head at 2 mm, with the ground truth in
``DIR/bids/derivatives/qsmprep-simulate``), runs the participant level into
``DIR/derivatives/qsmprep`` with the work directory ``DIR/work``, and prints where the outputs are.
Options that ``qsmprep-demo`` does not know are passed on to ``qsmprep`` (e.g. ``--inversion tkd``).
A second call reuses the simulated dataset and the work directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from qsmprep.utils.errors import EX_USAGE

__all__ = ["main"]


def _is_simulated(bids: Path) -> bool:
    try:
        desc = json.loads((bids / "dataset_description.json").read_text())
    except (OSError, ValueError):
        return False
    return any(
        isinstance(g, dict) and g.get("Name") == "qsmprep-simulate" for g in desc.get("GeneratedBy", []) or []
    )


def build_parser() -> argparse.ArgumentParser:
    from qsmprep.cli.parser import QsmprepArgumentParser

    p = QsmprepArgumentParser(
        prog="qsmprep-demo",
        description="Simulate a small multi-echo GRE BIDS dataset in DIR/bids and run qsmprep on it "
        "(outputs in DIR/derivatives/qsmprep). Other options are passed on to qsmprep.",
        allow_abbrev=False,
    )
    p.add_argument("dir", type=Path, help="demo folder (created; reused on a second call)")
    p.add_argument(
        "--phantom",
        choices=("head", "shapes"),
        default="head",
        help="simulated object: 2 mm head phantom or a 64^3 shapes phantom (default: head)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation (default: 0)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qsmprep-demo``; returns qsmprep's exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(None if argv is None else [str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else EX_USAGE
    root = args.dir.expanduser().absolute()
    bids = root / "bids"
    out = root / "derivatives" / "qsmprep"
    work = root / "work"
    if root.exists() and not root.is_dir():
        print(f"qsmprep-demo: error: {root}: exists and is not a directory. Choose another DIR.", file=sys.stderr)
        return EX_USAGE
    if bids.exists() and any(bids.iterdir()):
        if not _is_simulated(bids):
            print(
                f"qsmprep-demo: error: {bids}: exists and was not written by qsmprep-simulate. "
                "Choose an empty or new DIR.",
                file=sys.stderr,
            )
            return EX_USAGE
        print(f"qsmprep-demo: reusing the simulated dataset in {bids}")
    else:
        from qsmprep.simulate import write_bids_dataset

        t0 = time.perf_counter()
        if args.phantom == "head":
            pk = {"downsample": 2}
        else:
            pk = {"shape": (64, 64, 64), "voxel_size_mm": (1.0, 1.0, 1.0)}
        print(f"qsmprep-demo: simulating a {args.phantom} phantom into {bids} ...", flush=True)
        write_bids_dataset(bids, phantom=args.phantom, phantom_kwargs=pk, seed=args.seed, subjects=("1",))
        print(f"qsmprep-demo: simulated in {time.perf_counter() - t0:.1f} s")

    from qsmprep.cli.run import main as qsmprep_main

    qsmprep_argv = [str(bids), str(out), "participant", "-w", str(work), *extra]
    print("qsmprep-demo: running qsmprep " + " ".join(qsmprep_argv), flush=True)
    t0 = time.perf_counter()
    rc = qsmprep_main(qsmprep_argv)
    if rc != 0:
        print(f"qsmprep-demo: qsmprep exited with status {rc}", file=sys.stderr)
        return rc
    files = sorted(p for p in out.rglob("*") if p.is_file()) if out.exists() else []
    print(f"qsmprep-demo: qsmprep finished in {time.perf_counter() - t0:.0f} s")
    print(f"  outputs ({len(files)} files): {out}")
    for p in [p for p in files if p.name.endswith((".nii.gz", ".html"))][:12]:
        print(f"    {p.relative_to(out)}")
    print(f"  ground truth:  {bids / 'derivatives' / 'qsmprep-simulate'}")
    print(f"  work folder:   {work} (delete it when done)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
