#!/usr/bin/env python
"""Accuracy of every shipped chain on more than one head anatomy, full chain from the BIDS inputs.

    python benchmarks/bench_anatomies.py                                  # 2 mm, quick set
    python benchmarks/bench_anatomies.py --downsample 1 --fields 3 7 --tilts 0 20 --lesions 0 1 \
        --out benchmarks/results/bench_anatomies_1mm.md

For each row (anatomy x field strength x orientation x lesions) the simulator writes a raw BIDS
dataset (seeded; 3 T: 6 echoes 4-24 ms; 7 T: 4 echoes 3-12 ms; SNR 50), then the BIDS App runs once per
chain (``python -m qsmprep.cli.run BIDS OUT participant``) with one shared work directory, so the
stages the chains share (mask, phase offset, unwrapping, B0 fit) are computed once and reused from
Nipype's cache, exactly as a user re-running with other ``--bgremove/--inversion`` options would.
Metrics against the simulator's truth, **in the true brain mask** (zeros of an eroded output mask count
as errors, as in the QSM-CI scorer), both maps demeaned over that mask:

- NRMSE, HFEN (%), XSIM; DGM NRMSE: NRMSE inside the union of the deep grey-matter nuclei;
- per-nucleus mean bias (ppm): (mean estimate - mean truth) over each nucleus, after demeaning;
- Dice against the true brain mask of the output brain mask (after background removal's erosion) and of
  the masking step's mask (where the total field map is defined), and that mask's voxels outside it.

Anatomies: ``qsmforward`` (the simple cylinder phantom of the independent simulator qsm-forward, its
own BIDS writer; one row per ``--fields`` x ``--tilts``, its B0 and B0 direction, no lesions), ``mni`` (the
MNI152-based head the networks were trained on), ``zubal`` (the Zubal head, never seen in training; needs
the data of ``$QSMPREP_ZUBAL_DIR`` or ``../shared/data/zubal``, not shipped; no red nucleus, SN or dentate)
and ``zubal-deformed`` (a third head: the Zubal head with those three nuclei grafted in from the MNI head by
a landmark similarity, then seeded atrophy, anisotropic head scaling and a smooth random deformation at
1 mm, :func:`qsmprep.simulate.deform.make_deformed_zubal_phantom`; never seen in training; needs the Zubal
data too). Rows whose anatomy is missing are skipped with a line saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmprep.qsm import metrics
from qsmprep.simulate import simulate_gre, write_bids_dataset

ROOT = Path(__file__).resolve().parents[1]

#: chain name -> (bgremove, inversion)
CHAINS = {
    "default": (None, None),
    "vsharp+rts": ("vsharp", "rts"),
    "nextqsm+nextqsm": ("nextqsm", "nextqsm"),
    "pdf+rts": ("pdf", "rts"),
    "pdf+tv": ("pdf", "tv"),
    "pdf+medi-tv": ("pdf", "medi-tv"),
    "pdf+nextqsm": ("pdf", "nextqsm"),
    "vsharp+tv": ("vsharp", "tv"),
    "vsharp+nextqsm": ("vsharp", "nextqsm"),
    "vsharp+deepqsm": ("vsharp", "deepqsm"),
}
NUCLEI = {1: "caudate", 2: "pallidum", 3: "putamen", 4: "red nucleus", 5: "dentate", 6: "SN", 7: "thalamus"}
ECHOES = {3.0: (0.004, 0.008, 0.012, 0.016, 0.020, 0.024), 7.0: (0.003, 0.006, 0.009, 0.012)}


def zubal_dir() -> Path | None:
    d = Path(os.environ.get("QSMPREP_ZUBAL_DIR") or ROOT.parent / "shared" / "data" / "zubal")
    return d if (d / "zubal_labels_1mm.nii.gz").exists() else None


def require_zubal_dir() -> Path:
    """:func:`zubal_dir`, or LookupError (the row is skipped with that line) when the data are absent."""
    d = zubal_dir()
    if d is None:
        raise LookupError("Zubal data not found (set QSMPREP_ZUBAL_DIR)")
    return d


def make_phantom(anatomy: str, downsample: int, lesions: bool, seed: int, texture: bool = True):
    """The head of ``anatomy`` with texture inside tissue classes (the networks were trained without)."""
    from qsmprep.simulate import phantom as ph

    if anatomy == "mni":
        return ph.make_head_phantom(downsample=downsample, lesions=lesions, seed=seed, texture=texture)
    if anatomy == "zubal":
        return ph.make_zubal_phantom(require_zubal_dir(), downsample=downsample, lesions=lesions, seed=seed,
                                     texture=texture)
    if anatomy == "zubal-deformed":
        from qsmprep.simulate.deform import make_deformed_zubal_phantom

        return make_deformed_zubal_phantom(require_zubal_dir(), seed=seed, downsample=downsample, lesions=lesions,
                                           texture=texture)
    raise LookupError(f"unknown anatomy {anatomy!r}")


def cases(args):
    """(anatomy, B0, tilt, lesions, write(bids_dir) -> (chi truth, brain mask, labels)) for every row."""
    for anatomy in args.anatomies:
        rows = ([tuple(float(v) for v in r.split(":")) for r in args.rows] if args.rows else
                [(b0, tilt, lesions) for lesions in args.lesions for b0 in args.fields for tilt in args.tilts])
        if anatomy == "qsmforward":  # no lesions: one row per field x tilt
            for b0, tilt in dict.fromkeys((b0, tilt) for b0, tilt, _ in rows):
                yield anatomy, b0, tilt, None, lambda bids, b0=b0, tilt=tilt: write_qsm_forward(bids, b0, tilt)
            continue
        for b0, tilt, lesions in rows:
            lesions = int(lesions)

            def write(bids, anatomy=anatomy, lesions=lesions, b0=b0, tilt=tilt):
                phantom = make_phantom(anatomy, args.downsample, bool(lesions), args.seed, args.texture)
                sim = simulate_gre(phantom, echo_times_s=ECHOES[b0], b0_tesla=b0, tilt_deg=tilt, snr=50.0,
                                   seed=args.seed)
                write_bids_dataset(bids, {"1": sim}, subjects=["1"], derivatives=False)
                return sim.chi_ppm, sim.brain_mask, sim.labels
            yield anatomy, b0, tilt, lesions, write


def write_qsm_forward(bids: Path, b0: float = 7.0, tilt: float = 0.0):
    """The simple phantom of the independent simulator qsm-forward (its example: 100^3 at 1 mm, cylinders
    of 0.05-0.5 ppm in 0.005 ppm, 4 echoes 4-28 ms, peak SNR 100), as its own BIDS dataset, at ``b0`` tesla
    (its ``ReconParams.B0``, written as ``MagneticFieldStrength``) with B0 tilted by ``tilt`` degrees about
    the first array axis (``B0_dir`` = (0, sin, cos) in array axes; qsm-forward rotates the NIfTI affine so
    that B0 is the scanner z axis, which is where qsmprep reads it from)."""
    import qsm_forward

    recon = qsm_forward.ReconParams()
    recon.subject, recon.peak_snr, recon.random_seed = "1", 100, 0
    recon.B0 = float(b0)
    t = np.radians(tilt)
    recon.B0_dir = np.array([0.0, np.sin(t), np.cos(t)])
    tissue = qsm_forward.TissueParams(chi=qsm_forward.generate_susceptibility_phantom(
        resolution=[100, 100, 100], background=0, large_cylinder_val=0.005,
        small_cylinder_radii=[4, 4, 4, 7], small_cylinder_vals=[0.05, 0.1, 0.2, 0.5]))
    cwd = os.getcwd()
    try:  # qsm-forward prints its progress; keep the table clean
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            qsm_forward.generate_bids(tissue, recon, str(bids))
    finally:
        os.chdir(cwd)
    d = bids / "derivatives" / "qsm-forward" / "sub-1" / "anat"
    chi = np.asarray(nib.load(d / "sub-1_Chimap.nii").dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(d / "sub-1_mask.nii").dataobj) > 0
    seg = np.asarray(nib.load(d / "sub-1_dseg.nii").dataobj).astype(np.int16)
    shutil.rmtree(bids / "derivatives")  # the App must not see the truth
    return chi, mask, np.where(seg > 0, seg + 100, 0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / max(1, int(a.sum()) + int(b.sum()))


def score(chi: np.ndarray, out_mask: np.ndarray, step_mask: np.ndarray, truth, brain, labels) -> dict:
    brain = brain.astype(bool)
    x = np.where(brain, chi, 0.0) - chi[brain].mean()
    t = np.where(brain, truth, 0.0) - truth[brain].mean()
    dgm = np.isin(labels, list(NUCLEI)) & brain
    row = {
        "NRMSE": metrics.nrmse(x, t, brain),
        "HFEN": metrics.hfen(x, t, brain),
        "XSIM": metrics.xsim(x, t, brain),
        "DGM NRMSE": metrics.nrmse(x, t, dgm) if dgm.sum() > 10 else float("nan"),
        "Dice": dice(out_mask, brain),
        "step Dice": dice(step_mask, brain),
        "mask outside": int(np.count_nonzero(step_mask & ~brain)),
    }
    for lab, name in NUCLEI.items():
        m = (labels == lab) & brain
        row[name] = float(x[m].mean() - t[m].mean()) if m.sum() >= 5 else float("nan")
    return row


def run_chain(bids: Path, out: Path, work: Path, chain: str, nprocs: int, masking: str | None = None):
    """Run the BIDS App with a chain; the Chimap, the output brain mask, the masking step's mask (where
    the total field map is defined) and the wall time."""
    bg, inv = CHAINS[chain]
    cmd = [sys.executable, "-m", "qsmprep.cli.run", str(bids), str(out), "participant", "-w", str(work),
           "--nprocs", str(nprocs), "--skip-bids-validation"]
    if bg:
        cmd += ["--bgremove", bg, "--inversion", inv]
    if masking:
        cmd += ["--masking", masking]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{chain}: qsmprep exited {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")
    chi_path = next(out.rglob("*_Chimap.nii.gz"))
    mask_path = next(out.rglob("*_desc-brain_mask.nii.gz"))
    total_path = next(out.rglob("*_desc-total_fieldmap.nii.gz"))
    return (np.asarray(nib.load(chi_path).dataobj, dtype=np.float32),
            np.asarray(nib.load(mask_path).dataobj) > 0, np.asarray(nib.load(total_path).dataobj) != 0, wall)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--anatomies", nargs="+", default=["mni", "zubal"])
    p.add_argument("--downsample", type=int, default=2)
    p.add_argument("--fields", nargs="+", type=float, default=[3.0])
    p.add_argument("--tilts", nargs="+", type=float, default=[0.0])
    p.add_argument("--lesions", nargs="+", type=int, default=[0])
    p.add_argument("--rows", nargs="+", metavar="B0:TILT:LESIONS",
                   help="explicit rows instead of the product of --fields/--tilts/--lesions, e.g. 3:0:0 7:20:1")
    p.add_argument("--chains", nargs="+", default=list(CHAINS), choices=list(CHAINS))
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--masking", help="--masking of every chain (default: the App's default)")
    p.add_argument("--texture", action=argparse.BooleanOptionalAction, default=True,
                   help="smooth chi/R2* texture inside tissue classes (default on)")
    p.add_argument("--seed", type=int, default=301, help="phantom/noise seed (training used seed 0)")
    p.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = p.parse_args(argv)

    lines = [f"# bench_anatomies: {args.downsample} mm, seed {args.seed}, masking {args.masking or 'default'}, "
             f"texture {'on' if args.texture else 'off'}, chains {', '.join(args.chains)}", ""]
    head = ["anatomy", "B0", "tilt", "lesions", "chain", "NRMSE %", "HFEN %", "XSIM", "DGM NRMSE %",
            "Dice output mask", "Dice masking step", "masking-step voxels outside brain", *NUCLEI.values(), "wall s"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print("\n".join(lines + table), flush=True)
    for anatomy, b0, tilt, lesions, write in cases(args):
        with tempfile.TemporaryDirectory(prefix="bench_anat_") as tmp:
            tmp = Path(tmp)
            try:
                truth = write(tmp / "bids")
            except LookupError as exc:
                print(f"<!-- {anatomy}: skipped: {exc} -->", flush=True)
                lines.append(f"{anatomy}: skipped: {exc}")
                continue
            for chain in args.chains:
                chi, out_mask, step_mask, wall = run_chain(tmp / "bids", tmp / f"out-{chain}", tmp / "work",
                                                           chain, args.nprocs, args.masking)
                r = score(chi, out_mask, step_mask, *truth)
                cells = [anatomy, f"{b0:g} T", f"{tilt:g}", "n/a" if lesions is None else "yes" if lesions else "no", chain,
                         f"{r['NRMSE']:.1f}", f"{r['HFEN']:.1f}", f"{r['XSIM']:.3f}",
                         f"{r['DGM NRMSE']:.1f}", f"{r['Dice']:.3f}", f"{r['step Dice']:.3f}",
                         str(r["mask outside"]), *(f"{r[n]:+.3f}" for n in NUCLEI.values()), f"{wall:.0f}"]
                row = "| " + " | ".join(cells) + " |"
                table.append(row)
                print(row, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines + [""] + table) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
