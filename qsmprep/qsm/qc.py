"""Quality-control metrics of one QSM run, and the ranges that flag implausible values.

:func:`qc_metrics` summarises the run's intermediate and final maps in a flat dict of numbers and
strings (the ``<prefix>_desc-qc_metrics.json`` derivative); :func:`flag_metrics` compares them with
:data:`EXPECTED_RANGES` and explains the values outside. The metrics:

- ``mask_volume_ml``: volume of the final (Chimap) mask;
- ``low_quality_fraction``: fraction of the unwrapping-mask voxels whose ROMEO voxel quality of echo 1
  (Dymerska B et al., MRM 2021;85:2294; phase coherence, phase-gradient coherence with echo 2,
  phase linearity, magnitude coherence) is below ``quality_threshold``;
- ``b0_fit_residual_rad``: median over the unwrapping mask of the magnitude^2-weighted RMS misfit
  ``phi_e - 2 pi f TE_e`` of the unwrapped, offset-corrected echoes against the fitted field map ``f``
  (a wrong echo time, a phase-offset or unwrapping error raise it); ``b0_fit_relative_residual`` the
  same misfit energy relative to the phase energy over the whole mask (scale-free);
- ``echo_time_error``: ``max_e |TE_eff_e / TE_e - 1|`` with the effective echo times
  (:func:`effective_echo_times`, also written as ``echo_times_effective_ms``): the echo time that best
  explains each echo's phase with the fitted field (>= 3 echoes); insensitive to noise, it singles out
  a wrong EchoTime;
- ``r2star_median_hz`` / ``r2star_per_tesla``: median R2* in the mask (log-linear fit of the magnitude)
  and that value divided by B0: R2* grows about linearly with B0 (about 4-9 /s/T in adult brain), and
  echo times that are all too long by a factor scale it down by that factor (the phase cannot show it);
- ``residual_background_fraction``: energy of the least-squares fit of solid spherical harmonics of
  degree 1..``harmonic_order`` (default 3) to the local field in the mask, relative to the (demeaned)
  local-field energy (background field left by background removal is harmonic; SEPIA's
  ``refine_order``). Degree 3 because scanners (and the simulator) shim degrees 1-2 away in the brain;
- ``data_consistency_residual``: ``||M (D chi + c M' - f)|| / ||M f||`` with the dipole forward model
  ``D`` (voxel size, B0 direction), ``c`` the best constant offset of chi (referencing does not
  change the value);
- ``chi_mean_ppm``, ``chi_median_ppm``, ``chi_std_ppm``, ``chi_p1_ppm``, ``chi_p99_ppm`` in the mask
  and ``chi_tail_asymmetry = (p99.5 + p0.5 - 2 p50) / (p99.5 - p0.5)``: veins and iron-rich nuclei are
  paramagnetic, so the positive tail of brain susceptibility dominates (> 0); a flipped phase sign
  (or B0 direction) mirrors the distribution and makes it negative;
- ``obliquity_deg``, ``b0_direction`` ("x, y, z" in the voxel frame), ``n_echoes``, ``echo_times_ms``
  ("4, 8, ..."), ``field_strength_t``, and passthrough strings (methods, model name and checksum).

Pure numpy/scipy: arrays in, numbers out (no file I/O).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numba
import numpy as np

from qsmprep.qsm import fft as _fft
from qsmprep.qsm.arrays import (
    as_b0_dir,
    as_echo_times,
    as_float_volume,
    as_mask,
    as_voxel_size,
    same_shape,
)
from qsmprep.qsm.fft import PaddedBox
from qsmprep.qsm.geometry import dipole_kernel, obliquity_deg

__all__ = [
    "EXPECTED_RANGES",
    "QC_METRICS",
    "field_qc_metrics",
    "RECORDED_VALUES",
    "QcMetric",
    "is_recorded_value",
    "format_range",
    "metrics_markdown",
    "qc_metrics",
    "flag_metrics",
    "solid_harmonics",
    "residual_background_fraction",
    "data_consistency_residual",
    "b0_fit_residual",
    "effective_echo_times",
    "chi_summary",
]

TWO_PI = 2.0 * np.pi

#: ``metric -> (low, high, reason)``: values outside ``[low, high]`` are flagged by :func:`flag_metrics`
#: (None: no bound on that side). Calibrated on the simulated head phantom (``make_head_phantom(
#: downsample=2)``, 2 mm; ``simulate_gre`` with TE 4/8/12/16 ms at 3 T; default pipeline MCPC-3D-S,
#: phase-quality mask, ROMEO, V-SHARP, RTS, mean referencing). Measured (good runs: SNR 20-100, seeds
#: 0-3, straight and 15 deg oblique, with and without lesions; in brackets the full-size 1 mm head with
#: 6 echoes 4-24 ms | broken runs):
#:
#: ==============================  =================  ===========================================
#: metric                          good               broken
#: ==============================  =================  ===========================================
#: mask_volume_ml                  1363-1393 (1722)   624 (mask eroded 16 mm), 781 (12 mm)
#: echo_time_error                 0.0002-0.0051      0.196-0.198 (TE3 12->16 ms), 0.124 (TE4 16->20),
#:                                                    0.180 (TE2 8->10)
#: r2star_per_tesla                5.28-5.47 /s/T     2.64-2.71 (all TEs x2), 3.70-3.80 (TE3 wrong)
#: chi_tail_asymmetry              +0.28..+0.33 (0.44) -0.28..-0.33 (phase sign flipped)
#: residual_background_fraction    0.017-0.037        0.44-0.47 (no background removal)
#: b0_fit_relative_residual        0.0002-0.0034      0.011-0.015 (one TE wrong)
#: b0_fit_residual_rad             0.010-0.045        0.037-0.062 (one TE wrong; mostly noise: SNR)
#: low_quality_fraction            0.022-0.035
#: data_consistency_residual       0.44-0.56          0.70-0.75 (no background removal)
#: (1 mm head: echo_time_error 0.0006, 5.31 /s/T, b0 residual 0.022 rad / 0.00026, low quality 0.011, consistency 0.44)
#: chi_std_ppm                     0.021-0.035        0.010-0.013 (all TEs x2), 0.13-0.14 (no BFR)
#: ==============================  =================  ===========================================
#:
#: All TEs x2 leaves the phase linear in TE (only the field scale changes), so only R2* per tesla shows
#: it; two-echo data fit any echo times exactly after MCPC-3D-S (no ``echo_time_error``).
_FLAG_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    # adult intracranial volume is about 1100-1800 mL (the mask holds brain and CSF); partial-coverage
    # (slab) acquisitions and children are flagged too
    "mask_volume_ml": (
        800.0, 2500.0,
        "the brain mask is much smaller (or larger) than an adult brain: check the masking (over-erosion, a "
        "threshold too high) or the field of view (partial coverage)",
    ),
    "echo_time_error": (
        None, 0.03,
        "the echoes' phase does not grow in proportion to their echo times (see echo_times_effective_ms): a "
        "wrong EchoTime in a sidecar (one echo off), odd/even echo phase errors (bipolar readout), or a phase "
        "offset left by MCPC-3D-S that is large against the phase of the field (all effective echo times "
        "shifted by about the same amount)",
    ),
    "b0_fit_relative_residual": (
        None, 0.05,
        "the echoes' phase is far from linear in the echo times: unwrapping errors, a wrong EchoTime or "
        "phase-offset errors",
    ),
    "b0_fit_residual_rad": (
        None, 0.3,
        "large phase misfit of the B0 fit in most of the brain: very noisy phase, unwrapping or echo-time errors",
    ),
    "r2star_per_tesla": (
        3.5, 12.0,
        "the median R2* per tesla is outside the range of brain tissue (about 4-9 /s/T): echo times all "
        "scaled by a factor (the field and susceptibility are then scaled by its inverse) or a wrong "
        "MagneticFieldStrength",
    ),
    "low_quality_fraction": (
        None, 0.25,
        "many voxels of the unwrapping mask have low ROMEO phase quality: noisy or corrupted phase, or a mask "
        "that includes non-brain tissue",
    ),
    "residual_background_fraction": (
        None, 0.2,
        "a large smooth (harmonic) component is left in the local field: background field removal was "
        "incomplete",
    ),
    "data_consistency_residual": (
        None, 0.8,
        "the susceptibility map explains little of the local field: inversion failed, or the local field "
        "holds much that no susceptibility inside the mask can produce",
    ),
    "chi_tail_asymmetry": (
        0.0, None,
        "the negative tail of the susceptibility distribution dominates, while veins and iron-rich nuclei are "
        "paramagnetic: the phase sign (or the B0 direction) is probably flipped",
    ),
    "chi_std_ppm": (
        0.005, 0.2,
        "implausible spread of brain susceptibility: a field scaled wrongly (echo times, field strength), "
        "incomplete background field removal or strong artefacts",
    ),
    "obliquity_deg": (
        None, 40.0,
        "strongly oblique acquisition: check that the B0 direction (NIfTI affine or B0_dir) is right",
    ),
}


@dataclass(frozen=True)
class QcMetric:
    """A QC metric: its ``units``, what it ``means``, its expected range ``[low, high]`` (None: no bound on
    that side) and, when ``flags``, the ``reason`` printed when a value is outside (the series is then
    flagged); otherwise the range is the typical one and a value outside it is only marked."""

    units: str
    means: str
    low: float | None
    high: float | None
    flags: bool
    reason: str


def _flagged(units: str, means: str, name: str) -> QcMetric:
    lo, hi, reason = _FLAG_RANGES[name]
    return QcMetric(units, means, lo, hi, True, reason)


#: Every number :func:`qc_metrics` writes (other than the :data:`RECORDED_VALUES`): meaning, expected
#: range and what to do outside it. The one source of the ranges of the report, the flags
#: (:data:`EXPECTED_RANGES`) and docs/qc.md (:func:`metrics_markdown`).
QC_METRICS: dict[str, QcMetric] = {
    "mask_volume_ml": _flagged("mL", "volume of the final brain mask (the region of the local field and the Chimap)",
                               "mask_volume_ml"),
    "obliquity_deg": _flagged("deg", "angle between B0 and the nearest voxel axis (from the NIfTI affine or B0_dir)",
                              "obliquity_deg"),
    "low_quality_fraction": _flagged(
        "fraction", "fraction of the unwrapping-mask voxels whose ROMEO phase quality (echo 1) is below the "
        "quality threshold", "low_quality_fraction"),
    "b0_fit_residual_rad": _flagged(
        "rad", "median over the brain of the magnitude-weighted RMS misfit between the unwrapped echoes and the "
        "fitted field map", "b0_fit_residual_rad"),
    "b0_fit_relative_residual": _flagged(
        "fraction", "misfit energy of the B0 fit relative to the phase energy (scale-free)", "b0_fit_relative_residual"),
    "echo_time_error": _flagged(
        "fraction", "largest relative difference between an echo's effective echo time (the one that explains its "
        "phase with the fitted field) and its EchoTime (>= 3 echoes)", "echo_time_error"),
    "r2star_median_hz": QcMetric(
        "1/s", "median R2* in the brain mask (log-linear fit of the magnitude decay); grows with B0 (about 15-30 /s "
        "at 3 T)", 5.0, 80.0, False,
        "outside the R2* of brain tissue from 1.5 to 7 T: see r2star_per_tesla, which accounts for the field "
        "strength"),
    "r2star_per_tesla": _flagged("1/s/T", "median R2* divided by the field strength", "r2star_per_tesla"),
    "residual_background_fraction": _flagged(
        "fraction", "share of the local-field energy explained by smooth (degree 1-3 solid harmonic) fields, i.e. "
        "background field left after background removal", "residual_background_fraction"),
    "data_consistency_residual": _flagged(
        "fraction", "how much of the local field the dipole field of the Chimap leaves unexplained "
        "(||D chi + c - f|| / ||f|| in the mask)", "data_consistency_residual"),
    "chi_mean_ppm": QcMetric(
        "ppm", "mean susceptibility in the brain mask relative to the reference region (left out with the "
        "whole-brain mean reference, where it is 0 by construction)", -0.05, 0.05, False,
        "the brain's mean susceptibility is far from the reference region's: check the reference region (CSF "
        "mask in the report) and the background field removal"),
    "chi_median_ppm": QcMetric(
        "ppm", "median susceptibility in the brain mask", -0.05, 0.05, False,
        "the bulk of the brain is offset from the reference: check the reference region"),
    "chi_std_ppm": _flagged("ppm", "standard deviation of the susceptibility in the brain mask", "chi_std_ppm"),
    "chi_p1_ppm": QcMetric(
        "ppm", "1st percentile of the susceptibility in the brain mask (diamagnetic white matter, calcifications)",
        -0.3, 0.0, False,
        "an extreme negative tail: streaking artefacts, a flipped phase sign or residual background field"),
    "chi_p99_ppm": QcMetric(
        "ppm", "99th percentile of the susceptibility in the brain mask (iron-rich nuclei, veins)", 0.0, 0.5, False,
        "an extreme positive tail: streaking artefacts around veins or haemorrhage, or a field scaled wrongly"),
    "chi_tail_asymmetry": _flagged(
        "", "(p99.5 + p0.5 - 2 p50) / (p99.5 - p0.5) of the susceptibility: > 0 when the paramagnetic tail "
        "(veins, iron) dominates, as in brain", "chi_tail_asymmetry"),
}
assert set(_FLAG_RANGES) <= set(QC_METRICS)

#: ``metric -> (low, high, reason)``: values outside ``[low, high]`` are flagged by :func:`flag_metrics`
#: (None: no bound on that side); the flagging entries of :data:`QC_METRICS`.
EXPECTED_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    name: (m.low, m.high, m.reason) for name, m in QC_METRICS.items() if m.flags
}

#: Values of the QC file that describe the series and its processing rather than measure its quality
#: (shown apart in the report; ``*_method`` stands for every stage's method name)
RECORDED_VALUES: dict[str, str] = {
    "series": "the series (BIDS prefix)",
    "qsmprep_version": "the qsmprep version that wrote the file",
    "field_strength_t": "MagneticFieldStrength (T)",
    "n_echoes": "number of echoes",
    "echo_times_ms": "the echo times (ms) from the sidecars",
    "echo_times_effective_ms": "the effective echo time (ms) of each echo: see echo_time_error",
    "b0_direction": "the unit B0 direction (x, y, z) in the voxel frame",
    "*_method": "the method of each processing stage (masking, unwrapping, bgremove, inversion, reference, ...)",
    "model_name": "the network of a learned inversion",
    "model_checksum": "the sha256 of that network's weights",
}


def is_recorded_value(name: str) -> bool:
    """Whether ``name`` is one of the :data:`RECORDED_VALUES` (not a quality metric)."""
    return name in RECORDED_VALUES or name.endswith("_method")


def format_range(name: str) -> str:
    """The expected range of a metric as text: ``"800 to 2500"``, ``"<= 0.03"``, ``">= 0"``."""
    m = QC_METRICS[name]
    if m.low is None:
        return f"<= {m.high:g}"
    if m.high is None:
        return f">= {m.low:g}"
    return f"{m.low:g} to {m.high:g}"


def metrics_markdown() -> str:
    """One section per metric of :data:`QC_METRICS` and the table of :data:`RECORDED_VALUES` (the
    generated part of docs/qc.md; a test keeps them equal). Each metric's heading is its name, so that
    ``qc.md#<metric>`` links to it."""
    out = []
    for name, m in QC_METRICS.items():
        units = f" {m.units}" if m.units and m.units != "fraction" else (" (fraction)" if m.units else "")
        kind = "outside it the series is **flagged**" if m.flags else "typical range: a value outside is marked, not flagged"
        out.append(f"### {name}\n\n{m.means[0].upper()}{m.means[1:]}.\n\n"
                   f"Expected: **{format_range(name)}**{units} ({kind}).\n\nWhen outside: {m.reason}.\n")
    out.append("## Recorded values\n\nThe QC file also records what was processed and how (not quality metrics):\n")
    out.append("| value | meaning |\n|---|---|\n" + "".join(f"| `{k}` | {v} |\n" for k, v in RECORDED_VALUES.items()))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------


def solid_harmonics(coords_mm: Sequence[np.ndarray], order: int = 3) -> list[np.ndarray]:
    """Real solid spherical harmonics of degree 1..``order`` (<= 3) of the coordinates (unnormalised).

    Each term is a harmonic polynomial (zero Laplacian): degree 1: x, y, z; degree 2: xy, xz, yz,
    x^2 - y^2, 2z^2 - x^2 - y^2; degree 3: the seven cubic ones. The constant is left out.
    """
    if int(order) not in (1, 2, 3):
        raise ValueError(f"harmonic order must be 1, 2 or 3, got {order}")
    x, y, z = (np.asarray(c, dtype=np.float64) for c in coords_mm)
    terms = [x, y, z]
    if order >= 2:
        terms += [x * y, x * z, y * z, x * x - y * y, 2 * z * z - x * x - y * y]
    if order >= 3:
        r2xy = x * x + y * y
        terms += [x * (x * x - 3 * y * y), y * (3 * x * x - y * y), z * (x * x - y * y), x * y * z,
                  x * (4 * z * z - r2xy), y * (4 * z * z - r2xy), z * (2 * z * z - 3 * r2xy)]
    return terms


def residual_background_fraction(local_field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0), order: int = 3) -> float:
    """Fraction of the demeaned local-field energy in the mask explained by solid harmonics of
    degree 1..``order`` (a least-squares fit; coordinates centred on the mask and scaled by its extent).

    0 for a field without low-order harmonic part; 1 for a purely harmonic (background) field.
    """
    f = as_float_volume(local_field_ppm, "local_field_ppm")
    m = as_mask(mask, "mask", shape=f.shape)
    vs = as_voxel_size(voxel_size_mm)
    flat = np.flatnonzero(m)
    b = f.ravel(order="C")[flat].astype(np.float64)
    b -= b.mean()
    energy = float(b @ b)
    if energy == 0.0:
        return 0.0
    pos = [i * v for i, v in zip(np.unravel_index(flat, m.shape), vs)]  # mm, float64
    centre = [p.mean() for p in pos]
    scale = max(float(np.max(np.abs(p - c))) for p, c in zip(pos, centre)) or 1.0
    # Least squares by the normal equations, accumulated over chunks of voxels (k x k, k <= 16; the
    # columns are a constant and harmonics of coordinates scaled to [-1, 1], well conditioned). With
    # the constant column the fit equals that of demeaned harmonics (b is demeaned); the explained
    # energy |A c|^2 = c . A^T b.
    k = len(solid_harmonics([np.zeros(1)] * 3, order)) + 1
    gram = np.zeros((k, k))
    atb = np.zeros(k)
    step = 1 << 18
    for lo in range(0, flat.size, step):
        sl = slice(lo, lo + step)
        coords = [(p[sl] - c) / scale for p, c in zip(pos, centre)]
        a = np.vstack([np.ones_like(coords[0])] + solid_harmonics(coords, order))
        gram += a @ a.T
        atb += a @ b[sl]
    coef, *_ = np.linalg.lstsq(gram, atb, rcond=None)
    return float(coef @ atb) / energy


def data_consistency_residual(
    chi_ppm, local_field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), pad_voxels: int = 16
) -> float:
    """``min_c ||M (D(chi + c M) - f)|| / ||M f||``: how well the dipole field of chi (ppm) explains the
    local field f (ppm) inside the mask M. ``c`` (a constant offset of chi in the mask) is fitted, so
    referencing does not change the value. Computed on the mask's bounding box zero-padded by
    ``pad_voxels`` per side.
    """
    chi = as_float_volume(chi_ppm, "chi_ppm")
    f = as_float_volume(local_field_ppm, "local_field_ppm")
    same_shape(chi, f, "chi_ppm", "local_field_ppm")
    m = as_mask(mask, "mask", shape=chi.shape)
    vs = as_voxel_size(voxel_size_mm)
    b = as_b0_dir(b0_dir)
    box = PaddedBox(m, int(pad_voxels))
    inside = box.mask
    d = dipole_kernel(box.shape, vs, b)
    field_chi = _fft.irfftn(_fft.rfftn(box.pad(chi)) * d, box.shape, overwrite=True)[inside].astype(np.float64)
    field_one = _fft.irfftn(_fft.rfftn(inside.astype(np.float32)) * d, box.shape, overwrite=True)[inside].astype(np.float64)
    fv = box.pad(f)[inside].astype(np.float64)
    norm_f = float(np.linalg.norm(fv))
    if norm_f == 0.0:
        raise ValueError("local_field_ppm is zero everywhere in the mask: the data-consistency residual is undefined")
    r0 = field_chi - fv
    g2 = float(field_one @ field_one)
    c = -float(r0 @ field_one) / g2 if g2 > 0 else 0.0
    return float(np.linalg.norm(r0 + c * field_one)) / norm_f


@numba.njit(parallel=True, cache=True)
def _echo_fit_sums(ph, mag, use_mag, hz, te, idx, n_chunks):  # pragma: no cover - compiled
    """Per voxel of ``idx`` (flat indices into the echo-major views ``ph``/``mag`` of shape (n_voxels,
    n_echoes)) the weighted RMS of ``phi_e - 2 pi f TE_e``; summed over them: the weighted squared residual
    and phase, and per echo ``w phi_e g`` and ``w g^2`` (``g = 2 pi f``, ``w = M_e^2`` or 1), in float64."""
    n_e = te.size
    n = idx.size
    rms = np.empty(n, np.float64)
    part = np.zeros((n_chunks, 2 + 2 * n_e))
    for c in numba.prange(n_chunks):
        lo = c * n // n_chunks
        hi = (c + 1) * n // n_chunks
        for k in range(lo, hi):
            v = idx[k]
            g = 2.0 * np.pi * np.float64(hz[v])
            num = 0.0
            den = 0.0
            for e in range(n_e):
                p = np.float64(ph[v, e])
                w = 1.0
                if use_mag:
                    w = np.float64(mag[v, e]) ** 2
                r = p - g * te[e]
                num += w * r * r
                den += w
                part[c, 1] += w * p * p
                part[c, 2 + e] += w * p * g
                part[c, 2 + n_e + e] += w * g * g
            part[c, 0] += num
            rms[k] = np.sqrt(num / den) if den > 0.0 else np.nan
    return rms, part.sum(axis=0)


def _echo_fit(unwrapped_phase_4d, fieldmap_hz, echo_times_s, mask, magnitude_4d):
    """:func:`_echo_fit_sums` of the voxels in ``mask``: (rms per voxel, sum w r^2, sum w phi^2, per echo
    sum w phi g, per echo sum w g^2)."""
    ph = as_float_volume(unwrapped_phase_4d, "unwrapped_phase_4d", ndim=4)
    n_e = ph.shape[3]
    te = as_echo_times(echo_times_s, n_echoes=n_e) if echo_times_s is not None else np.zeros(n_e)
    f = as_float_volume(fieldmap_hz, "fieldmap_hz")
    same_shape(ph, f, "unwrapped_phase_4d", "fieldmap_hz")
    m = as_mask(mask, "mask", shape=f.shape)
    mag = None
    if magnitude_4d is not None:
        mag = as_float_volume(magnitude_4d, "magnitude_4d", ndim=4)
        same_shape(mag, ph, "magnitude_4d", "unwrapped_phase_4d", ndim=4)
    # (n_voxels, n_echoes) views in the arrays' own memory order: no copy of the 4D volumes
    order = "F" if ph.flags.f_contiguous else "C"
    ph2 = np.ascontiguousarray(ph).reshape(-1, n_e) if order == "C" else ph.reshape(-1, n_e, order="F")
    idx = np.flatnonzero(m.ravel(order=order))
    hz = np.ascontiguousarray(f.ravel(order=order))
    mag2 = np.ones((1, 1), np.float32) if mag is None else np.asarray(mag.reshape(-1, n_e, order=order))
    n_chunks = max(1, min(64, idx.size // 4096))
    rms, sums = _echo_fit_sums(ph2, mag2, mag is not None, hz, np.asarray(te, np.float64), idx, n_chunks)
    return rms, float(sums[0]), float(sums[1]), sums[2:2 + n_e], sums[2 + n_e:]


def b0_fit_residual(
    unwrapped_phase_4d, fieldmap_hz, echo_times_s, mask, magnitude_4d=None
) -> tuple[float, float]:
    """Misfit of the unwrapped, offset-free echoes against the field map: ``r_e = phi_e - 2 pi f TE_e``.

    Returns ``(median over the mask of the per-voxel weighted RMS residual (rad), sum w r^2 / sum w phi^2
    over the mask)`` with weights ``w_e = M_e^2`` (inverse phase variance; 1 without magnitude).
    One pass over the mask with :func:`effective_echo_times`'s sums (numba, all cores).
    """
    return _b0_fit_residual_of(_echo_fit(unwrapped_phase_4d, fieldmap_hz, echo_times_s, mask, magnitude_4d))


def _b0_fit_residual_of(fit) -> tuple[float, float]:
    rms, num, sig = fit[0], fit[1], fit[2]
    rms = rms[np.isfinite(rms)]
    median = float(np.median(rms)) if rms.size else float("nan")
    rel = num / sig if sig > 0 else float("nan")
    return median, rel


def effective_echo_times(unwrapped_phase_4d, fieldmap_hz, mask, magnitude_4d=None) -> np.ndarray:
    """Per echo, the echo time (s) that best explains its unwrapped phase with the fitted field map:
    ``TE_eff_e = sum w phi_e g / sum w g^2``, ``g = 2 pi f``, weights ``w = M_e^2`` (1 without magnitude),
    a least-squares slope over the mask. Equals the given echo times when they are right (noise
    averages out over the mask); an echo whose EchoTime is wrong stands out.
    """
    return _effective_echo_times_of(_echo_fit(unwrapped_phase_4d, fieldmap_hz, None, mask, magnitude_4d))


def _effective_echo_times_of(fit) -> np.ndarray:
    wpg, wgg = fit[3], fit[4]
    if np.any(wgg <= 0.0):
        raise ValueError("the field map is zero in the mask: effective echo times are undefined")
    return np.asarray(wpg / wgg, dtype=np.float64)


def chi_summary(chi_ppm, mask) -> dict[str, float]:
    """Mean, median, std, p1, p99 (ppm) of chi in the mask and the tail asymmetry
    ``(p99.5 + p0.5 - 2 p50) / (p99.5 - p0.5)`` (0 when the distribution is constant)."""
    chi = as_float_volume(chi_ppm, "chi_ppm")
    m = as_mask(mask, "mask", shape=chi.shape)
    v = chi[m].astype(np.float64)
    p05, p1, p50, p99, p995 = np.percentile(v, [0.5, 1.0, 50.0, 99.0, 99.5])
    spread = p995 - p05
    return {
        "chi_mean_ppm": float(v.mean()),
        "chi_median_ppm": float(p50),
        "chi_std_ppm": float(v.std()),
        "chi_p1_ppm": float(p1),
        "chi_p99_ppm": float(p99),
        "chi_tail_asymmetry": float((p995 + p05 - 2 * p50) / spread) if spread > 0 else 0.0,
    }


def _fmt(values, digits: int = 4) -> str:
    return ", ".join(f"{float(v):.{digits}g}" for v in values)


# --------------------------------------------------------------------------------------------------
# the metrics of one run
# --------------------------------------------------------------------------------------------------


def field_qc_metrics(
    mask,
    voxel_size_mm,
    *,
    local_field_ppm=None,
    unwrapped_phase_4d=None,
    fieldmap_hz=None,
    magnitude_4d=None,
    echo_times_s=None,
    field_strength_t: float | None = None,
    quality_mask=None,
    quality_threshold: float = 0.5,
    harmonic_order: int = 3,
) -> dict[str, Any]:
    """The metrics of :func:`qc_metrics` that do not depend on the susceptibility map: phase quality,
    B0-fit residuals, effective echo times, R2* and the residual background of the local field.

    ``mask`` is the final (Chimap) mask; the other arguments as :func:`qc_metrics`, which merges this
    dict (pass it as ``field_metrics``: a workflow computes it while the dipole inversion runs).
    """
    m = as_mask(mask, "mask")
    vs = as_voxel_size(voxel_size_mm)
    qm = m if quality_mask is None else as_mask(quality_mask, "quality_mask", shape=m.shape)
    if not 0.0 < float(quality_threshold) < 1.0:
        raise ValueError(f"quality_threshold must be in (0, 1), got {quality_threshold}")
    out: dict[str, Any] = {}
    te = None if echo_times_s is None else as_echo_times(echo_times_s)

    mag = None
    if magnitude_4d is not None:
        mag = as_float_volume(magnitude_4d, "magnitude_4d", ndim=(3, 4))
        if mag.ndim == 3:
            mag = mag[..., None]
        same_shape(mag, m, "magnitude_4d", "mask")
        if te is not None and mag.shape[3] != te.size:
            raise ValueError(f"magnitude_4d has {mag.shape[3]} echoes but {te.size} echo times were given")

    if unwrapped_phase_4d is not None:
        from qsmprep.qsm.phase import wrap_to_pi
        from qsmprep.qsm.unwrap import romeo_voxel_quality

        ph = as_float_volume(unwrapped_phase_4d, "unwrapped_phase_4d", ndim=(3, 4))
        if ph.ndim == 3:
            ph = ph[..., None]
        same_shape(ph, m, "unwrapped_phase_4d", "mask")
        if te is not None and ph.shape[3] != te.size:
            raise ValueError(f"unwrapped_phase_4d has {ph.shape[3]} echoes but {te.size} echo times were given")
        multi = ph.shape[3] > 1 and te is not None
        q = romeo_voxel_quality(
            wrap_to_pi(ph[..., 0]),
            magnitude=None if mag is None else mag[..., 0],
            phase2_rad=wrap_to_pi(ph[..., 1]) if multi else None,
            te_ratio=float(te[0] / te[1]) if multi else None,
            mask=qm,
        )
        out["low_quality_fraction"] = float(np.mean(q[qm] < np.float32(quality_threshold)))
        if fieldmap_hz is not None and te is not None and ph.shape[3] > 1:
            hz = as_float_volume(fieldmap_hz, "fieldmap_hz")
            fit = _echo_fit(ph, hz, te, qm, mag)  # one pass for the residual and the effective echo times
            med, rel = _b0_fit_residual_of(fit)
            out["b0_fit_residual_rad"] = med
            out["b0_fit_relative_residual"] = rel
            if ph.shape[3] > 2 and np.any(hz[qm]):  # two echoes after MCPC-3D-S fit any echo times exactly
                te_eff = _effective_echo_times_of(fit)
                out["echo_times_effective_ms"] = _fmt(te_eff * 1e3)
                out["echo_time_error"] = float(np.max(np.abs(te_eff / te - 1.0)))

    if mag is not None and te is not None and te.size > 1:
        from qsmprep.qsm.multiecho import fit_r2star

        r2, _ = fit_r2star(mag, te, mask=qm)
        out["r2star_median_hz"] = float(np.median(r2[qm]))
        if field_strength_t is not None:
            out["r2star_per_tesla"] = out["r2star_median_hz"] / float(field_strength_t)

    if local_field_ppm is not None:
        f = as_float_volume(local_field_ppm, "local_field_ppm")
        same_shape(f, m, "local_field_ppm", "mask")
        out["residual_background_fraction"] = residual_background_fraction(f, m, vs, harmonic_order)
    return out


def qc_metrics(
    chi_ppm,
    mask,
    voxel_size_mm,
    b0_dir,
    *,
    local_field_ppm=None,
    unwrapped_phase_4d=None,
    fieldmap_hz=None,
    magnitude_4d=None,
    echo_times_s=None,
    field_strength_t: float | None = None,
    quality_mask=None,
    quality_threshold: float = 0.5,
    harmonic_order: int = 3,
    reference: str | None = None,
    extra: Mapping[str, Any] | None = None,
    field_metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """QC metrics of one run (see the module docstring for each), as a flat ``{name: number | str}``.

    ``chi_ppm`` and ``mask`` are the final susceptibility map and its mask; ``quality_mask`` (default
    ``mask``) is the region where the phase was unwrapped and the field fitted (the brain mask before
    background-field erosion). Metrics whose inputs are not given (or single-echo data for the B0
    residual and R2*) are left out; so is ``chi_mean_ppm`` when ``reference`` is ``"mean"`` (the map was
    referenced to its mean in the mask, so that is 0 by construction). ``extra`` entries (strings/numbers: methods, model name and
    checksum) are passed through. ``field_metrics``: the result of :func:`field_qc_metrics` for the same
    inputs, computed beforehand; the phase, magnitude and field-map arrays are then not needed
    (``local_field_ppm`` still is, for the data-consistency residual).
    """
    chi = as_float_volume(chi_ppm, "chi_ppm")
    m = as_mask(mask, "mask", shape=chi.shape)
    vs = as_voxel_size(voxel_size_mm)
    b = as_b0_dir(b0_dir)
    if quality_mask is not None:
        as_mask(quality_mask, "quality_mask", shape=chi.shape)
    out: dict[str, Any] = {}
    out["mask_volume_ml"] = float(m.sum()) * float(np.prod(vs)) / 1000.0
    out["obliquity_deg"] = round(obliquity_deg(b), 3)
    out["b0_direction"] = _fmt(b)
    if field_strength_t is not None:
        if not np.isfinite(field_strength_t) or field_strength_t <= 0:
            raise ValueError(f"field_strength_t must be positive (tesla), got {field_strength_t}")
        out["field_strength_t"] = float(field_strength_t)
    if echo_times_s is not None:
        te = as_echo_times(echo_times_s)
        out["n_echoes"] = int(te.size)
        out["echo_times_ms"] = _fmt(te * 1e3)

    f = None
    if local_field_ppm is not None:
        f = as_float_volume(local_field_ppm, "local_field_ppm")
        same_shape(f, chi, "local_field_ppm", "chi_ppm")
    if field_metrics is None:
        field_metrics = field_qc_metrics(
            m, vs, local_field_ppm=f, unwrapped_phase_4d=unwrapped_phase_4d, fieldmap_hz=fieldmap_hz,
            magnitude_4d=magnitude_4d, echo_times_s=echo_times_s, field_strength_t=field_strength_t,
            quality_mask=quality_mask, quality_threshold=quality_threshold, harmonic_order=harmonic_order,
        )
    out.update(field_metrics)
    if f is not None and np.any(f[m]):
        out["data_consistency_residual"] = data_consistency_residual(chi, f, m, vs, b)

    out.update(chi_summary(chi, m))
    if reference == "mean":
        del out["chi_mean_ppm"]  # 0 by construction: an uninformative row
    for key, value in dict(extra or {}).items():
        if isinstance(value, np.generic):
            value = value.item()
        if value is not None:
            out[str(key)] = value if isinstance(value, (bool, int, float)) else str(value)
    return {k: v for k, v in out.items() if not (isinstance(v, float) and not np.isfinite(v))}


def _bound(v: float | None, default: str) -> str:
    return default if v is None else f"{v:g}"


def flag_metrics(
    metrics: Mapping[str, Any], ranges: Mapping[str, tuple[float | None, float | None, str]] | None = None
) -> list[dict[str, Any]]:
    """Metrics outside their expected range: ``[{"metric", "value", "expected": "[lo, hi]", "reason"}]``.

    ``ranges`` defaults to :data:`EXPECTED_RANGES`; metrics that are missing or not numbers are skipped.
    """
    flags = []
    for name, (lo, hi, reason) in (EXPECTED_RANGES if ranges is None else ranges).items():
        value = metrics.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            continue
        value = float(value)
        if not np.isfinite(value):
            continue
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            flags.append({
                "metric": name,
                "value": value,
                "expected": f"[{_bound(lo, '-inf')}, {_bound(hi, 'inf')}]",
                "reason": reason,
            })
    return flags
