"""Phase unwrapping: ROMEO region growing and Laplacian (Poisson) unwrapping.

ROMEO: Dymerska B, Eckstein K, et al. *Phase unwrapping with a rapid opensource minimum spanning tree
algorithm (ROMEO).* MRM 2021;85:2294-2308. Quality-guided region growing (Prim's algorithm on a
256-bin bucket queue) over the 6-neighbour graph; edge weights combine phase coherence, phase
gradient coherence (second echo), phase linearity and magnitude criteria. Multi-echo data are
unwrapped in "template" mode: one echo spatially, the others temporally (TE ratios).

Laplacian: Schofield MA, Zhu Y. *Fast phase unwrapping algorithm for interferometric applications.*
Opt Lett 2003;28:1194, in the discrete-consistent form (Laplacian built from wrapped first
differences, exact for the discrete Laplacian of the true phase when neighbouring true differences
are below pi) solved spectrally with a DCT (Neumann) or FFT (periodic) Poisson solver.

Conventions: phase in radians, arrays indexed (x, y, z[, echo]) like NIfTI data, float32 in and out,
echo times in seconds (only their ratios matter). Voxels outside ``mask`` are never unwrapped by
ROMEO: they are returned unchanged (the wrapped input), so the output is 2*pi-congruent with the
input everywhere. Laplacian unwrapping returns 0 outside the mask.

Registry entries (``UNWRAP``) share the signature
``f(phase_rad, magnitude=None, mask=None, echo_times_s=None, voxel_size_mm=(1, 1, 1), **kw)`` with
3D (one echo) or 4D (x, y, z, echo) ``phase_rad``; see :func:`romeo` and :func:`laplacian`.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.fft as sfft

from qsmprep.qsm import fft as _fft
from qsmprep.qsm.arrays import as_echo_times, as_float_volume, as_mask, as_voxel_size, same_shape
from qsmprep.qsm.registry import UNWRAP

__all__ = [
    "romeo_unwrap",
    "romeo_unwrap_multiecho",
    "romeo_voxel_quality",
    "romeo_edge_weights",
    "laplacian_unwrap",
    "wrap_to_pi",
    "romeo",
    "laplacian",
]

TWO_PI = 2.0 * np.pi
#: Number of quantisation levels of the ROMEO edge weights (bin 0 = invalid edge).
NBINS = 256

# Weight flags (bit mask): the edge-weight terms of ROMEO (Dymerska et al., MRM 2021, Table 1).
_PC, _PGC, _PL, _MC, _MW, _MW2 = 1, 2, 4, 8, 16, 32
_FLAG_NAMES = {"pc": _PC, "pgc": _PGC, "pl": _PL, "mc": _MC, "mw": _MW, "mw2": _MW2}
_WEIGHT_SETS = {
    "romeo": _PC | _PGC | _PL | _MC,  # ROMEO.jl library default
    "romeo2": _PC | _MC,
    "romeo3": _PC | _PGC | _MC,
    "romeo4": _PC | _PGC | _PL | _MC,
    "romeo6": _PC | _PGC | _PL | _MC | _MW | _MW2,
}


def wrap_to_pi(x):
    """Wrap radians into [-pi, pi) (float32 for float32 input)."""
    x = np.asarray(x)
    two_pi = x.dtype.type(TWO_PI) if np.issubdtype(x.dtype, np.floating) else TWO_PI
    return x - two_pi * np.floor(x / two_pi + 0.5)


# --------------------------------------------------------------------------------------------------
# numba kernels (flat C-order indexing: i = (x*ny + y)*nz + z; edge id e = 3*i + d for the edge from
# voxel i to its +d neighbour, d = 0, 1, 2 for x, y, z)
# --------------------------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _wrap1(x):
    """Single wrap into [-pi, pi] of a value in [-3pi, 3pi] (inputs are pre-wrapped phases)."""
    if x > np.pi:
        return x - TWO_PI
    if x < -np.pi:
        return x + TWO_PI
    return x


@numba.njit(cache=True, inline="always")
def _edge_weight(P, P2, M, i, j, h, k, te_ratio, maxmag, flags):
    """Unquantised ROMEO weight in (0, 1] of the edge i -> j; h = i - s, k = j + s (-1: outside).

    ``P`` and ``P2`` must be wrapped into [-pi, pi] (single wraps suffice then).
    """
    pi_ = np.float64(P[i])
    pj = np.float64(P[j])
    d = _wrap1(pi_ - pj)
    w = 1.0
    if flags & 1:  # phase coherence
        w *= 0.1 + 0.9 * (1.0 - abs(d) / np.pi)
    if flags & 2:  # phase gradient coherence with the second echo
        d2 = _wrap1(np.float64(P2[i]) - np.float64(P2[j]))
        v = 1.0 - abs(d - d2 * te_ratio)
        if v < 0.0:
            v = 0.0
        w *= 0.1 + 0.9 * v
    if flags & 4:  # phase linearity (second differences on both sides of the edge)
        if h < 0 or k < 0:
            v = 0.9
        else:
            a = abs(_wrap1(_wrap1(np.float64(P[h]) - pi_) - d))  # P[h] - 2P[i] + P[j]
            b = abs(_wrap1(d + _wrap1(np.float64(P[k]) - pj)))  # P[i] - 2P[j] + P[k]
            v = max(0.0, 1.0 - a / 2.0) * max(0.0, 1.0 - b / 2.0)
        w *= 0.1 + 0.9 * v
    if flags & 56:
        mi = min(np.float64(M[i]), np.float64(M[j]))
        ma = max(np.float64(M[i]), np.float64(M[j]))
        if flags & 8:  # magnitude coherence
            v = (mi / ma) ** 2 if ma > 0.0 else 0.0
            w *= 0.1 + 0.9 * v
        if flags & 16:  # magnitude weight (penalises dark voxels)
            v = 0.5 + 0.5 * min(1.0, mi / (0.5 * maxmag))
            w *= 0.1 + 0.9 * v
        if flags & 32:  # magnitude weight 2 (penalises very bright voxels, e.g. flow)
            v = 0.5 + 0.5 * min(1.0, (0.5 * maxmag) / ma) if ma > 0.0 else 1.0
            w *= 0.1 + 0.9 * v
    return w


@numba.njit(cache=True, inline="always")
def _quantise(w):
    b = np.int64(np.round((1.0 - w) * 255.0))
    if b < 1:
        b = 1
    elif b > 255:
        b = 255
    return np.uint8(b)


@numba.njit(cache=True, parallel=True)
def _weights_u8(P, P2, M, mask, nx, ny, nz, te_ratio, maxmag, flags, out):
    """Quantised weights of the +x, +y, +z edges of every mask voxel into ``out[3*i + d]``.

    Bin 1 = best, 255 = worst, 0 = invalid (edge leaves the volume or the mask).
    """
    sx = ny * nz
    for x in numba.prange(nx):
        for y in range(ny):
            base = (x * ny + y) * nz
            for z in range(nz):
                i = base + z
                if not mask[i]:
                    continue
                if x + 1 < nx and mask[i + sx]:
                    j = i + sx
                    h = i - sx if x >= 1 else -1
                    k = j + sx if x + 2 < nx else -1
                    out[3 * i] = _quantise(_edge_weight(P, P2, M, i, j, h, k, te_ratio, maxmag, flags))
                if y + 1 < ny and mask[i + nz]:
                    j = i + nz
                    h = i - nz if y >= 1 else -1
                    k = j + nz if y + 2 < ny else -1
                    out[3 * i + 1] = _quantise(_edge_weight(P, P2, M, i, j, h, k, te_ratio, maxmag, flags))
                if z + 1 < nz and mask[i + 1]:
                    j = i + 1
                    h = i - 1 if z >= 1 else -1
                    k = j + 1 if z + 2 < nz else -1
                    out[3 * i + 2] = _quantise(_edge_weight(P, P2, M, i, j, h, k, te_ratio, maxmag, flags))


@numba.njit(cache=True, parallel=True)
def _quality(P, P2, M, mask, nx, ny, nz, te_ratio, maxmag, flags, out):
    """Sum of the unquantised weights of the 6 edges of each mask voxel, divided by 6, into ``out``."""
    for x in numba.prange(nx):
        for y in range(ny):
            base = (x * ny + y) * nz
            for z in range(nz):
                i = base + z
                if not mask[i]:
                    continue
                acc = 0.0
                for d in range(3):
                    if d == 0:
                        c, n, s = x, nx, ny * nz
                    elif d == 1:
                        c, n, s = y, ny, nz
                    else:
                        c, n, s = z, nz, 1
                    if c + 1 < n and mask[i + s]:  # edge i -> i + s
                        j = i + s
                        h = i - s if c >= 1 else -1
                        k = j + s if c + 2 < n else -1
                        acc += _edge_weight(P, P2, M, i, j, h, k, te_ratio, maxmag, flags)
                    if c >= 1 and mask[i - s]:  # edge i - s -> i
                        g = i - s
                        h = g - s if c >= 2 else -1
                        k = i + s if c + 1 < n else -1
                        acc += _edge_weight(P, P2, M, g, i, h, k, te_ratio, maxmag, flags)
                out[i] = acc / 6.0


@numba.njit(cache=True)
def _seed_order(weights, mask):
    """Mask voxels sorted by the sum of their 3 edge bins (invalid counted as 255), best first."""
    n = mask.size
    counts = np.zeros(3 * 255 + 2, np.int64)
    score = np.empty(n, np.int16)
    nmask = 0
    for i in range(n):
        if mask[i]:
            s = 0
            for d in range(3):
                b = np.int64(weights[3 * i + d])
                s += b if b > 0 else 255
            score[i] = s
            counts[s + 1] += 1
            nmask += 1
    for s in range(1, counts.size):
        counts[s] += counts[s - 1]
    order = np.empty(nmask, np.int64)
    for i in range(n):
        if mask[i]:
            s = score[i]
            order[counts[s]] = i
            counts[s] += 1
    return order


@numba.njit(cache=True, inline="always")
def _push(item, b, buf, start, top):
    buf[start[b] + top[b]] = item
    top[b] += 1


@numba.njit(cache=True, inline="always")
def _push_edges(v, weights, visited, strides, buf, start, top, minbin):
    """Enqueue the valid edges from visited voxel v to unvisited neighbours; return the minimum bin.

    Queue items are ``new << 3 | dir``: dir 0..2 -> old = new - stride[dir], 3..5 -> old = new + stride[dir-3].
    """
    for d in range(3):
        s = strides[d]
        b = weights[3 * v + d]
        if b > 0:
            u = v + s
            if visited[u] == 0:
                _push((u << 3) | d, b, buf, start, top)
                if b < minbin:
                    minbin = b
        u = v - s
        if u >= 0:
            b = weights[3 * u + d]
            if b > 0 and visited[u] == 0:
                _push((u << 3) | (d + 3), b, buf, start, top)
                if b < minbin:
                    minbin = b
    return minbin


@numba.njit(cache=True)
def _grow_unwrap(P, weights, order, strides, P2, te_ratio, use_p2, visited, buf):
    """ROMEO region growing (Prim with a 256-bin bucket queue, LIFO per bin) in place on flat ``P``.

    Seeds are taken from ``order`` (best first); a new seed is started only when the queue is
    exhausted, i.e. once per connected component of valid edges. Every edge is enqueued at most once,
    so bin b needs at most (number of edges in bin b) slots of ``buf`` (size: number of valid edges).
    ``visited`` (uint8) is set to 1 for every voxel reached. Returns the number of seeds.
    """
    counts = np.zeros(NBINS + 1, np.int64)
    for e in range(weights.size):
        counts[np.int64(weights[e]) + 1] += 1
    start = np.zeros(NBINS, np.int64)  # invalid bin 0 gets no slots
    for b in range(2, NBINS):
        start[b] = start[b - 1] + counts[b]  # counts[b] = number of edges in bin b - 1
    top = np.zeros(NBINS, np.int64)
    nseeds = 0
    ptr = 0
    two_pi = TWO_PI
    while True:
        while ptr < order.size and visited[order[ptr]] != 0:
            ptr += 1
        if ptr == order.size:
            break
        s = order[ptr]
        nseeds += 1
        visited[s] = 1
        # seed phase: consistent with the second echo when available, else wrapped to [-pi, pi]
        p = np.float64(P[s])
        if use_p2:
            p2 = np.float64(P2[s])
            best = np.inf
            best_o1 = 0
            for o1 in range(-2, 3):
                for o2 in range(-1, 2):
                    c = abs((p + two_pi * o1) - (p2 + two_pi * o2) * te_ratio) + (abs(o1) + abs(o2)) / 100.0
                    if c < best:
                        best = c
                        best_o1 = o1
            p += two_pi * best_o1
        P[s] = p
        minbin = _push_edges(s, weights, visited, strides, buf, start, top, NBINS)
        while True:
            while minbin < NBINS and top[minbin] == 0:
                minbin += 1
            if minbin >= NBINS:
                break
            top[minbin] -= 1
            item = buf[start[minbin] + top[minbin]]
            new = item >> 3
            if visited[new] != 0:
                continue
            dd = item & 7
            old = new - strides[dd] if dd < 3 else new + strides[dd - 3]
            pn = np.float64(P[new])
            P[new] = pn - two_pi * np.round((pn - np.float64(P[old])) / two_pi)
            visited[new] = 1
            minbin = _push_edges(new, weights, visited, strides, buf, start, top, minbin)
    return nseeds


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _bbox(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` voxels (clipped to the array)."""
    sl = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(np.any(mask, axis=other))
        lo = max(int(idx[0]) - margin, 0)
        hi = min(int(idx[-1]) + 1 + margin, mask.shape[ax])
        sl.append(slice(lo, hi))
    return tuple(sl)


def _weight_flags(weights, has_mag: bool, has_p2: bool) -> int:
    """Bit mask of active weights; criteria whose input is missing are dropped (as in ROMEO.jl)."""
    if isinstance(weights, str):
        key = weights.lower()
        if key == "auto":  # RomeoApp CLI default: romeo3 with magnitude, romeo4 without
            flags = _WEIGHT_SETS["romeo3"] if has_mag else _WEIGHT_SETS["romeo4"]
        elif key in _WEIGHT_SETS:
            flags = _WEIGHT_SETS[key]
        elif key in _FLAG_NAMES:
            flags = _FLAG_NAMES[key]
        else:
            raise ValueError(
                f"unknown ROMEO weights {weights!r}; use 'auto', one of {sorted(_WEIGHT_SETS)} "
                f"or a collection of {sorted(_FLAG_NAMES)}"
            )
    else:
        flags = 0
        for name in weights:
            key = str(name).lower()
            if key not in _FLAG_NAMES:
                raise ValueError(f"unknown ROMEO weight {name!r}; choose from {sorted(_FLAG_NAMES)}")
            flags |= _FLAG_NAMES[key]
    if not has_mag:
        flags &= ~(_MC | _MW | _MW2)
    if not has_p2:
        flags &= ~_PGC
    return int(flags)


def _prepare(phase_rad, magnitude, mask, phase2_rad, te_ratio, weights, margin=1):
    """Validate inputs, crop to the mask bounding box; return flat C-contiguous kernel arguments."""
    phase = as_float_volume(phase_rad, "phase_rad", ndim=3)
    shape = phase.shape
    if mask is None:
        m = np.ones(shape, dtype=bool)
    else:
        m = as_mask(mask, "mask", shape=shape)
    crop = _bbox(m, margin)
    has_mag = magnitude is not None
    has_p2 = phase2_rad is not None
    mag = None
    if has_mag:
        mag = as_float_volume(magnitude, "magnitude", ndim=3)
        same_shape(mag, phase, "magnitude", "phase_rad")
        if np.any(mag[m] < 0):
            raise ValueError("magnitude must be non-negative")
    p2 = None
    ratio = 1.0
    if has_p2:
        p2 = as_float_volume(phase2_rad, "phase2_rad", ndim=3)
        same_shape(p2, phase, "phase2_rad", "phase_rad")
        if te_ratio is None:
            raise ValueError("te_ratio (TE of phase_rad / TE of phase2_rad) is needed with phase2_rad")
        ratio = float(te_ratio)
        if not np.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"te_ratio must be positive and finite, got {te_ratio}")
    flags = _weight_flags(weights, has_mag, has_p2)
    if flags == 0:
        raise ValueError("no ROMEO weight is active for the given inputs")
    empty = np.zeros(1, np.float32)
    mc = np.ascontiguousarray(m[crop])
    # private pre-wrapped copies (the weights use single wraps; P is unwrapped in place)
    P = np.ascontiguousarray(wrap_to_pi(phase[crop]), dtype=np.float32)
    P2 = np.ascontiguousarray(wrap_to_pi(p2[crop]), dtype=np.float32).reshape(-1) if has_p2 else empty
    if has_mag:
        M = np.ascontiguousarray(mag[crop]).reshape(-1)
        vals = M[mc.reshape(-1)]
        maxmag = float(np.percentile(vals, 95)) if vals.size else 0.0
        if maxmag <= 0:
            maxmag = float(vals.max()) if vals.size and vals.max() > 0 else 1.0
    else:
        M, maxmag = empty, 1.0
    return dict(
        phase=phase, mask=m, crop=crop, P=P, Pflat=P.reshape(-1), P2=P2, M=M, maskflat=mc.reshape(-1),
        cshape=P.shape, ratio=ratio, maxmag=maxmag, flags=flags, has_p2=has_p2,
    )


def _quantised_weights(a) -> np.ndarray:
    nx, ny, nz = a["cshape"]
    w = np.zeros(3 * nx * ny * nz, np.uint8)
    _weights_u8(a["Pflat"], a["P2"], a["M"], a["maskflat"], nx, ny, nz, a["ratio"], a["maxmag"], a["flags"], w)
    return w


def romeo_edge_weights(phase_rad, magnitude=None, mask=None, phase2_rad=None, te_ratio=None, weights="auto"):
    """Quantised ROMEO edge weights, uint8 array (x, y, z, 3) for the +x, +y, +z edges.

    Bin 1 is the best edge, 255 the worst, 0 an invalid edge (leaving the volume or the mask).
    Same arguments as :func:`romeo_unwrap`. Mainly for inspection and tests.
    """
    a = _prepare(phase_rad, magnitude, mask, phase2_rad, te_ratio, weights)
    w = _quantised_weights(a).reshape(a["cshape"] + (3,))
    out = np.zeros(a["phase"].shape + (3,), np.uint8)
    out[a["crop"]] = w
    return out


# --------------------------------------------------------------------------------------------------
# public ROMEO API
# --------------------------------------------------------------------------------------------------


def romeo_unwrap(
    phase_rad,
    magnitude=None,
    mask=None,
    phase2_rad=None,
    te_ratio=None,
    weights="auto",
    global_correction: bool = False,
) -> np.ndarray:
    """Spatially unwrap one 3D phase image (rad) with ROMEO (Dymerska et al., MRM 2021).

    Parameters
    ----------
    phase_rad : (x, y, z) wrapped phase in radians.
    magnitude : optional (x, y, z) magnitude (enables the magnitude coherence weight).
    mask : optional (x, y, z) boolean mask; only voxels in the mask are unwrapped, voxels outside are
        returned unchanged (wrapped input). ``None``: whole volume.
    phase2_rad : optional wrapped phase of a second echo (x, y, z), feeding the phase gradient
        coherence weight and the seed correction. Assumes phase offsets were removed.
    te_ratio : TE(phase_rad) / TE(phase2_rad); required with ``phase2_rad``.
    weights : ``"auto"`` (ROMEO CLI default: pc, pgc, mc with magnitude; pc, pgc, pl without), a
        named set ``"romeo"`` (pc, pgc, pl, mc), ``"romeo2"``, ``"romeo3"``, ``"romeo4"``,
        ``"romeo6"``, or a collection of ``{"pc", "pgc", "pl", "mc", "mw", "mw2"}``. Criteria whose
        input is missing are dropped.
    global_correction : shift the result by ``-2*pi*median(round(phi/2pi))`` over the mask (ROMEO
        ``correct_global``) so that its median lies in (-pi, pi].

    Each connected component of the mask is grown from its own seed (lowest summed edge bins). The
    seed is wrapped to [-pi, pi) or, with a second echo, shifted by 2*pi*k to agree with it.

    Returns
    -------
    float32 (x, y, z) unwrapped phase (rad), 2*pi-congruent with the input.
    """
    a = _prepare(phase_rad, magnitude, mask, phase2_rad, te_ratio, weights)
    w = _quantised_weights(a)
    order = _seed_order(w, a["maskflat"])
    ny, nz = a["cshape"][1], a["cshape"][2]
    strides = np.array([ny * nz, nz, 1], np.int64)
    n = a["Pflat"].size
    visited = np.zeros(n, np.uint8)
    buf = np.empty(np.count_nonzero(w), np.int32 if 8 * n < 2**31 else np.int64)
    P = a["Pflat"]
    _grow_unwrap(P, w, order, strides, a["P2"], a["ratio"], a["has_p2"], visited, buf)
    out = a["phase"].copy()
    cm = a["maskflat"].reshape(a["cshape"])
    sub = out[a["crop"]]
    sub[cm] = P.reshape(a["cshape"])[cm]
    if global_correction:
        vals = out[a["mask"]]
        k = np.median(np.round(vals / TWO_PI))
        out[a["mask"]] = vals - np.float32(TWO_PI * k)
    return out


def _template_k(U_t, P_others, ratios, k0, max_shift=3, max_samples=200_000):
    """Integer 2*pi shift of the template that best agrees with the other echoes (ties -> ``k0``)."""
    step = max(1, U_t.size // max_samples)
    u = U_t[::step].astype(np.float64)
    cands = np.arange(k0 - max_shift, k0 + max_shift + 1)
    costs = np.zeros(cands.size)
    for p, r in zip(P_others, ratios):
        pe = p[::step].astype(np.float64)
        for c, k in enumerate(cands):
            costs[c] += np.median(np.abs(wrap_to_pi(pe - (u + TWO_PI * k) * r)))
    costs /= max(len(P_others), 1)
    ok = costs <= costs.min() + 0.05
    best = cands[ok][np.argmin(np.abs(cands[ok] - k0))]
    return int(best)


def romeo_unwrap_multiecho(
    phase_rad_4d,
    echo_times_s,
    magnitude_4d=None,
    mask=None,
    template_echo: int = 0,
    global_correction: bool = True,
    weights="auto",
) -> np.ndarray:
    """Unwrap multi-echo phase (x, y, z, echo) in ROMEO template mode (Dymerska et al., MRM 2021).

    Echo ``template_echo`` (0-based) is unwrapped spatially with :func:`romeo_unwrap`, using the
    neighbouring echo (template + 1 for the first echo, template - 1 otherwise) as second echo and the
    template's magnitude. The other echoes are unwrapped temporally, walking outward from the template:
    ``ref = U[e_ref] * TE_e / TE_ref``, ``U_e = P_e - 2*pi*round((P_e - ref) / 2*pi)``. Requires that
    echo-independent phase offsets were removed (MCPC-3D-S), else use per-echo spatial unwrapping.

    Global correction (``global_correction=True``), applied to the template before the temporal step:
    the template is shifted by 2*pi*k where k minimises the mean over the other echoes of
    ``median_mask |wrap(P_e - (U_t + 2*pi*k) * TE_e / TE_t)|`` (temporal consistency). When several k
    fit equally well (e.g. TEs that are integer multiples of TE_t, where the 2*pi ambiguity cannot be
    resolved from the data) the one closest to ROMEO's ``correct_global`` choice,
    ``-median(round(U_t / 2*pi))`` (template median in (-pi, pi]), is taken.

    Voxels outside ``mask`` are returned unchanged (wrapped input). Returns float32 (x, y, z, echo).
    """
    phase = as_float_volume(phase_rad_4d, "phase_rad_4d", ndim=4)
    n_e = phase.shape[3]
    if n_e < 2:
        raise ValueError(
            f"phase_rad_4d has {n_e} echo; multi-echo unwrapping needs at least 2 (use romeo_unwrap)"
        )
    te = as_echo_times(echo_times_s, n_echoes=n_e, min_echoes=2)
    t = int(template_echo)
    if not 0 <= t < n_e:
        raise ValueError(f"template_echo must be in [0, {n_e - 1}], got {template_echo}")
    shape = phase.shape[:3]
    mag = None
    if magnitude_4d is not None:
        mag = as_float_volume(magnitude_4d, "magnitude_4d", ndim=4)
        if mag.shape != phase.shape:
            raise ValueError(f"magnitude_4d has shape {mag.shape} but phase_rad_4d has shape {phase.shape}")
    m = np.ones(shape, dtype=bool) if mask is None else as_mask(mask, "mask", shape=shape)
    p2 = t + 1 if t == 0 else t - 1
    if te[p2] == te[t]:
        raise ValueError("the template echo and its neighbour have the same echo time")
    U_t = romeo_unwrap(
        phase[..., t],
        None if mag is None else mag[..., t],
        m,
        phase2_rad=phase[..., p2],
        te_ratio=te[t] / te[p2],
        weights=weights,
    )
    if mask is None:  # whole volume: (n_voxels, n_echoes) copy, no gather
        pm = phase.reshape(-1, n_e).copy()
        ut = U_t.reshape(-1)
    else:
        pm = phase[m]  # (n_mask, n_echoes): one gather of all echoes
        ut = U_t[m]
    others = [e for e in range(n_e) if e != t]
    if global_correction:
        k0 = -int(np.median(np.round(ut / TWO_PI)))
        k = _template_k(ut, [pm[:, e] for e in others], [te[e] / te[t] for e in others], k0)
        ut = ut + np.float32(TWO_PI * k)
    pm[:, t] = ut
    two_pi = np.float32(TWO_PI)
    for e in list(range(t + 1, n_e)) + list(range(t - 1, -1, -1)):
        e_ref = e - 1 if e > t else e + 1
        ref = pm[:, e_ref] * np.float32(te[e] / te[e_ref])
        pe = pm[:, e]
        pm[:, e] = pe - two_pi * np.round((pe - ref) / two_pi)
    if mask is None:
        return pm.reshape(phase.shape)
    out = phase.copy(order="K")  # keep the layout (Fortran as loaded from NIfTI: no transposing copy)
    out[m] = pm
    return out


def romeo_voxel_quality(
    phase_rad, magnitude=None, phase2_rad=None, te_ratio=None, mask=None, weights="romeo"
) -> np.ndarray:
    """ROMEO voxel quality map in [0, 1] (Dymerska et al., MRM 2021; ROMEO.jl ``voxelquality``).

    Unquantised edge weights (``weights`` as in :func:`romeo_unwrap`, default ROMEO.jl's library set
    pc, pgc, pl, mc; missing inputs drop criteria) summed over the 6 edges touching each voxel and
    divided by 6. Edges that leave the volume or the mask count as 0, so voxels at the border get at
    most 5/6; voxels outside the mask get 0. Used for phase-quality masking (threshold e.g. 0.1-0.3).
    Returns float32 (x, y, z).
    """
    a = _prepare(phase_rad, magnitude, mask, phase2_rad, te_ratio, weights)
    nx, ny, nz = a["cshape"]
    q = np.zeros(nx * ny * nz, np.float32)
    _quality(a["Pflat"], a["P2"], a["M"], a["maskflat"], nx, ny, nz, a["ratio"], a["maxmag"], a["flags"], q)
    out = np.zeros(a["phase"].shape, np.float32)
    out[a["crop"]] = q.reshape(a["cshape"])
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Laplacian unwrapping
# --------------------------------------------------------------------------------------------------


def _wrapped_laplacian(phase: np.ndarray, mask: np.ndarray | None, inv_h2: np.ndarray, periodic: bool):
    """Discrete-consistent Laplacian from wrapped first differences (zero flux at borders/mask edge)."""
    lap = np.zeros(phase.shape, np.float32)
    for ax in range(3):
        if periodic:
            diff = wrap_to_pi(np.roll(phase, -1, axis=ax) - phase)  # flux between i and i+1 (cyclic)
            if mask is not None:
                diff *= mask & np.roll(mask, -1, axis=ax)
            diff *= np.float32(inv_h2[ax])
            lap += diff
            lap -= np.roll(diff, 1, axis=ax)
        else:
            diff = wrap_to_pi(np.diff(phase, axis=ax))
            if mask is not None:
                lo = [slice(None)] * 3
                hi = [slice(None)] * 3
                lo[ax] = slice(0, -1)
                hi[ax] = slice(1, None)
                diff *= mask[tuple(lo)] & mask[tuple(hi)]
            diff *= np.float32(inv_h2[ax])
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[ax] = slice(0, -1)
            hi[ax] = slice(1, None)
            lap[tuple(lo)] += diff
            lap[tuple(hi)] -= diff
    return lap


def laplacian_unwrap(phase_rad, voxel_size_mm=(1.0, 1.0, 1.0), mask=None, method: str = "dct") -> np.ndarray:
    """Laplacian phase unwrapping (Schofield & Zhu, Opt Lett 2003), discrete-consistent form.

    The Laplacian of the true phase is computed from wrapped first differences (exact for the 7-point
    discrete Laplacian wherever neighbouring true phase differences are below pi; voxel sizes enter
    as 1/h^2) and the Poisson equation is solved spectrally:

    - ``method="dct"``: Neumann boundary on the array (DCT-II diagonalises the 7-point stencil with
      mirrored borders). Without a mask the result equals the true phase minus its mean when the
      Itoh condition holds everywhere.
    - ``method="fft"``: periodic boundary (differences across the opposite faces are wrapped too).

    With ``mask``, differences that touch a voxel outside the mask are set to zero (zero flux across
    the mask boundary), so noise outside does not leak in; the output is 0 outside the mask. The
    result is NOT 2*pi-congruent with the input: it equals the true phase up to a harmonic function
    (part of the background field is removed) and has zero mean over the array. Returns float32 rad.
    """
    phase = as_float_volume(phase_rad, "phase_rad", ndim=3)
    vs = as_voxel_size(voxel_size_mm)
    m = None if mask is None else as_mask(mask, "mask", shape=phase.shape)
    method = str(method).lower()
    if method not in ("dct", "fft"):
        raise ValueError(f"method must be 'dct' or 'fft', got {method!r}")
    inv_h2 = 1.0 / vs**2
    crop = _bbox(m, 1) if m is not None else tuple(slice(0, n) for n in phase.shape)
    ph = np.ascontiguousarray(phase[crop])
    mc = None if m is None else np.ascontiguousarray(m[crop])
    if mc is not None:
        ph = np.where(mc, ph, np.float32(0))
    lap = _wrapped_laplacian(ph, mc, inv_h2, periodic=(method == "fft"))
    shape = ph.shape
    if method == "dct":
        eig = np.zeros(shape, np.float64)
        for ax, n in enumerate(shape):
            v = (2.0 * np.cos(np.pi * np.arange(n) / n) - 2.0) * inv_h2[ax]
            view = [1, 1, 1]
            view[ax] = n
            eig = eig + v.reshape(view)
        eig[0, 0, 0] = 1.0
        spec = sfft.dctn(lap, type=2, norm="ortho", workers=_fft.FFT_WORKERS)
        spec /= eig.astype(np.float32)
        spec[0, 0, 0] = 0.0
        sol = sfft.idctn(spec, type=2, norm="ortho", workers=_fft.FFT_WORKERS).astype(np.float32)
    else:
        kx, ky, kz = _fft.kspace_coordinates(shape, (1.0, 1.0, 1.0), real=True)
        eig = (
            (2.0 * np.cos(TWO_PI * kx.astype(np.float64)) - 2.0) * inv_h2[0]
            + (2.0 * np.cos(TWO_PI * ky.astype(np.float64)) - 2.0) * inv_h2[1]
            + (2.0 * np.cos(TWO_PI * kz.astype(np.float64)) - 2.0) * inv_h2[2]
        )
        eig[0, 0, 0] = 1.0
        spec = _fft.rfftn(lap)
        spec /= eig.astype(np.float32)
        spec[0, 0, 0] = 0.0
        sol = _fft.irfftn(spec, shape, overwrite=True)
    out = np.zeros(phase.shape, np.float32)
    if mc is not None:
        sol *= mc
    out[crop] = sol
    return out


# --------------------------------------------------------------------------------------------------
# registry entries
# --------------------------------------------------------------------------------------------------


def _romeo_defaults(params: dict, data) -> dict:
    """ROMEO's global correction: on in template mode (several echoes), off for one echo."""
    if params.get("global_correction") is None and data is not None:
        params["global_correction"] = int(data.get("n_echoes", 1)) > 1
    return params


@UNWRAP.register(
    "romeo",
    label="ROMEO",
    description="ROMEO, a quality-guided region-growing unwrapper (template mode: echo 1 spatially, the other "
    "echoes temporally)",
    references=("dymerska2021",),
    defaults=_romeo_defaults,
    ranges={"template_echo": "[0, inf)"},
)
def romeo(phase_rad, magnitude=None, mask=None, echo_times_s=None, voxel_size_mm=(1.0, 1.0, 1.0),
          template_echo: int = 0, global_correction: bool | None = None, weights="auto"):
    """UNWRAP entry: ROMEO. 3D phase -> :func:`romeo_unwrap`; 4D (x, y, z, echo) with >= 2 echoes ->
    :func:`romeo_unwrap_multiecho` (needs ``echo_times_s``; ``template_echo`` 0-based); a 4D array with
    one echo is unwrapped spatially. ``global_correction`` None: on for several echoes, off for one (the
    defaults of the two functions). ``voxel_size_mm`` is accepted for a uniform signature and not used.
    Returns float32 of the input's shape."""
    ph = np.asarray(phase_rad)
    if ph.ndim == 4 and ph.shape[3] > 1:
        if echo_times_s is None:
            raise ValueError("echo_times_s is required to unwrap multi-echo phase with ROMEO")
        gc = True if global_correction is None else bool(global_correction)
        return romeo_unwrap_multiecho(ph, echo_times_s, magnitude, mask, template_echo=template_echo,
                                      global_correction=gc, weights=weights)
    gc = False if global_correction is None else bool(global_correction)
    if ph.ndim == 4:
        mag = None if magnitude is None else np.asarray(magnitude)[..., 0]
        return romeo_unwrap(ph[..., 0], mag, mask, weights=weights, global_correction=gc)[..., None]
    return romeo_unwrap(ph, magnitude, mask, weights=weights, global_correction=gc)


@UNWRAP.register(
    "laplacian",
    label="Laplacian unwrapping",
    description="Laplacian (Poisson) unwrapping of each echo",
    references=("schofield2003",),
    forwards=(laplacian_unwrap,),
)
def laplacian(phase_rad, magnitude=None, mask=None, echo_times_s=None, voxel_size_mm=(1.0, 1.0, 1.0), **kwargs):
    """UNWRAP entry: Laplacian unwrapping (:func:`laplacian_unwrap`), echo by echo for 4D input.
    ``magnitude`` and ``echo_times_s`` are accepted for a uniform signature and not used. The result
    is not 2*pi-congruent with the input (see :func:`laplacian_unwrap`)."""
    ph = np.asarray(phase_rad)
    if ph.ndim == 4:
        return np.stack(
            [laplacian_unwrap(ph[..., e], voxel_size_mm, mask, **kwargs) for e in range(ph.shape[3])], axis=-1
        )
    return laplacian_unwrap(ph, voxel_size_mm, mask, **kwargs)
