"""Phase units, scaling to radians and complex-signal helpers.

Raw phase arrives in several encodings:

- radians, ``[-pi, pi)`` or ``[0, 2*pi)`` (BIDS sidecar ``"Units": "rad"``);
- integers of a scanner range (BIDS ``"Units": "arbitrary"``): Siemens ``-4096..4095`` (rescaled)
  or ``0..4095`` (raw 12 bit), signed 12 bit ``-2048..2047``, GE milliradians ``-3142..3142``,
  16 bit ``-32768..32767`` / ``0..65535``;
- anything else in arbitrary units, rescaled linearly from ``[min, max]`` to ``[-pi, pi]`` as in
  MriResearchTools ``readphase`` and QSM.rs ``scale_phase_to_pi``.

A nominal integer range maps its lower end to ``-pi`` and spans ``2*pi`` over one period, so the
scaling is exact and independent of the data's min/max. The range is chosen as the smallest nominal
range that contains the data and that the data cover to at least half; whole images cover their range
(noise outside the head), but a tightly cropped image with little phase variation could be matched to
a too small range: pass such data in radians. The min/max rescale is only a proxy (the extreme values
of the data need not be the ends of the nominal range).

Output phase is float32, wrapped into ``[-pi, pi)`` where ``pi`` is ``float32(pi)``.
"""

from __future__ import annotations

import numba
import numpy as np

from qsmprep.qsm.arrays import as_float_volume

__all__ = [
    "PHASE_RANGES",
    "detect_phase_units",
    "scale_phase_to_rad",
    "wrap_to_pi",
    "to_complex",
    "mag_phase_from_real_imag",
    "hermitian_product",
    "combine_echoes_complex",
]

_PI32 = np.float32(np.pi)
_TWO_PI32 = np.float32(2 * np.pi)

#: Tolerance (rad) on each end of the range when deciding that data are already in radians
#: (QSM.rs uses 0.1*pi per end).
RAD_TOLERANCE = 0.1 * np.pi

#: Nominal integer phase ranges ``name: (value mapped to -pi, period mapped to 2*pi)``.
PHASE_RANGES: dict[str, tuple[float, float]] = {
    "siemens_raw_12bit": (0.0, 4096.0),
    "signed_12bit": (-2048.0, 4096.0),
    "ge_milliradians": (-1000.0 * np.pi, 2000.0 * np.pi),
    "siemens_rescaled": (-4096.0, 8192.0),
    "unsigned_16bit": (0.0, 65536.0),
    "signed_16bit": (-32768.0, 65536.0),
}

_RAD_NAMES = {"rad", "radian", "radians"}
_ARBITRARY_NAMES = {"arbitrary", "arb", "a.u.", "au", "arbitrary units", "arbitrary unit"}


@numba.njit(parallel=True, cache=True)
def _wrap_kernel(x, out):  # pragma: no cover - compiled
    two_pi = 2.0 * np.pi
    pi32 = np.float32(np.pi)
    for i in numba.prange(x.size):
        v = np.float64(x[i])
        v = v - two_pi * np.floor((v + np.pi) / two_pi)
        f = np.float32(v)
        if f >= pi32:
            f -= np.float32(two_pi)
        out[i] = f


def wrap_to_pi(x) -> np.ndarray:
    """Wrap radians into ``[-pi, pi)``; float32 out (``pi`` = ``float32(pi)``). In-range input is unchanged."""
    x = np.asarray(x)
    if np.iscomplexobj(x):
        raise ValueError("wrap_to_pi expects real phase values, got a complex array")
    if x.dtype == bool or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"wrap_to_pi expects a numeric array, got dtype {x.dtype}")
    if not (x.flags.c_contiguous or x.flags.f_contiguous):
        x = np.ascontiguousarray(x)
    out = np.empty_like(x, dtype=np.float32, order="K")  # same memory layout (C or Fortran) as x
    if x.size:
        _wrap_kernel(x.ravel(order="K"), out.ravel(order="K"))
    return out


def _finite_range(a: np.ndarray) -> tuple[float, float]:
    return float(a.min()), float(a.max())


def _in_radian_range(lo: float, hi: float, tol: float = RAD_TOLERANCE) -> bool:
    sym = lo >= -np.pi - tol and hi <= np.pi + tol
    pos = lo >= -tol and hi <= 2 * np.pi + tol
    return bool(sym or pos)


def _is_integer_valued(a: np.ndarray) -> bool:
    if np.issubdtype(a.dtype, np.integer):
        return True
    step = max(1, a.size // 1_000_000)
    # every step-th value in C order, without a C-ordered copy of a Fortran-ordered array
    sample = a[np.unravel_index(np.arange(0, a.size, step), a.shape)] if a.ndim > 1 else a[::step]
    return bool(np.all(sample == np.round(sample)))


def _match_integer_range(lo: float, hi: float, coverage: float = 0.5) -> str | None:
    """Smallest nominal range containing ``[lo, hi]`` (±1 level) that the data cover to ``coverage``."""
    best, best_period = None, np.inf
    for name, (low, period) in PHASE_RANGES.items():
        if lo >= low - 1.0 and hi <= low + period + 1.0 and (hi - lo) >= coverage * period:
            if period < best_period:
                best, best_period = name, period
    return best


def _normalise_units(units) -> str | None:
    if units is None:
        return None
    u = str(units).strip().lower()
    if u in _RAD_NAMES:
        return "rad"
    if u in _ARBITRARY_NAMES:
        return "arbitrary"
    raise ValueError(
        f"unrecognised phase Units {units!r}: BIDS phase images use 'rad' or 'arbitrary'"
    )


def _check_phase(phase) -> np.ndarray:
    a = np.asarray(phase)
    if np.iscomplexobj(a):
        raise ValueError("phase must be real-valued; split complex data with mag_phase_from_real_imag")
    as_float_volume(a, "phase", ndim=(1, 2, 3, 4, 5))  # shape / emptiness / NaN checks
    return a


def _classify(a: np.ndarray, units: str | None) -> tuple[str, str | None]:
    lo, hi = _finite_range(a)
    if hi <= lo:
        raise ValueError(f"phase is constant ({lo}); it carries no phase information")
    rad_like = _in_radian_range(lo, hi)
    integer = _is_integer_valued(a)
    nominal = _match_integer_range(lo, hi) if integer else None
    if units == "rad":
        if not rad_like:
            raise ValueError(
                f"phase Units are 'rad' but values span [{lo:.4g}, {hi:.4g}], more than one 2*pi "
                "cycle; unwrapped phase is not accepted here (pass units='arbitrary' if the sidecar is wrong)"
            )
        return "rad", None
    if units == "arbitrary":
        if rad_like and not integer:
            return "rad", None  # float data already in radians, labelled 'arbitrary'
        if nominal is not None:
            return "integer", nominal
        return "arbitrary", None
    # no sidecar information: decide from the values
    if rad_like:
        return "rad", None
    if nominal is not None:
        return "integer", nominal
    if integer:
        return "arbitrary", None
    raise ValueError(
        f"phase values span [{lo:.4g}, {hi:.4g}]: neither radians (one 2*pi cycle) nor an integer "
        "scanner range; pass units='arbitrary' to rescale min..max to -pi..pi, or check that this is "
        "wrapped phase (unwrapped phase and field maps are not accepted)"
    )


def detect_phase_units(phase, units: str | None = None) -> str:
    """Phase encoding: ``"rad"``, ``"integer"`` (a nominal scanner range) or ``"arbitrary"`` (min/max).

    ``units`` is the BIDS sidecar ``Units`` value (``"rad"`` or ``"arbitrary"``); without it the value
    range decides: within one 2*pi cycle (tolerance 0.1*pi per end) -> radians; integer values in a
    range of :data:`PHASE_RANGES` -> ``"integer"``; other integer data -> ``"arbitrary"``.

    Raises ValueError for constant or non-finite phase, an unknown ``units`` string, ``units="rad"``
    with a range beyond 2*pi, and non-integer data outside a 2*pi range without ``units``
    (e.g. unwrapped phase or a field map).
    """
    a = _check_phase(phase)
    return _classify(a, _normalise_units(units))[0]


def scale_phase_to_rad(phase, units: str | None = None) -> np.ndarray:
    """Scale phase of any recognised encoding to float32 radians in ``[-pi, pi)``.

    - radians: wrapped only (values already in ``[-pi, pi)`` are returned unchanged);
    - nominal integer range ``(low, period)``: ``2*pi*(x - low)/period - pi`` (exact, e.g. Siemens
      ``x*pi/4096``; GE milliradians ``x/1000``);
    - arbitrary: ``2*pi*(x - min)/(max - min) - pi`` (MRT ``readphase`` / QSM.rs convention; the
      maximum lands on ``pi`` and wraps to ``-pi``).

    See :func:`detect_phase_units` for the decision and the errors raised.
    """
    a = _check_phase(phase)
    kind, nominal = _classify(a, _normalise_units(units))
    if kind == "rad":
        return wrap_to_pi(a)
    if kind == "integer":
        low, period = PHASE_RANGES[nominal]
    else:
        low, hi = _finite_range(a)
        period = hi - low
    scaled = (a.astype(np.float64) - low) * (2 * np.pi / period) - np.pi
    return wrap_to_pi(scaled)


# --------------------------------------------------------------------------------------------------
# complex helpers
# --------------------------------------------------------------------------------------------------


def to_complex(magnitude, phase_rad) -> np.ndarray:
    """Complex64 signal ``M * exp(i*phi)`` from magnitude and phase (rad) of the same shape."""
    mag = as_float_volume(magnitude, "magnitude", ndim=(1, 2, 3, 4, 5))
    ph = as_float_volume(phase_rad, "phase_rad", ndim=(1, 2, 3, 4, 5))
    if mag.shape != ph.shape:
        raise ValueError(f"magnitude has shape {mag.shape} but phase_rad has shape {ph.shape}")
    out = np.empty(ph.shape, np.complex64)
    out.real = np.cos(ph)
    out.imag = np.sin(ph)
    out *= mag
    return out


def mag_phase_from_real_imag(real, imag) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude and phase (rad, ``[-pi, pi)``) as float32 from real and imaginary images."""
    re = as_float_volume(real, "real", ndim=(1, 2, 3, 4, 5))
    im = as_float_volume(imag, "imag", ndim=(1, 2, 3, 4, 5))
    if re.shape != im.shape:
        raise ValueError(f"real has shape {re.shape} but imag has shape {im.shape}")
    return np.hypot(re, im).astype(np.float32), wrap_to_pi(np.arctan2(im, re))


def hermitian_product(z1, z2, channel_axis: int | None = None) -> np.ndarray:
    """Hermitian inner product ``sum_c z2 * conj(z1)`` (complex64; Eckstein et al., MRM 2018).

    Its angle is the phase evolution from the echo of ``z1`` to the echo of ``z2`` with channel
    phase offsets cancelled; ``channel_axis`` sums over coils (``None``: combined data, no sum).
    """
    a = np.asarray(z1)
    b = np.asarray(z2)
    if a.shape != b.shape:
        raise ValueError(f"z1 has shape {a.shape} but z2 has shape {b.shape}")
    if a.size == 0:
        raise ValueError("z1 is empty")
    h = (b.astype(np.complex64, copy=False) * np.conj(a.astype(np.complex64, copy=False))).astype(
        np.complex64, copy=False
    )
    if not np.all(np.isfinite(h.view(np.float32))):
        raise ValueError("z1 or z2 contains NaN or infinite values")
    if channel_axis is not None:
        h = h.sum(axis=channel_axis, dtype=np.complex64)
    return h


def combine_echoes_complex(magnitude_4d, phase_rad_4d) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude-weighted mean phase step between consecutive echoes (equal spacing), float32 3D.

    ``H = sum_e I[e+1] * conj(I[e])``; returns ``(sqrt(|H| / (n_e - 1)), angle(H))``. The angle is
    the phase accrued per echo spacing (rad, wrapped), a robust quick field estimate that needs no
    offset removal (phase offsets cancel); the magnitude is a combined weight. Needs >= 2 echoes.
    """
    mag = as_float_volume(magnitude_4d, "magnitude_4d", ndim=4)
    ph = as_float_volume(phase_rad_4d, "phase_rad_4d", ndim=4)
    if mag.shape != ph.shape:
        raise ValueError(f"magnitude_4d has shape {mag.shape} but phase_rad_4d has shape {ph.shape}")
    n_e = ph.shape[3]
    if n_e < 2:
        raise ValueError(f"phase_rad_4d has {n_e} echo; combining echo differences needs at least 2")
    h = np.zeros(ph.shape[:3], np.complex64)
    for e in range(n_e - 1):
        d = ph[..., e + 1] - ph[..., e]
        w = mag[..., e + 1] * mag[..., e]
        h.real += w * np.cos(d)
        h.imag += w * np.sin(d)
    return np.sqrt(np.abs(h) / np.float32(n_e - 1)).astype(np.float32), wrap_to_pi(np.angle(h))
