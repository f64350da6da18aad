"""``qsmprep-simulate``: write a simulated multi-echo GRE BIDS dataset with ground truth."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Sequence

from qsmprep.simulate.signal import DEFAULT_ECHO_TIMES_S
from qsmprep.utils.errors import EX_NOINPUT, EX_USAGE


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def _snr(text: str) -> float | None:
    if text.lower() in ("inf", "none"):
        return None
    return _positive_float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsmprep-simulate",
        description="Simulate multi-echo GRE (MEGRE) data of a numerical head phantom and write it as a raw "
        "BIDS dataset, with the ground truth (susceptibility, fields, labels) in derivatives/qsmprep-simulate.",
    )
    p.add_argument("out_dir", help="output BIDS directory (must be empty or absent)")
    p.add_argument(
        "--subjects",
        nargs="+",
        default=["1"],
        help="subject labels (e.g. 01 02), or a single count N: labels 1..N (default: 1)",
    )
    p.add_argument("--sessions", nargs="+", default=None, help="session labels (default: no session level)")
    p.add_argument("--acq", default=None, help="acq-<label> entity for the MEGRE files")
    p.add_argument("--phantom", choices=("head", "shapes"), default="head")
    p.add_argument(
        "--anatomy",
        choices=("mni", "zubal"),
        default="mni",
        help="head anatomy: MNI152 2009 templates (default) or the Zubal segmented head (data not shipped: "
        "--zubal-dir or $QSMPREP_ZUBAL_DIR)",
    )
    p.add_argument("--zubal-dir", default=None, help="folder of zubal_labels_1mm.nii.gz and zubal_brainmask_1mm.nii.gz")
    p.add_argument(
        "--texture",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="smooth chi/R2*/M0 variation within tissue classes (default: on for zubal, off for mni)",
    )
    p.add_argument("--field-strength", type=_positive_float, default=3.0, help="B0 in tesla (default 3)")
    p.add_argument(
        "--echo-times",
        nargs="+",
        type=_positive_float,
        default=None,
        help="echo times in s, or in ms if any value > 1 (default 4 8 12 16 20 24 ms)",
    )
    p.add_argument("--snr", type=_snr, default=50.0, help="echo-1 brain SNR; 'inf' for no noise (default 50)")
    p.add_argument("--tilt-deg", type=float, default=0.0, help="head tilt relative to B0 (oblique acquisition)")
    p.add_argument("--tilt-axis", nargs=3, type=float, default=(1.0, 0.0, 0.0), metavar=("X", "Y", "Z"))
    res = p.add_mutually_exclusive_group()
    res.add_argument("--downsample", type=int, default=None, help="integer block-averaging factor (1 mm base grid)")
    res.add_argument("--voxel-size", type=float, default=None, help="isotropic voxel size in mm (integer: 1, 2, 3)")
    p.add_argument("--small", action="store_true", help="2 mm head grid (or 64^3 shapes): runs in seconds")
    p.add_argument("--lesions", action="store_true", help="add graded calcifications/haemorrhages (-1.4..1.4 ppm)")
    p.add_argument("--shim-order", type=int, choices=(0, 1, 2), default=2, help="harmonic shim removed (default 2)")
    p.add_argument("--no-phase-offset", action="store_true", help="no echo-independent phase offset")
    p.add_argument("--phase-units", choices=("rad", "arbitrary"), default="rad")
    p.add_argument("--no-derivatives", action="store_true", help="do not write the ground truth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier qsmprep-simulate dataset")
    return p


def _subjects(values: Sequence[str]) -> list[str]:
    if len(values) == 1 and values[0].isdigit() and not values[0].startswith("0") and int(values[0]) > 1:
        return [str(i) for i in range(1, int(values[0]) + 1)]
    return list(values)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qsmprep-simulate``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from qsmprep.simulate.bids import write_bids_dataset

    te = list(args.echo_times) if args.echo_times else list(DEFAULT_ECHO_TIMES_S)
    if any(t > 1.0 for t in te):
        te = [t / 1000.0 for t in te]
    if args.voxel_size is not None:
        if abs(args.voxel_size - round(args.voxel_size)) > 1e-6 or round(args.voxel_size) < 1:
            print("qsmprep-simulate: error: --voxel-size must be an integer number of mm (1, 2, 3)", file=sys.stderr)
            return EX_USAGE
        downsample = int(round(args.voxel_size))
    else:
        downsample = args.downsample
    phantom = args.phantom
    if phantom == "head":
        pk = {"downsample": downsample or (2 if args.small else 1), "lesions": args.lesions}
        if args.texture is not None:
            pk["texture"] = args.texture
        if args.anatomy == "zubal":
            phantom = "zubal"
            pk["data_dir"] = args.zubal_dir
    elif args.anatomy != "mni" or args.texture is not None:
        print("qsmprep-simulate: error: --anatomy and --texture apply to --phantom head", file=sys.stderr)
        return EX_USAGE
    else:
        n = 64 if args.small or downsample is None else max(16, 128 // downsample)
        v = float(downsample or 1)
        pk = {"shape": (n, n, n), "voxel_size_mm": (v, v, v)}
    sk = {
        "echo_times_s": te,
        "b0_tesla": args.field_strength,
        "tilt_deg": args.tilt_deg,
        "tilt_axis": tuple(args.tilt_axis),
        "snr": args.snr,
        "phase_offset": not args.no_phase_offset,
        "shim_order": args.shim_order,
    }
    t0 = time.perf_counter()
    try:
        files = write_bids_dataset(
            args.out_dir,
            subjects=_subjects(args.subjects),
            sessions=args.sessions,
            phase_units=args.phase_units,
            acq=args.acq,
            seed=args.seed,
            phantom=phantom,
            phantom_kwargs=pk,
            simulate_kwargs=sk,
            derivatives=not args.no_derivatives,
            overwrite=args.overwrite,
        )
    except FileNotFoundError as exc:
        print(f"qsmprep-simulate: error: {exc}", file=sys.stderr)
        return EX_NOINPUT
    except (ValueError, FileExistsError) as exc:
        print(f"qsmprep-simulate: error: {exc}", file=sys.stderr)
        return EX_USAGE
    dt = time.perf_counter() - t0
    snr = "inf" if args.snr is None or math.isinf(args.snr) else f"{args.snr:g}"
    print(
        f"qsmprep-simulate: wrote {len(files)} files to {args.out_dir} in {dt:.1f} s "
        f"({phantom}, {len(te)} echoes, {args.field_strength:g} T, SNR {snr})"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
