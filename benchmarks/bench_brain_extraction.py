#!/usr/bin/env python
"""Brain masks against the true brain mask of simulated heads: Dice, leakage outside the brain, time.

    python benchmarks/bench_brain_extraction.py                       # 2 mm, MNI and Zubal heads, all cases
    python benchmarks/bench_brain_extraction.py --downsample 1 --anatomy mni --field 3 --tilt 0 --lesions no
    python benchmarks/bench_brain_extraction.py --out benchmarks/results/brain_extraction.md

Cases: anatomy (MNI head phantom: ``make_head_phantom``; Zubal head: ``make_zubal_phantom``, data from
``--zubal-dir``, ``$QSMPREP_ZUBAL_DIR`` or ``../shared/data/zubal``, skipped when absent) x field (3 T: 6
echoes 4-24 ms; 7 T: 4 echoes 4-16 ms) x orientation (axial, oblique 22 deg) x lesions, SNR 50; plus
``--bias`` rows with a smooth multiplicative receive-bias field on the magnitude (0.2-1.35 over the FOV,
darker left/right: a 7 T-like B1 pattern) that the simulator does not model.
Methods: the masking registry entries ``phase`` (QSMxT phase quality, the current default), ``bet`` and
``bet-phase``, all with their defaults. Reference: the phantom's ``brain_mask`` (the intracranial space:
brain, CSF, dural sinuses; for Zubal its own brain mask, which also holds the spinal canal).
Columns: Dice; "outside" = mask voxels outside the true brain (scalp, skull, neck, eyes) in % of the true
brain's voxels; "missed" = true brain voxels left out, same unit; time of the masking call (wall, s; the
phase-quality map's numba kernels are compiled beforehand).

``--chain`` adds a second table: each mask through MCPC-3D-S, ROMEO, the B0 fit, V-SHARP and RTS (the
classical chain of bench_pipeline.py), with the share of the true brain in V-SHARP's output mask, the
voxels outside the true brain there, and the Chimap NRMSE (%) in that mask (mean-referenced).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qsmprep.methods import STAGES  # noqa: E402
from qsmprep.simulate import make_head_phantom, simulate_gre  # noqa: E402

METHODS = ("phase", "bet", "bet-phase")
FIELDS = {3.0: (0.004, 0.008, 0.012, 0.016, 0.020, 0.024), 7.0: (0.004, 0.008, 0.012, 0.016)}


def zubal_dir(arg: str | None) -> Path | None:
    for cand in (arg, os.environ.get("QSMPREP_ZUBAL_DIR"),
                 Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zubal"):
        if cand and (Path(cand) / "zubal_labels_1mm.nii.gz").is_file():
            return Path(cand)
    return None


def bias_field(shape) -> np.ndarray:
    """Smooth receive bias: 1 - 0.45 x^2 + 0.2 y - 0.15 z on [-1, 1]^3 (FOV-normalised), float32."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij", sparse=True)
    return (1.0 - 0.45 * x**2 + 0.2 * y - 0.15 * z).astype(np.float32)


def dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def chain_nrmse(sim, mask) -> tuple[float, int, float]:
    """Brain share (%) and voxels outside the brain of V-SHARP's mask, Chimap NRMSE (%) of V-SHARP + RTS."""
    from qsmprep.qsm import metrics
    from qsmprep.qsm.constants import hz_to_ppm
    from qsmprep.qsm.multiecho import fit_b0_hz, mcpc3ds
    from qsmprep.qsm.reference import reference_mean
    from qsmprep.qsm.unwrap import romeo_unwrap_multiecho

    te, vs, b = sim.echo_times_s, sim.voxel_size_mm, sim.b0_dir
    corrected, _ = mcpc3ds(sim.phase_rad, sim.magnitude, te, vs, mask=mask)
    unwrapped = romeo_unwrap_multiecho(corrected, te, sim.magnitude, mask=mask)
    total = hz_to_ppm(fit_b0_hz(unwrapped, te, sim.magnitude, mask=mask), sim.b0_tesla) * mask
    local, m = STAGES["bgremove"].get("vsharp")(total, mask, vs, b)
    chi = reference_mean(STAGES["inversion"].get("rts")(local, m, vs, b), m)
    truth = sim.brain_mask
    return (100.0 * np.count_nonzero(m & truth) / np.count_nonzero(truth), int(np.count_nonzero(m & ~truth)),
            float(metrics.nrmse(chi, sim.chi_ppm, m)))


def run_case(sim, bias: bool, chain: bool = False) -> list[dict]:
    mag = sim.magnitude * bias_field(sim.magnitude.shape[:3])[..., None] if bias else sim.magnitude
    truth = sim.brain_mask
    n = np.count_nonzero(truth)
    rows = []
    for name in METHODS:
        func = STAGES["masking"].get(name)
        t0 = time.perf_counter()
        m = func(sim.phase_rad, mag, sim.echo_times_s, sim.voxel_size_mm)
        dt = time.perf_counter() - t0
        m = np.asarray(m[0] if isinstance(m, tuple) else m, bool)
        rows.append(dict(method=name, dice=dice(m, truth), outside=100.0 * np.count_nonzero(m & ~truth) / n,
                         missed=100.0 * np.count_nonzero(truth & ~m) / n, seconds=dt))
        if chain and not bias:
            rows[-1]["chain"] = chain_nrmse(sim, m)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--downsample", type=int, default=2, help="phantom voxel size (mm): 1 or 2")
    ap.add_argument("--anatomy", choices=("mni", "zubal", "both"), default="both")
    ap.add_argument("--field", type=float, choices=(3.0, 7.0), nargs="*", default=[3.0, 7.0])
    ap.add_argument("--tilt", type=float, nargs="*", default=[0.0, 22.0])
    ap.add_argument("--lesions", choices=("no", "yes", "both"), default="both")
    ap.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True,
                    help="add rows with a receive-bias field (7 T, axial, no lesions)")
    ap.add_argument("--chain", action="store_true", help="also run V-SHARP + RTS in each mask (slower)")
    ap.add_argument("--zubal-dir", default=None)
    ap.add_argument("--out", default=None, help="write the markdown table to this file")
    args = ap.parse_args(argv)

    from qsmprep.qsm.masking import phase_quality_mask

    tiny = simulate_gre(make_head_phantom(downsample=4, seed=0), echo_times_s=(0.004, 0.008), snr=50, seed=0)
    phase_quality_mask(tiny.phase_rad, tiny.magnitude, tiny.echo_times_s)  # compile numba kernels

    anatomies = ["mni", "zubal"] if args.anatomy == "both" else [args.anatomy]
    lesions = {"no": [False], "yes": [True], "both": [False, True]}[args.lesions]
    zdir = zubal_dir(args.zubal_dir)
    lines = ["| anatomy | field | orientation | lesions | bias | method | Dice | outside (%) | missed (%) | time (s) |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|"]
    chain_lines = ["| anatomy | field | orientation | lesions | method | brain in final mask (%) | voxels outside | "
                   "Chimap NRMSE (%) |", "|---|---|---|---|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for anatomy, les in itertools.product(anatomies, lesions):
        if anatomy == "zubal":
            if zdir is None:
                print("| zubal | skipped: data absent (--zubal-dir or $QSMPREP_ZUBAL_DIR) |", flush=True)
                continue
            from qsmprep.simulate import make_zubal_phantom

            ph = make_zubal_phantom(zdir, downsample=args.downsample, lesions=les, seed=0)
        else:
            ph = make_head_phantom(downsample=args.downsample, lesions=les, seed=0)
        cases = [(b0, tilt, False) for b0, tilt in itertools.product(args.field, args.tilt)]
        if args.bias and not les and 7.0 in args.field:
            cases.append((7.0, 0.0, True))
        for b0, tilt, bias in cases:
            sim = simulate_gre(ph, echo_times_s=FIELDS[b0], b0_tesla=b0, tilt_deg=tilt, snr=50, seed=1)
            for r in run_case(sim, bias, args.chain):
                case = (f"| {anatomy.upper() if anatomy == 'mni' else 'Zubal'} | {b0:g} T | "
                        f"{'axial' if tilt == 0 else f'oblique {tilt:g} deg'} | {'yes' if les else 'no'} | ")
                line = (f"{case}{'yes' if bias else 'no'} | {r['method']} | {r['dice']:.3f} | {r['outside']:.1f} | "
                        f"{r['missed']:.1f} | {r['seconds']:.1f} |")
                lines.append(line)
                print(line, flush=True)
                if "chain" in r:
                    share, outside, err = r["chain"]
                    chain_lines.append(f"{case}{r['method']} | {share:.1f} | {outside} | {err:.1f} |")
    if len(chain_lines) > 2:
        print("\n" + "\n".join(chain_lines), flush=True)
        lines += ["", "Full chain (MCPC-3D-S, ROMEO, B0 fit, V-SHARP, RTS) in each mask:", ""] + chain_lines
    if args.out:
        head = (f"# Brain masks vs the true brain mask, {args.downsample} mm (benchmarks/bench_brain_extraction.py)\n\n"
                f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} ({os.cpu_count()} CPUs, shared: "
                "wall times are inflated by other jobs). SNR 50; 3 T: 6 echoes 4-24 ms, 7 T: 4 echoes 4-16 ms. "
                "outside/missed in % of the true brain's voxels.\n\n")
        Path(args.out).write_text(head + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
