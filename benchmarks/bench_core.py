#!/usr/bin/env python
"""Benchmark of the QSM core on the simulated head: wall time, peak memory and accuracy per stage.

    python benchmarks/bench_core.py                 # full size (1 mm, ~197x233x189, 6 echoes) and 2 mm
    python benchmarks/bench_core.py --sizes 2 --tilt 20

Targets on 2 CPU cores (issue 2): ROMEO unwrapping + B0 fit of all echoes <= 15 s, V-SHARP <= 10 s,
RTS <= 20 s, peak memory <= 6 GB. Times are warm (numba kernels compiled once beforehand; the compile
time is printed separately). Peak memory is the process's peak resident set size during the stage.
Accuracy is measured against the simulator's ground truth in the mask each method returns.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import measure, rss_bytes  # noqa: E402

from qsmprep.qsm import metrics  # noqa: E402
from qsmprep.qsm.masking import phase_quality_mask  # noqa: E402
from qsmprep.qsm.multiecho import fit_b0_hz, fit_r2star, mcpc3ds  # noqa: E402
from qsmprep.qsm.registry import BGREMOVE, INVERSION  # noqa: E402
from qsmprep.qsm.unwrap import laplacian_unwrap, romeo_unwrap_multiecho  # noqa: E402
from qsmprep.simulate import make_head_phantom, simulate_gre  # noqa: E402

TWO_PI = 2 * np.pi
DGM_LABELS = (1, 2, 3, 4, 5, 6, 7)


def warm_up() -> float:
    """Compile the numba kernels on a tiny case; return the seconds it took."""
    t0 = time.perf_counter()
    ph = make_head_phantom(downsample=4, seed=0)
    sim = simulate_gre(ph, snr=50, seed=0)
    corrected, _ = mcpc3ds(sim.phase_rad, sim.magnitude, sim.echo_times_s, sim.voxel_size_mm, mask=sim.brain_mask)
    romeo_unwrap_multiecho(corrected, sim.echo_times_s, sim.magnitude, mask=sim.brain_mask)
    phase_quality_mask(sim.phase_rad, sim.magnitude, sim.echo_times_s)
    local, m = BGREMOVE.get("vsharp")(sim.total_field_ppm, sim.brain_mask, sim.voxel_size_mm, sim.b0_dir)
    for name in INVERSION.names():
        INVERSION.get(name)(local, m, sim.voxel_size_mm, sim.b0_dir, **({"maxit": 2} if name in ("rts", "tv") else {}))
    return time.perf_counter() - t0


def congruence(unwrapped, sim, offset) -> float:
    """Smallest fraction (%) over echoes of brain voxels with the modal 2*pi wrap count against truth."""
    te = np.asarray(sim.echo_times_s, np.float32)
    offset_error = np.angle(np.exp(1j * (offset - sim.phase_offset_rad)))
    target = TWO_PI * sim.field_hz[..., None] * te - offset_error[..., None]
    worst = 100.0
    for e in range(unwrapped.shape[-1]):
        k = np.round((unwrapped[..., e] - target[..., e])[sim.brain_mask] / TWO_PI).astype(np.int64)
        worst = min(worst, 100.0 * np.bincount(k - k.min()).max() / k.size)
    return worst


def bench_one(downsample: int, tilt_deg: float, rows: list) -> None:
    ph = make_head_phantom(downsample=downsample, seed=0)
    with measure() as m_sim:
        sim = simulate_gre(ph, snr=50, seed=1, tilt_deg=tilt_deg)
    grid = "x".join(map(str, sim.chi_ppm.shape)) + f" @ {sim.voxel_size_mm[0]:g} mm, {len(sim.echo_times_s)} echoes"
    brain = sim.brain_mask
    vs, b = sim.voxel_size_mm, sim.b0_dir

    def row(stage, meas, accuracy):
        rows.append((grid, stage, meas.seconds, meas.peak_gb, accuracy))

    row("simulate (phantom -> GRE)", m_sim, "")

    with measure() as m:
        mask = phase_quality_mask(sim.phase_rad, sim.magnitude, sim.echo_times_s)
    dice = 2 * np.count_nonzero(mask & brain) / (mask.sum() + brain.sum())
    row("mask: phase quality (QSMxT 2-pass)", m, f"Dice {dice:.3f} vs true brain")

    with measure() as m:
        corrected, offset = mcpc3ds(sim.phase_rad, sim.magnitude, sim.echo_times_s, vs, mask=brain)
    err = np.abs(np.angle(np.exp(1j * (offset - sim.phase_offset_rad))))[brain]
    row("MCPC-3D-S phase offsets", m, f"median |phi0 error| {np.median(err):.3f} rad")

    with measure() as m:
        unwrapped = romeo_unwrap_multiecho(corrected, sim.echo_times_s, sim.magnitude, mask=brain)
        b0_hz = fit_b0_hz(unwrapped, sim.echo_times_s, sim.magnitude, mask=brain)
    b0_err = b0_hz[brain] - sim.field_hz[brain]
    b0_err -= np.round(np.median(b0_err) * sim.echo_times_s[0]) / sim.echo_times_s[0]
    row(
        "ROMEO unwrap (all echoes) + B0 fit",
        m,
        f"congruent {congruence(unwrapped, sim, offset):.2f} % (worst echo); B0 median |err| {np.median(np.abs(b0_err)):.2f} Hz",
    )

    with measure() as m:
        lap = np.stack([laplacian_unwrap(corrected[..., e], vs, mask=brain) for e in range(corrected.shape[-1])], -1)
    row("Laplacian unwrap (all echoes)", m, "not 2pi-congruent by design")
    del lap

    with measure() as m:
        r2s, _ = fit_r2star(sim.magnitude, sim.echo_times_s, mask=brain)
    wm = sim.labels == 8
    r2_err = np.median(np.abs(r2s[wm & brain] - sim.r2star_hz[wm & brain]))
    row("R2* log-linear fit", m, f"WM median |err| {r2_err:.2f} 1/s")

    local_fields = {}
    for name in BGREMOVE.names():
        with measure() as m:
            local, mask_out = BGREMOVE.get(name)(sim.total_field_ppm, brain, vs, b)
        local_fields[name] = (local, mask_out)
        err = metrics.nrmse(local, sim.local_field_ppm, mask_out)
        row(f"BFR {name}", m, f"NRMSE {err:.1f} % (mask kept {100 * mask_out.sum() / brain.sum():.0f} %)")

    rng = np.random.default_rng(7)
    noise = rng.normal(0, 2e-3, sim.local_field_ppm.shape).astype(np.float32)
    local_vsharp, mask_vsharp = local_fields["vsharp"]
    for name in INVERSION.names():
        invert = INVERSION.get(name)
        with measure() as m:
            chi = invert(sim.local_field_ppm + noise * brain, brain, vs, b)
        true_local = (
            f"true local: NRMSE {metrics.nrmse(chi, sim.chi_ppm, brain):.1f} %, "
            f"HFEN {metrics.hfen(chi, sim.chi_ppm, brain):.1f} %, XSIM {metrics.xsim(chi, sim.chi_ppm, brain):.3f}"
        )
        chi_chain = invert(local_vsharp, mask_vsharp, vs, b)
        slope = metrics.dgm_slope(chi_chain, sim.chi_ppm, mask_vsharp, sim.labels, DGM_LABELS)
        chain = f"after V-SHARP: NRMSE {metrics.nrmse(chi_chain, sim.chi_ppm, mask_vsharp):.1f} %, DGM slope {slope:.2f}"
        row(f"inversion {name}", m, f"{true_local}; {chain}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="downsampling factors (1 = full size)")
    parser.add_argument("--tilt", type=float, default=0.0, help="oblique tilt in degrees")
    args = parser.parse_args(argv)

    compile_s = warm_up()
    rows: list = []
    for ds in args.sizes:
        bench_one(ds, args.tilt, rows)

    print(f"# qsmprep core benchmark ({platform.machine()}, {os.cpu_count()} CPUs, tilt {args.tilt:g} deg)")
    print(f"numba compile + warm-up: {compile_s:.1f} s; process peak RSS {rss_bytes() / 1e9:.2f} GB now\n")
    print("| grid | stage | wall s | peak GB | accuracy vs truth |")
    print("|---|---|---:|---:|---|")
    for grid, stage, sec, gb, acc in rows:
        print(f"| {grid} | {stage} | {sec:.2f} | {gb:.2f} | {acc} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
