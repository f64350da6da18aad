#!/usr/bin/env python
"""VarNet model files against each other and against RTS / TV, from the true local field of held-out heads.

    python benchmarks/bench_varnet_v2.py                                   # shipped VarNet, RTS, TV
    python benchmarks/bench_varnet_v2.py --varnet nextqsm-varnet nextqsm-varnet-v2=/path/to/models

Decides whether a retrained VarNet (e.g. ``[nextqsm-varnet-v2]`` of configs/nextqsm.toml) replaces the shipped
one behind ``--inversion nextqsm``: it must beat the shipped VarNet and RTS on NRMSE and HFEN on the held-out
Zubal cases (isotropic and anisotropic) without worsening the deep grey-matter bias. Inputs: the simulator's
local field (sources inside the brain only, noise-free), the true brain mask, axial B0 at 3 T, texture on.
Cases: the Zubal head (never used in training; ``$QSMPREP_ZUBAL_DIR`` or ``../shared/data/zubal``) at 1 mm,
0.75 x 0.75 x 1.5 mm and 1 x 1 x 2 mm (simulated on that grid); the MNI-based head with held-out seed 150 at
1 mm (training uses phantom seeds 0..9); the deformed Zubal head (``zubal-deformed`` of bench_anatomies.py, all
seven nuclei) at 1 mm. ``--classical`` takes any registered inversion, learned ones included (e.g. ``deepqsm``). ``--varnet NAME[=MODEL_DIR]`` (repeatable): model files to compare
(default directory: the package's). Metrics as ``bench_anatomies.py`` (true brain mask, both maps demeaned).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_anatomies import NUCLEI, make_phantom, require_zubal_dir, score  # noqa: E402

#: case -> (anatomy, voxel size mm, phantom seed)
CASES = {
    "zubal-1mm": ("zubal", (1.0, 1.0, 1.0), 301),
    "zubal-0.75x0.75x1.5": ("zubal", (0.75, 0.75, 1.5), 301),
    "zubal-1x1x2": ("zubal", (1.0, 1.0, 2.0), 301),
    "mni-150": ("mni", (1.0, 1.0, 1.0), 150),
    "zubal-deformed-1mm": ("zubal-deformed", (1.0, 1.0, 1.0), 301),
}


def case_field(case: str):
    """(local field ppm, brain mask, voxel size, b0_dir, chi truth, labels) of a case."""
    from qsmprep.simulate import phantom as ph
    from qsmprep.simulate import simulate_gre

    anatomy, vs, seed = CASES[case]
    if anatomy == "zubal":
        p = ph.make_zubal_phantom(require_zubal_dir(), seed=seed, texture=True, voxel_size_mm=vs)
    else:  # the MNI head, or the deformed Zubal head (a third anatomy, needs the Zubal data too)
        p = make_phantom(anatomy, 1, False, seed, True)
    sim = simulate_gre(p, b0_tesla=3.0, tilt_deg=0.0, snr=None, seed=seed)
    brain = sim.brain_mask.astype(bool)
    field = np.where(brain, sim.local_field_ppm, np.float32(0.0)).astype(np.float32)
    return field, brain, tuple(sim.voxel_size_mm), tuple(sim.b0_dir), sim.chi_ppm, sim.labels


def methods(varnets: list[str], classical: list[str]):
    from qsmprep.methods import STAGES
    from qsmprep.nn.inference import nextqsm_inversion

    out = {}
    for spec in varnets:
        name, _, directory = spec.partition("=")
        out[f"VarNet {name}"] = (lambda f, m, vs, b, name=name, d=directory or None:
                                 nextqsm_inversion(f, m, vs, b, device="cpu", model=name, model_dir=d))
    for name in classical:
        fun = STAGES["inversion"].method(name).function
        out[name.upper() if len(name) <= 3 else name] = (lambda f, m, vs, b, fun=fun:
                                                          fun(f, m, voxel_size_mm=vs, b0_dir=b))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--varnet", nargs="+", default=["nextqsm-varnet"], metavar="NAME[=MODEL_DIR]")
    p.add_argument("--classical", nargs="*", default=["rts", "tv"],
                   help="other registered inversions to run (default rts tv; any name of --inversion, e.g. deepqsm tkd)")
    p.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    head = ["case", "method", "NRMSE %", "HFEN %", "DGM NRMSE %", *NUCLEI.values(), "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print("\n".join(lines), flush=True)
    runs = methods(args.varnet, args.classical)
    for case in args.cases:
        try:
            f, m, vs, b, truth, labels = case_field(case)
        except LookupError as exc:
            print(f"<!-- {case}: skipped: {exc} -->", flush=True)
            continue
        for label, fun in runs.items():
            t0 = time.perf_counter()
            chi = np.asarray(fun(f, m, vs, b), dtype=np.float32)
            wall = time.perf_counter() - t0
            r = score(chi, m, m, truth, m, labels)
            cells = [case, label, f"{r['NRMSE']:.1f}", f"{r['HFEN']:.1f}", f"{r['DGM NRMSE']:.1f}",
                     *(f"{r[n]:+.3f}" if np.isfinite(r[n]) else "-" for n in NUCLEI.values()), f"{wall:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
