"""Multi-echo processing: MCPC-3D-S phase-offset removal, B0 (field) fitting and R2* mapping.

- MCPC-3D-S: Eckstein K et al., *Computationally efficient combination of multi-channel phase data
  from multi-echo acquisitions (ASPIRE).* MRM 2018;79:2996, in the simplified form of
  MriResearchTools ``mcpc3ds`` (phase difference unwrapped with ROMEO), for coil-combined 4D data.
- B0 from unwrapped echoes: weighted least-squares line with a per-voxel intercept (MEDI ``Fit_ppm_complex``,
  Liu T et al., MRM 2013;69:467) with the ROMEO/MRT ``calculateB0_unwrapped`` weightings, or through the
  origin (those weighted averages); :func:`fit_b0_hz_with_offset` also returns the intercept and residual
  (HS-QSM ``echofit``, QSM.rs ``multi_echo_linear_fit``).
- R2*: weighted log-linear least squares, or ARLO (Pei M et al., MRM 2015;73:843); ``auto`` (the
  default) takes ARLO for >= 3 equally spaced echoes (:func:`echoes_equally_spaced`), else log-linear.

Conventions: (x, y, z, echo) float32 arrays, echo times in seconds, phase in radians, frequencies
in Hz, rates in 1/s (Hz).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi

from qsmprep.qsm.arrays import as_echo_times, as_float_volume, as_mask, as_voxel_size
from qsmprep.qsm.phase import wrap_to_pi
from qsmprep.qsm.registry import B0FIT, OFFSET, R2STAR

__all__ = [
    "mcpc3ds",
    "smooth_phase",
    "fit_b0_hz",
    "fit_b0_hz_with_offset",
    "fit_r2star",
    "echoes_equally_spaced",
    "r2star_method_for",
    "t2star_s",
    "ARLO_SPACING_RTOL",
    "ARLO_SPACING_ATOL_S",
    "B0_WEIGHTINGS",
]

TWO_PI = 2.0 * np.pi

#: Echo weightings of :func:`fit_b0_hz` (ROMEO/MRT ``get_B0_phase_weighting``): w_e as a function of
#: magnitude M_e and TE_e.
B0_WEIGHTINGS = ("phase_snr", "phase_var", "average", "tes", "mag")

#: Stand-in magnitude decay time (s) when no magnitude is given (MRT ``simulated_mag``).
SIMULATED_T2STAR_S = 0.020


# --------------------------------------------------------------------------------------------------
# input helpers
# --------------------------------------------------------------------------------------------------


def _phase_4d(x, name: str, min_echoes: int = 1, what: str = "") -> np.ndarray:
    a = as_float_volume(x, name, ndim=(3, 4))
    if a.ndim == 3:
        a = a[..., None]
    if a.shape[3] < min_echoes:
        raise ValueError(f"{name} has {a.shape[3]} echo(es); {what or 'this'} needs at least {min_echoes}")
    return a


def _magnitude_like(magnitude_4d, shape: tuple[int, ...], name: str = "magnitude_4d") -> np.ndarray:
    mag = as_float_volume(magnitude_4d, name, ndim=(3, 4))
    if mag.ndim == 3:
        mag = mag[..., None]
    if mag.shape != tuple(shape):
        raise ValueError(f"{name} has shape {mag.shape} but the phase has shape {tuple(shape)}")
    if np.any(mag < 0):
        raise ValueError(f"{name} must be non-negative")
    return mag


def _mask_or_all(mask, shape3) -> np.ndarray:
    return np.ones(shape3, bool) if mask is None else as_mask(mask, "mask", shape=shape3)


def _sigma_vox(sigma_mm, voxel_size_mm) -> np.ndarray:
    s = np.asarray(sigma_mm, dtype=np.float64).reshape(-1)
    if s.size == 1:
        s = np.repeat(s, 3)
    if s.size != 3 or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"sigma_mm must be one or three positive numbers, got {np.asarray(sigma_mm).tolist()}")
    return s / as_voxel_size(voxel_size_mm)


# --------------------------------------------------------------------------------------------------
# masked complex smoothing (normalised convolution with extrapolation)
# --------------------------------------------------------------------------------------------------


def _block_sum(a: np.ndarray, f: Sequence[int]) -> np.ndarray:
    """Sum over non-overlapping blocks of size ``f`` (zero-padded at the far ends)."""
    if all(int(k) == 1 for k in f):
        return a
    pad = [(0, (-n) % int(k)) for n, k in zip(a.shape, f)]
    if any(p[1] for p in pad):
        a = np.pad(a, pad)
    s = a.shape
    return a.reshape(s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2]).sum(axis=(1, 3, 5))


def _upsample_linear(c: np.ndarray, f: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Separable linear interpolation from block centres back to the fine grid of ``shape``."""
    out = c
    for ax, (k, n) in enumerate(zip(f, shape)):
        k = int(k)
        if k == 1:
            continue
        nc = out.shape[ax]
        pos = (np.arange(n, dtype=np.float64) - (k - 1) / 2.0) / k
        pos = np.clip(pos, 0.0, nc - 1.0)
        i0 = np.floor(pos).astype(np.intp)
        i1 = np.minimum(i0 + 1, nc - 1)
        t = (pos - i0).astype(np.float32)
        view = [1, 1, 1]
        view[ax] = n
        t = t.reshape(view)
        lo, hi = np.take(out, i0, axis=ax), np.take(out, i1, axis=ax)
        lo *= 1 - t  # in place: lo * (1 - t) + hi * t without two more full-size temporaries
        hi *= t
        lo += hi
        out = lo
        del hi
    return out


def smooth_phase(phase_rad, weight, sigma_vox, min_weight_fraction: float = 1e-4) -> np.ndarray:
    """Weighted Gaussian smoothing of a phase map in the complex domain, extrapolated everywhere.

    Normalised convolution ``angle(G * (w e^{i phi}))`` (the normalisation ``G * w`` does not change
    the angle), computed on a grid downsampled by ``~sigma/3`` blocks and linearly interpolated back.
    Voxels farther than the kernel reach from any weight (``G * w`` below ``min_weight_fraction`` of
    its robust maximum) take the value of the nearest valid voxel. Returns float32 rad in [-pi, pi).
    """
    ph = as_float_volume(phase_rad, "phase_rad", ndim=3)
    w = as_float_volume(weight, "weight", ndim=3)
    if w.shape != ph.shape:
        raise ValueError(f"weight has shape {w.shape} but phase_rad has shape {ph.shape}")
    if np.any(w < 0):
        raise ValueError("weight must be non-negative")
    if not np.any(w > 0):
        raise ValueError("weight is zero everywhere; nothing to smooth")
    sig = np.broadcast_to(np.asarray(sigma_vox, dtype=np.float64), (3,))
    f = [max(1, int(s // 3.0)) for s in sig]
    shape = ph.shape
    z = np.empty(shape, np.complex64)
    z.real = w * np.cos(ph)
    z.imag = w * np.sin(ph)
    zc = _block_sum(z, f)
    wc = _block_sum(w, f)
    del z
    sc = [s / k for s, k in zip(sig, f)]
    re = ndi.gaussian_filter(np.ascontiguousarray(zc.real), sc, mode="constant", truncate=4.0)
    im = ndi.gaussian_filter(np.ascontiguousarray(zc.imag), sc, mode="constant", truncate=4.0)
    den = ndi.gaussian_filter(wc, sc, mode="constant", truncate=4.0)
    mag = np.hypot(re, im)
    ref = float(np.percentile(den[den > 0], 99)) if np.any(den > 0) else 0.0
    valid = (den > min_weight_fraction * ref) & (mag > 0)
    if not valid.any():
        raise ValueError("smoothing support is empty")
    uc = np.zeros(zc.shape, np.complex64)
    uc.real[valid] = re[valid] / mag[valid]
    uc.imag[valid] = im[valid] / mag[valid]
    if not valid.all():
        idx = ndi.distance_transform_edt(~valid, return_distances=False, return_indices=True)
        uc = uc[tuple(idx)]
    up = _upsample_linear(uc, f, shape)
    return wrap_to_pi(np.angle(up))


# --------------------------------------------------------------------------------------------------
# MCPC-3D-S
# --------------------------------------------------------------------------------------------------


@OFFSET.register(
    "mcpc3ds",
    label="MCPC-3D-S",
    description="MCPC-3D-S, which estimates it from the phase difference of the first two echoes and smooths it",
    references=("eckstein2018",),
    aliases=("mcpc-3d-s", "mcpc3d-s"),
    data_args=("unwrapper",),
    ranges={"echoes": "[0, inf)", "sigma_mm": "(0, inf)"},
)
def mcpc3ds(
    phase_rad_4d,
    magnitude_4d=None,
    echo_times_s=None,
    voxel_size_mm=(1.0, 1.0, 1.0),
    echoes: Sequence[int] = (0, 1),
    sigma_mm: float | Sequence[float] = 7.0,
    mask=None,
    unwrapper: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """MCPC-3D-S phase-offset removal for coil-combined multi-echo data (Eckstein et al., MRM 2018).

    1. ``H = I[e2] conj(I[e1])`` (Hermitian product of the two ``echoes``, 0-based);
    2. ``angle(H)`` unwrapped with ROMEO (magnitude ``sqrt|H|``, ``mask``; default mask
       :func:`~qsmprep.qsm.masking.robust_mask` of ``sqrt|H|``), median shifted into (-pi, pi];
    3. ``phi_evo = TE_e1 / (TE_e2 - TE_e1) * unwrapped``; ``phi0 = angle(I[e1]) - phi_evo``;
    4. ``phi0`` smoothed in the complex domain (:func:`smooth_phase`, weights ``mask * M_e1``, Gaussian
       ``sigma_mm``), extrapolated outside the mask;
    5. ``phi0`` subtracted from every echo (wrapped).

    ``sigma_mm`` defaults to 7 mm isotropic (ROMEO CLI default): a physical width that behaves the
    same at any resolution, whereas MRT's ``[10, 10, 5]`` voxels assume thick slices.
    ``unwrapper(phase, magnitude, mask) -> unwrapped`` replaces ROMEO (tests, other unwrappers).
    Raises ValueError for < 2 echoes, equal echo times of the pair, or invalid echo indices.

    Returns ``(phase_corrected_4d, phase_offset_rad)``: float32 (x, y, z, echo) and (x, y, z), wrapped.
    """
    ph = _phase_4d(phase_rad_4d, "phase_rad_4d", min_echoes=2, what="MCPC-3D-S")
    n_e = ph.shape[3]
    if echo_times_s is None:
        raise ValueError("echo_times_s is required for MCPC-3D-S")
    te = as_echo_times(echo_times_s, n_echoes=n_e, min_echoes=2)
    ech = [int(e) for e in np.asarray(echoes).reshape(-1)]
    if len(ech) != 2 or ech[0] == ech[1] or not all(0 <= e < n_e for e in ech):
        raise ValueError(f"echoes must be two different 0-based echo indices in [0, {n_e - 1}], got {echoes}")
    e1, e2 = ech
    dte = te[e2] - te[e1]
    if abs(dte) < 1e-9:
        raise ValueError(f"echoes {e1} and {e2} have the same echo time ({te[e1]} s); MCPC-3D-S needs TE1 != TE2")
    shape3 = ph.shape[:3]
    sig_vox = _sigma_vox(sigma_mm, voxel_size_mm)
    mag = None if magnitude_4d is None else _magnitude_like(magnitude_4d, ph.shape)

    dphi = wrap_to_pi(ph[..., e2] - ph[..., e1])
    if mag is None:
        hw = np.ones(shape3, np.float32)
    else:
        hw = np.sqrt(mag[..., e1] * mag[..., e2])
    if mask is None:
        from qsmprep.qsm.masking import robust_mask

        m = robust_mask(hw) if mag is not None else np.ones(shape3, bool)
        if not m.any():
            m = np.ones(shape3, bool)
    else:
        m = as_mask(mask, "mask", shape=shape3)

    if unwrapper is None:
        from qsmprep.qsm.unwrap import romeo_unwrap

        unwrapped = romeo_unwrap(dphi, None if mag is None else hw, m, global_correction=True)
    else:
        unwrapped = np.asarray(unwrapper(dphi, None if mag is None else hw, m), dtype=np.float32)
        if unwrapped.shape != shape3:
            raise ValueError(f"unwrapper returned shape {unwrapped.shape}, expected {shape3}")
    po = ph[..., e1] - np.float32(te[e1] / dte) * unwrapped
    del unwrapped, dphi

    w = m.astype(np.float32)
    if mag is not None:
        m1 = mag[..., e1]
        scale = float(np.median(m1[m])) or float(m1[m].max()) or 1.0
        w *= m1 / np.float32(scale)
        if not np.any(w > 0):
            w = m.astype(np.float32)
    offset = smooth_phase(po, w, sig_vox)
    del po, w

    out = np.empty(ph.shape, np.float32, order="F")  # echo volumes contiguous (NIfTI layout)
    for e in range(n_e):
        out[..., e] = wrap_to_pi(ph[..., e] - offset)
    return out, offset


# --------------------------------------------------------------------------------------------------
# B0 fitting
# --------------------------------------------------------------------------------------------------


def _gather(arr4d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Echo-major (n_echoes, n_voxels) float32 copy of the voxels in ``m`` (contiguous rows)."""
    if m.all():
        return np.ascontiguousarray(arr4d.reshape(-1, arr4d.shape[3]).T)
    return np.ascontiguousarray(arr4d[m].T)


def _scatter(values: np.ndarray, m: np.ndarray) -> np.ndarray:
    """float32 volume of ``m.shape`` holding ``values`` (non-finite -> 0) in ``m`` and 0 elsewhere."""
    out = np.zeros(m.shape, np.float32)
    v = np.where(np.isfinite(values), values, 0).astype(np.float32, copy=False)
    if m.all():
        out.reshape(-1)[:] = v
    else:
        out[m] = v
    return out


@B0FIT.register(
    "weighted",
    label="weighted multi-echo B0 fit",
    description="an average of phase over echo time across echoes, weighted by magnitude and echo time "
    "(phase-SNR weighting, as in ROMEO)",
    references=("dymerska2021", "liu2013"),
)
def fit_b0_hz(
    unwrapped_phase_4d,
    echo_times_s,
    magnitude_4d=None,
    mask=None,
    weighting: str = "phase_snr",
    fit_offset: bool = True,
) -> np.ndarray:
    """B0 frequency map (Hz) from unwrapped phase, a weighted least-squares fit of ``phi_e = phi0 + 2 pi
    B0 TE_e`` with weights ``w_e / TE_e^2`` on the phase residuals.

    ``fit_offset=False``: ``phi0 = 0`` (offset-free phase), which is ROMEO/MRT ``calculateB0_unwrapped``,
    ``sum_e w_e phi_e/TE_e / sum_e w_e / 2pi``. ``fit_offset=True`` (default): ``phi0`` fitted per voxel
    (as MEDI's ``Fit_ppm_complex``, Liu T et al., MRM 2013;69:467), so what phase-offset removal left
    behind does not enter the field. MCPC-3D-S smooths its offset estimate: where the offset curves (a
    bowl of pi across the qsm-forward phantom), the smoothing misses it by up to 0.4 rad at the brain
    edge, a rim-to-centre field error of 0.04 ppm at 3 T that is not harmonic, so PDF cannot remove it
    (PDF + TV NRMSE 58 % vs 32 % with the intercept). The price is noise: field std 1.6-2.2 times that
    of the fit through the origin (4-6 echoes, 3-28 ms).
    ROMEO/MRT weightings ``w_e``: ``phase_snr`` (``M_e TE_e``, default),
    ``phase_var`` (``M_e^2 TE_e^2``: inverse variance, = weighted LS slope through the origin with
    weights ``M^2``), ``average`` (1), ``tes`` (``TE_e``), ``mag`` (``M_e``). Without magnitude
    ``M_e = exp(-TE_e / 20 ms)`` (MRT ``simulated_mag``). One echo (3D input or 4D with one echo), or
    echo times too close for a line: ``phi / (2 pi TE)``. Non-finite results and voxels outside ``mask``
    are 0. Returns float32 (x, y, z).
    """
    ph = _phase_4d(unwrapped_phase_4d, "unwrapped_phase_4d")
    n_e = ph.shape[3]
    te = as_echo_times(echo_times_s, n_echoes=n_e)
    key = str(weighting).lower()
    if key not in B0_WEIGHTINGS:
        raise ValueError(f"unknown B0 weighting {weighting!r}; choose one of {', '.join(B0_WEIGHTINGS)}")
    m = _mask_or_all(mask, ph.shape[:3])
    mag = None if magnitude_4d is None else _magnitude_like(magnitude_4d, ph.shape)
    if n_e == 1:
        b0 = ph[..., 0] * np.float32(1.0 / (TWO_PI * te[0]))
        return np.where(m, b0, np.float32(0)).astype(np.float32)
    P = _gather(ph, m)
    M = _gather(mag, m) if mag is not None else np.exp(-te / SIMULATED_T2STAR_S).astype(np.float32)[:, None]
    ws = []
    for e in range(n_e):
        t = np.float32(te[e])
        if key == "phase_snr":
            w = M[e] * t
        elif key == "phase_var":
            w = np.square(M[e] * t)
        elif key == "average":
            w = np.float32(1.0)
        elif key == "tes":
            w = t
        else:
            w = M[e]
        ws.append(np.broadcast_to(np.asarray(w, np.float32), P.shape[1:]))
    if fit_offset and np.ptp(te) >= 1e-6:
        # LS weights w_e / TE_e^2 (ms), times centred on the mean TE: well-conditioned float32 sums
        tc = float(np.mean(te) * 1e3)
        t_ms = (te * 1e3 - tc).astype(np.float32)
        W = np.stack([ws[e] / np.float32((te[e] * 1e3) ** 2) for e in range(n_e)])
        slope, _ = _weighted_line(P, t_ms, W)  # rad/ms
        b0 = slope * np.float32(1e3 / TWO_PI)
    else:
        num = np.zeros(P.shape[1], np.float32)
        den = np.zeros(P.shape[1], np.float32)
        for e in range(n_e):
            num += (ws[e] / np.float32(te[e])) * P[e]
            den += ws[e]
        with np.errstate(divide="ignore", invalid="ignore"):
            b0 = num / (den * np.float32(TWO_PI))
    return _scatter(b0, m)


def fit_b0_hz_with_offset(
    unwrapped_phase_4d,
    echo_times_s,
    magnitude_4d=None,
    mask=None,
    weighting: str = "phase_var",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted LS line ``phi_e = 2 pi B0 TE_e + phi0`` per voxel (HS-QSM ``echofit``, QSM.rs).

    Weights: ``phase_var`` (``M_e^2``, inverse phase variance; default), ``mag`` (``M_e``) or
    ``average`` (1; used when no magnitude is given). Needs >= 2 echoes with distinct TEs.

    Returns ``(b0_hz, offset_rad, residual_rad2)``, float32 (x, y, z): the intercept is not wrapped;
    the residual is the weighted mean squared misfit ``sum w r^2 / sum w`` (0 for two echoes), a
    reliability map. Voxels outside ``mask`` or with a degenerate fit are 0.
    """
    ph = _phase_4d(unwrapped_phase_4d, "unwrapped_phase_4d", min_echoes=2, what="a fit with intercept")
    n_e = ph.shape[3]
    te = as_echo_times(echo_times_s, n_echoes=n_e, min_echoes=2)
    if np.ptp(te) < 1e-9:
        raise ValueError("all echo times are equal; a linear fit over TE is impossible")
    key = str(weighting).lower()
    if key not in ("phase_var", "mag", "average"):
        raise ValueError(f"unknown weighting {weighting!r}; choose 'phase_var', 'mag' or 'average'")
    m = _mask_or_all(mask, ph.shape[:3])
    mag = None if magnitude_4d is None else _magnitude_like(magnitude_4d, ph.shape)
    if mag is None:
        key = "average"
    P = _gather(ph, m)
    if key == "average":
        W = np.ones((n_e, 1), np.float32)
    else:
        W = _gather(mag, m)
        if key == "phase_var":
            np.square(W, out=W)
    # times in ms, centred on the mean TE: well-conditioned float32 sums
    tc = float(np.mean(te) * 1e3)
    t = (te * 1e3 - tc).astype(np.float32)
    slope, pc = _weighted_line(P, t, W)  # rad/ms, value at the mean TE
    res = np.zeros(P.shape[1], np.float32)  # second pass: weighted mean squared residual
    sw = np.zeros(P.shape[1], np.float32)
    for e in range(n_e):
        r = P[e] - pc - slope * t[e]
        res += W[e] * (r * r)
        sw += W[e]
    with np.errstate(divide="ignore", invalid="ignore"):
        res /= sw
    off = pc - slope * np.float32(tc)  # intercept at TE = 0
    ok = np.isfinite(slope) & np.isfinite(off)
    b0 = np.where(ok, slope * np.float32(1e3 / TWO_PI), np.nan)
    return _scatter(b0, m), _scatter(np.where(ok, off, np.nan), m), _scatter(np.where(ok, res, np.nan), m)


def _weighted_line(Y: np.ndarray, t: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column weighted LS line ``Y[e] ~ a + b t[e]`` (rows = echoes; ``W`` rows broadcast):
    returns (b, a) with ``t`` already centred."""
    n = Y.shape[1]
    sw, st, stt, sy, sty = (np.zeros(n, np.float32) for _ in range(5))
    for e in range(Y.shape[0]):
        w = W[e]
        wy = w * Y[e]
        sw += w
        st += w * t[e]
        stt += w * (t[e] * t[e])
        sy += wy
        sty += wy * t[e]
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (sw * sty - st * sy) / (sw * stt - st * st)
        a = (sy - slope * st) / sw
    return slope, a


# --------------------------------------------------------------------------------------------------
# R2*
# --------------------------------------------------------------------------------------------------

#: Echo spacings count as equal when each differs from their mean by at most this fraction of it ...
ARLO_SPACING_RTOL = 0.01
#: ... or by at most this many seconds (10 us: BIDS sidecars often round EchoTime to 10 us).
ARLO_SPACING_ATOL_S = 1e-5


def echoes_equally_spaced(echo_times_s) -> bool:
    """Whether >= 3 echo times increase with equal spacing, as ARLO's Simpson integrals assume (Pei et
    al., MRM 2015): every ``TE_{i+1} - TE_i`` within ``max(ARLO_SPACING_RTOL * mean, ARLO_SPACING_ATOL_S)``
    of the mean spacing."""
    te = np.asarray(echo_times_s, dtype=np.float64).reshape(-1)
    if te.size < 3:
        return False
    d = np.diff(te)
    step = float(d.mean())
    return bool(step > 0 and np.all(np.abs(d - step) <= max(ARLO_SPACING_RTOL * step, ARLO_SPACING_ATOL_S)))


def r2star_method_for(method: str, echo_times_s) -> str:
    """The R2* method a series is fitted with: ``"auto"`` is ``"arlo"`` for >= 3 equally spaced echoes
    (:func:`echoes_equally_spaced`) and ``"loglinear"`` otherwise (2 echoes, unequal spacing); any
    other name is returned as it is."""
    if str(method).lower() != "auto":
        return str(method).lower()
    return "arlo" if echoes_equally_spaced(echo_times_s) else "loglinear"



def fit_r2star(
    magnitude_4d,
    echo_times_s,
    mask=None,
    method: str = "loglinear",
    max_r2star_hz: float = 1000.0,
    reweight: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """R2* (1/s) and S0 from multi-echo magnitude, ``M_e = S0 exp(-R2* TE_e)``.

    - ``"loglinear"``: weighted LS of ``ln M_e`` on ``TE_e`` with weights ``M_e^2`` (inverse variance
      of ``ln M``, which limits the noise-floor bias of late echoes); with ``reweight`` a second pass
      uses the fitted decay ``exp(-2 R2* TE_e)`` as weights, which removes the bias (~1/SNR) caused by
      weights correlated with the noise. Needs >= 2 echoes; echoes with ``M_e <= 0`` get zero weight.
    - ``"arlo"``: auto-regression on linear operations (Pei et al., MRM 2015): Simpson integrals
      ``s_i = dTE/3 (M_i + 4 M_{i+1} + M_{i+2})``, ``d_i = M_i - M_{i+2}``,
      ``R2* = (dTE/3 sum d^2 + sum s d) / (sum s^2 + dTE/3 sum s d)``; needs >= 3 equally spaced echoes
      (:func:`echoes_equally_spaced`; ``dTE`` is the mean spacing). S0 is then the LS amplitude for that decay.

    R2* is clipped to ``[0, max_r2star_hz]``; non-finite values and voxels outside ``mask`` are 0.
    Returns float32 ``(r2star_hz, s0)``.
    """
    mag = as_float_volume(magnitude_4d, "magnitude_4d", ndim=4)
    n_e = mag.shape[3]
    te = as_echo_times(echo_times_s, n_echoes=n_e, min_echoes=2)
    if np.any(mag < 0):
        raise ValueError("magnitude_4d must be non-negative")
    m = _mask_or_all(mask, mag.shape[:3])
    key = str(method).lower()
    if key not in ("loglinear", "arlo"):
        raise ValueError(f"unknown R2* method {method!r}; choose 'loglinear' or 'arlo'")
    if key == "loglinear" and np.ptp(te) < 1e-9:
        raise ValueError("all echo times are equal; R2* cannot be fitted")
    if key == "arlo":
        if n_e < 3:
            raise ValueError(f"ARLO needs at least 3 echoes, got {n_e}")
        if not echoes_equally_spaced(te):
            raise ValueError(f"ARLO needs equally spaced, increasing echo times, got {te.tolist()}")
    M = _gather(mag, m)
    if key == "loglinear":
        tc = float(np.mean(te) * 1e3)
        t = (te * 1e3 - tc).astype(np.float32)  # ms, centred
        Y = np.log(np.maximum(M, np.float32(1e-30)))
        W = np.square(M)  # zero weight where M = 0
        slope, yc = _weighted_line(Y, t, W)
        if reweight:  # weights from the fitted decay: no noise-weight correlation (bias ~ 1/SNR)
            sl = np.nan_to_num(slope, nan=0.0, posinf=0.0, neginf=0.0)
            for e in range(n_e):
                W[e] = np.exp(np.clip(2 * sl * t[e], -60, 60)) * (M[e] > 0)
            slope, yc = _weighted_line(Y, t, W)
        del Y, W
        with np.errstate(invalid="ignore", over="ignore"):
            r2 = -slope * np.float32(1e3)
            s0 = np.exp(yc - slope * np.float32(tc))
    else:
        a = np.float32(np.mean(np.diff(te)) * 1e3 / 3.0)  # ms
        n = M.shape[1]
        sss, ssd, sdd = (np.zeros(n, np.float32) for _ in range(3))
        for i in range(n_e - 2):
            s = a * (M[i] + 4 * M[i + 1] + M[i + 2])
            dd = M[i] - M[i + 2]
            sss += s * s
            ssd += s * dd
            sdd += dd * dd
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = (a * sdd + ssd) / (sss + a * ssd) * np.float32(1e3)
        r2c = np.clip(np.nan_to_num(r2, nan=0.0, posinf=0.0, neginf=0.0), 0.0, max_r2star_hz)
        g_num = np.zeros(n, np.float32)
        g_den = np.zeros(n, np.float32)
        for e in range(n_e):
            g = np.exp(-r2c * np.float32(te[e]))
            g_num += M[e] * g
            g_den += g * g
        with np.errstate(divide="ignore", invalid="ignore"):
            s0 = g_num / g_den
    ok = np.isfinite(r2)
    r2 = np.where(ok, np.clip(r2, 0.0, max_r2star_hz), np.float32(0))
    s0 = np.where(ok, s0, np.float32(0))
    return _scatter(r2, m), _scatter(s0, m)


@R2STAR.register(
    "loglinear",
    label="log-linear fit",
    description="a weighted log-linear least-squares fit of the magnitude decay",
    ranges={"max_r2star_hz": "(0, inf)"},
)
def r2star_loglinear(magnitude_4d, echo_times_s, mask=None, max_r2star_hz: float = 1000.0, reweight: bool = True):
    """R2STAR entry: :func:`fit_r2star` with ``method="loglinear"``."""
    return fit_r2star(magnitude_4d, echo_times_s, mask, "loglinear", max_r2star_hz, reweight)


@R2STAR.register(
    "arlo",
    label="ARLO",
    description="auto-regression on linear operations (ARLO)",
    references=("pei2015",),
    ranges={"max_r2star_hz": "(0, inf)"},
)
def r2star_arlo(magnitude_4d, echo_times_s, mask=None, max_r2star_hz: float = 1000.0):
    """R2STAR entry: :func:`fit_r2star` with ``method="arlo"`` (>= 3 equally spaced echoes)."""
    return fit_r2star(magnitude_4d, echo_times_s, mask, "arlo", max_r2star_hz)


@R2STAR.register(
    "auto",
    label="automatic R2* fit",
    description="ARLO (auto-regression on linear operations) for series with at least 3 equally spaced echoes "
    "and a weighted log-linear least-squares fit otherwise",
    references=("pei2015",),
    ranges={"max_r2star_hz": "(0, inf)"},
)
def r2star_auto(magnitude_4d, echo_times_s, mask=None, max_r2star_hz: float = 1000.0, reweight: bool = True):
    """R2STAR entry: :func:`fit_r2star` with the method of :func:`r2star_method_for` (``reweight`` applies
    to the log-linear fit only)."""
    method = r2star_method_for("auto", echo_times_s)
    if method == "arlo":
        return fit_r2star(magnitude_4d, echo_times_s, mask, "arlo", max_r2star_hz)
    return fit_r2star(magnitude_4d, echo_times_s, mask, "loglinear", max_r2star_hz, reweight)


def t2star_s(r2star_hz) -> np.ndarray:
    """T2* (s) = 1 / R2* (1/s); 0 where R2* <= 0 (undefined). float32."""
    r2 = as_float_volume(r2star_hz, "r2star_hz", ndim=(1, 2, 3, 4))
    with np.errstate(divide="ignore"):
        return np.where(r2 > 0, np.float32(1.0) / np.where(r2 > 0, r2, np.float32(1)), np.float32(0)).astype(np.float32)
