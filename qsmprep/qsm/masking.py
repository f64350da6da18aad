"""Brain masks from phase quality and magnitude (QSMxT: Stewart AW et al., MRM 2022).

- :func:`phase_quality_mask`: QSMxT's default two-pass threshold masking (Stewart AW et al., *QSMxT:
  Robust masking and artifact reduction for QSM*, MRM 2022;87:1289) on the ROMEO voxel-quality map
  (Dymerska B et al., MRM 2021;85:2294), scaled 0..100 -> Otsu threshold x factor -> hole filling ->
  erosion. Pass 1 (factor 1.5) is filled; pass 2 (factor 1.3) keeps unreliable voxels out.
- :func:`magnitude_mask`: the same filled-mask procedure on the (RSS-combined) magnitude.
- :func:`robust_mask`: MriResearchTools ``robustmask`` (quantile noise/signal levels, box smoothing,
  limited hole filling).
- :func:`bet_phase_mask`: brain extraction of the magnitude (BET, Smith 2002;
  :mod:`qsmprep.qsm.brain_extraction`) restricted to the voxels of reliable phase (ROMEO quality above
  the Otsu threshold), holes filled: the brain extraction removes scalp, skull and neck, the phase
  quality the unreliable voxels at its border (ISMRM 2024 QSM consensus).

Beyond QSMxT, the largest 26-connected component of the thresholded map is kept by default
(``keep_largest=True``) before filling: Gaussian filling would otherwise bridge a bright scalp across
the dark skull and the hole filling would then swallow the skull.

Registry entries (``MASKING``) share the signature
``f(phase_rad_4d=None, magnitude_4d=None, echo_times_s=None, voxel_size_mm=(1, 1, 1), **kw) -> bool``
and are named ``"phase"``, ``"magnitude"``, ``"robust"``, ``"bet"`` and ``"bet-phase"``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from qsmprep.qsm.arrays import as_echo_times, as_float_volume, as_mask
from qsmprep.qsm.brain_extraction import bet_mask
from qsmprep.qsm.registry import MASKING

__all__ = [
    "BET_PHASE_QUALITY_PARAMS",
    "otsu_threshold",
    "gaussian_threshold",
    "threshold_mask",
    "fill_small_holes",
    "fill_holes",
    "gaussian_fill",
    "erode_mask",
    "erode_mask_mm",
    "dilate_mask",
    "largest_component",
    "robust_mask",
    "phase_quality_map",
    "phase_quality_mask",
    "magnitude_mask",
    "bet_phase_mask",
    "MAGNITUDE_MASKING",
]

_CROSS = ndi.generate_binary_structure(3, 1)  # 6-connectivity
_CUBE = ndi.generate_binary_structure(3, 3)  # 26-connectivity


def _finite_values(values, name: str = "values") -> np.ndarray:
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if v.size == 0:
        raise ValueError(f"{name} is empty")
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError(f"{name} has no finite value")
    return v


# --------------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------------


def otsu_threshold(values, nbins: int = 256) -> float:
    """Otsu's threshold (IEEE Trans SMC 1979) of the finite ``values``: the bin centre that maximises the
    between-class variance of a ``nbins`` histogram (same convention as ``skimage.filters.threshold_otsu``:
    foreground is ``values > threshold``)."""
    v = _finite_values(values)
    nbins = int(nbins)
    if nbins < 2:
        raise ValueError(f"nbins must be >= 2, got {nbins}")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        raise ValueError(f"all values are equal ({lo}); no threshold separates them")
    hist, edges = np.histogram(v, bins=nbins, range=(lo, hi))
    hist = hist.astype(np.float64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        m1 = np.cumsum(hist * centres) / w1
        m2 = (np.cumsum((hist * centres)[::-1]) / w2[::-1])[::-1]
    var12 = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    var12 = np.nan_to_num(var12, nan=-1.0)
    return float(centres[int(np.argmax(var12))])


def gaussian_threshold(values) -> float:
    """QSMxT "gaussian" threshold (after Balan AGR et al., 2012): Freedman-Diaconis histogram (density),
    a normal pdf with the data mean/std; the threshold is the bin where ``pdf - hist`` is largest among
    bins with ``hist < pdf``."""
    v = _finite_values(values)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        raise ValueError(f"all values are equal ({lo}); no threshold separates them")
    q25, q75 = np.percentile(v, [25, 75])
    width = 2.0 * (q75 - q25) / np.cbrt(v.size)
    nbins = int(np.clip(np.ceil((hi - lo) / width), 16, 4096)) if width > 0 else 256
    hist, edges = np.histogram(v, bins=nbins, range=(lo, hi), density=True)
    centres = 0.5 * (edges[:-1] + edges[1:])
    mu, sd = float(v.mean()), float(v.std())
    pdf = np.exp(-0.5 * ((centres - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
    diff = np.where(hist < pdf, pdf - hist, -np.inf)
    if not np.isfinite(diff).any():
        return mu
    return float(centres[int(np.argmax(diff))])


def threshold_mask(image, factor: float = 1.0, threshold: float | None = None, algorithm: str = "otsu") -> np.ndarray:
    """Boolean ``image > t * factor``.

    ``t`` is ``threshold`` when given (QSMxT convention: an integer-valued threshold is absolute, a
    fractional one in (0, 1) is a fraction of the data range, ``min + threshold * (max - min)``), else
    computed by ``algorithm`` (``"otsu"`` or ``"gaussian"``) from the finite values of ``image``.
    """
    img = as_float_volume(image, "image", ndim=(2, 3))
    if not np.isfinite(factor) or factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    if threshold is None:
        algo = str(algorithm).lower()
        if algo == "otsu":
            t = otsu_threshold(img)
        elif algo == "gaussian":
            t = gaussian_threshold(img)
        else:
            raise ValueError(f"unknown threshold algorithm {algorithm!r}; choose 'otsu' or 'gaussian'")
    else:
        threshold = float(threshold)
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        if float(threshold).is_integer():
            t = threshold
        elif 0.0 < threshold < 1.0:
            lo, hi = float(img.min()), float(img.max())
            t = lo + threshold * (hi - lo)
        else:
            raise ValueError(
                f"threshold {threshold} is neither an integer (absolute) nor a fraction in (0, 1)"
            )
    return img > np.float32(t * factor)


# --------------------------------------------------------------------------------------------------
# morphology
# --------------------------------------------------------------------------------------------------


def _bool(mask, name: str = "mask") -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"{name} must be a 3D array, got shape {m.shape}")
    if m.dtype != bool:
        m = as_mask(m, name) if m.any() else m.astype(bool)
    return m


def fill_small_holes(mask, min_neighbours: int = 25) -> np.ndarray:
    """Add voxels with at least ``min_neighbours`` of their 26 neighbours in ``mask`` (QSMxT)."""
    m = _bool(mask)
    counts = m.astype(np.uint8)
    for ax in range(3):  # separable 3x3x3 box sum (max 27 fits uint8)
        counts = ndi.correlate1d(counts, np.ones(3, np.uint8), axis=ax, mode="constant", cval=0)
    counts -= m.astype(np.uint8)
    return m | (counts >= min_neighbours)


def fill_holes(mask, max_hole_size: int | None = None) -> np.ndarray:
    """Fill enclosed background regions (6-connected, not touching the array border).

    ``max_hole_size`` (voxels) limits filling to holes up to that size (MRT ``fill_holes``);
    ``None`` fills all holes (``scipy.ndimage.binary_fill_holes``).
    """
    m = _bool(mask)
    labels, n = ndi.label(~m, structure=_CROSS)
    if n == 0:
        return m.copy()
    border = np.zeros(n + 1, bool)
    for ax in range(3):
        for idx in (0, -1):
            border[np.unique(np.take(labels, idx, axis=ax))] = True
    fill = ~border
    fill[0] = False
    if max_hole_size is not None:
        sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
        fill &= sizes <= int(max_hole_size)
    return m | fill[labels]


def gaussian_fill(mask, sigma_vox: float = 5.0, level: float = 0.4, truncate: float = 2.0) -> np.ndarray:
    """QSMxT "gaussian" filling: ``mask | (gaussian(mask, sigma_vox, truncate) > level)``.

    Fills sulci and narrow gaps; the union with ``mask`` keeps the smoothing from shaving convex
    borders of small objects."""
    m = _bool(mask)
    sm = ndi.gaussian_filter(m.astype(np.float32), sigma=float(sigma_vox), truncate=float(truncate), mode="constant")
    return m | (sm > np.float32(level))


def erode_mask(mask, n: int = 1, connectivity: int = 1) -> np.ndarray:
    """Erode ``n`` times (``connectivity`` 1: 6-neighbour cross as scipy's default; 2: 18; 3: 26).
    Voxels on the array border count as outside."""
    m = _bool(mask)
    n = int(n)
    if n < 0:
        raise ValueError(f"number of erosions must be >= 0, got {n}")
    if n == 0:
        return m.copy()
    st = ndi.generate_binary_structure(3, int(connectivity))
    return ndi.binary_erosion(m, structure=st, iterations=n, border_value=0)


def erode_mask_mm(mask, voxel_size_mm: Sequence[float], radius_mm: float) -> np.ndarray:
    """Voxels of ``mask`` whose ball of ``radius_mm`` (physical units, so an ellipsoid of voxels for
    anisotropic ones; the voxel centres within the radius) lies inside it; voxels beyond the array border
    count as outside. ``radius_mm`` 0 returns a copy; a radius below the smallest voxel size erodes nothing."""
    m = _bool(mask)
    vs = np.broadcast_to(np.asarray(voxel_size_mm, dtype=np.float64), (3,))
    r = float(radius_mm)
    if not np.isfinite(r) or r < 0:
        raise ValueError(f"radius_mm must be finite and >= 0, got {radius_mm!r}")
    if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size_mm must be positive, got {vs.tolist()}")
    if r < vs.min() or not m.any():
        return m.copy()
    # no voxel centre outside the mask (or beyond the border) within r: exact ball erosion, O(N)
    dist = ndi.distance_transform_edt(np.pad(m, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
    return dist > r * (1 + 1e-9)


def dilate_mask(mask, n: int = 1, connectivity: int = 1) -> np.ndarray:
    """Dilate ``n`` times with the ``connectivity`` structuring element (see :func:`erode_mask`)."""
    m = _bool(mask)
    n = int(n)
    if n < 0:
        raise ValueError(f"number of dilations must be >= 0, got {n}")
    if n == 0:
        return m.copy()
    return ndi.binary_dilation(m, structure=ndi.generate_binary_structure(3, int(connectivity)), iterations=n)


def largest_component(mask, connectivity: int = 3) -> np.ndarray:
    """The largest connected component of ``mask`` (``connectivity`` 3: 26 neighbours)."""
    m = as_mask(mask, "mask")
    if m.ndim != 3:
        raise ValueError(f"mask must be a 3D array, got shape {m.shape}")
    labels, n = ndi.label(m, structure=ndi.generate_binary_structure(3, int(connectivity)))
    if n <= 1:
        return m.copy()
    sizes = np.bincount(labels.reshape(-1))
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


# --------------------------------------------------------------------------------------------------
# MRT robustmask
# --------------------------------------------------------------------------------------------------


def robust_mask(weight, factor: float = 1.0, threshold: float | None = None, max_samples: int = 100_000) -> np.ndarray:
    """MriResearchTools ``robustmask`` for a non-negative weight image with some background.

    From up to ``max_samples`` evenly strided values: ``high`` = mean of values between the 80th and
    99th percentiles, ``noise`` = mean below the 15th percentile (5th if that exceeds high/10, 0 if
    still), threshold ``max(5*noise, high/5) * factor`` (or ``threshold``); then box smoothing (5) >
    0.4, filling holes up to N/20 voxels, two box smoothings (3) > 0.6.
    """
    w = as_float_volume(weight, "weight", ndim=3)
    if threshold is None:
        flat = w.reshape(-1)
        step = max(1, flat.size // int(max_samples))
        s = flat[::step].astype(np.float64)
        q05, q15, q80, q99 = np.quantile(s, [0.05, 0.15, 0.80, 0.99])
        sel = s[(s >= q80) & (s <= q99)]
        high = float(sel.mean()) if sel.size else float(q99)
        noise = float(s[s <= q15].mean())
        if noise > high / 10:
            noise = float(s[s <= q05].mean())
            if noise > high / 10:
                noise = 0.0
        threshold = max(5.0 * noise, high / 5.0)
    m = w > np.float32(float(threshold) * factor)
    m = ndi.uniform_filter(m.astype(np.float32), size=5, mode="constant") > 0.4
    m = fill_holes(m, max_hole_size=m.size // 20)
    sm = m.astype(np.float32)
    for _ in range(2):
        sm = ndi.uniform_filter(sm, size=3, mode="constant")
    return sm > 0.6


# --------------------------------------------------------------------------------------------------
# QSMxT-style phase-quality and magnitude masks
# --------------------------------------------------------------------------------------------------


def _as_4d(x, name: str) -> np.ndarray:
    a = as_float_volume(x, name, ndim=(3, 4))
    return a[..., None] if a.ndim == 3 else a


def phase_quality_map(
    phase_rad_4d,
    magnitude_4d=None,
    echo_times_s=None,
    use_second_echo: bool = True,
    weights: Sequence[str] = ("pc", "pgc", "pl", "mc", "mw"),
) -> np.ndarray:
    """ROMEO voxel quality of the first echo, x100 (float32, 0..100; non-finite -> 0).

    Weights default to QSMxT's set (phase coherence, phase linearity, magnitude coherence, magnitude
    weight) plus the phase gradient coherence with echo 2 when ``use_second_echo`` and >= 2 echoes
    with ``echo_times_s`` are given (as QSM.rs). Criteria whose input is missing are dropped.
    """
    from qsmprep.qsm.unwrap import romeo_voxel_quality

    ph = _as_4d(phase_rad_4d, "phase_rad_4d")
    mag = None
    if magnitude_4d is not None:
        mag = _as_4d(magnitude_4d, "magnitude_4d")
        if mag.shape != ph.shape:
            raise ValueError(f"magnitude_4d has shape {mag.shape} but phase_rad_4d has shape {ph.shape}")
    p2, ratio = None, None
    if echo_times_s is not None:
        te = as_echo_times(echo_times_s, n_echoes=ph.shape[3])
        if use_second_echo and ph.shape[3] >= 2 and te[1] != te[0]:
            p2, ratio = ph[..., 1], float(te[0] / te[1])
    q = romeo_voxel_quality(
        ph[..., 0], None if mag is None else mag[..., 0], phase2_rad=p2, te_ratio=ratio, weights=list(weights)
    )
    q = np.nan_to_num(q * np.float32(100.0), nan=0.0, posinf=0.0, neginf=0.0)
    return q.astype(np.float32, copy=False)


def _filled(m: np.ndarray, gaussian_sigma_vox: float, erosions: int, keep_largest: bool) -> np.ndarray:
    """Pass-1 filling: small holes, largest component, Gaussian filling, hole filling, erosion."""
    m = fill_small_holes(m)
    if keep_largest and m.any():
        m = largest_component(m)
    if gaussian_sigma_vox and gaussian_sigma_vox > 0:
        m = gaussian_fill(m, gaussian_sigma_vox)
    m = fill_holes(m)
    m = erode_mask(m, erosions)
    if keep_largest and m.any():
        m = largest_component(m)
    return m


def _threshold_of(img: np.ndarray, threshold, algorithm: str) -> float:
    if threshold is not None:
        return float(threshold)
    algo = str(algorithm).lower()
    if algo == "otsu":
        return otsu_threshold(img)
    if algo == "gaussian":
        return gaussian_threshold(img)
    raise ValueError(f"unknown threshold algorithm {algorithm!r}; choose 'otsu' or 'gaussian'")


def _two_factors(factor, name: str) -> tuple[float, float]:
    f = np.asarray(factor, dtype=np.float64).reshape(-1)
    if f.size == 1:
        f = np.repeat(f, 2)
    if f.size != 2 or not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise ValueError(f"{name} must be one or two positive numbers, got {np.asarray(factor).tolist()}")
    return float(f[0]), float(f[1])


def phase_quality_mask(
    phase_rad_4d,
    magnitude_4d=None,
    echo_times_s=None,
    factor: float | Sequence[float] = (1.5, 1.3),
    threshold: float | None = None,
    algorithm: str = "otsu",
    erosions: Sequence[int] = (3, 0),
    gaussian_sigma_vox: float = 5.0,
    keep_largest: bool = True,
    use_second_echo: bool = True,
    return_unfilled: bool = False,
):
    """QSMxT two-pass phase-quality brain mask (Stewart et al., MRM 2022).

    ``quality = 100 * ROMEO voxel quality`` of echo 1 (:func:`phase_quality_map`); ``t`` = Otsu (or
    ``algorithm="gaussian"``, or an absolute ``threshold``) of the quality map.

    - pass 1 (filled): ``quality > t * factor[0]``, small holes, largest component, Gaussian filling
      (sigma ``gaussian_sigma_vox`` voxels > 0.4), hole filling, ``erosions[0]`` erosions (3 by default,
      one more than QSMxT's 2, to keep skull partial-volume voxels out: see the ``phase`` entry);
    - pass 2 (unfilled): ``quality > t * factor[1]``, small holes, binary opening, ``erosions[1]``
      erosions, restricted to the pass-1 mask (excludes veins, sinus, noisy voxels).

    Returns the filled bool mask, or ``(filled, unfilled)`` with ``return_unfilled=True``.
    """
    q = phase_quality_map(phase_rad_4d, magnitude_4d, echo_times_s, use_second_echo)
    f1, f2 = _two_factors(factor, "factor")
    e = np.asarray(erosions, dtype=int).reshape(-1)
    e1, e2 = (int(e[0]), int(e[0])) if e.size == 1 else (int(e[0]), int(e[1]))
    t = _threshold_of(q, threshold, algorithm)
    filled = _filled(q > np.float32(t * f1), gaussian_sigma_vox, e1, keep_largest)
    if not filled.any():
        raise ValueError("phase-quality mask is empty; lower the threshold factor")
    if not return_unfilled:
        return filled
    un = fill_small_holes(q > np.float32(t * f2))
    un = ndi.binary_opening(un, structure=_CROSS)
    un = erode_mask(un, e2) & filled
    return filled, un


def magnitude_mask(
    magnitude,
    factor: float = 1.0,
    threshold: float | None = None,
    algorithm: str = "otsu",
    erosions: int = 2,
    gaussian_sigma_vox: float = 5.0,
    keep_largest: bool = True,
) -> np.ndarray:
    """Magnitude threshold mask: RSS over echoes for 4D input, Otsu x ``factor`` (or ``threshold``),
    then the pass-1 filling of :func:`phase_quality_mask` and ``erosions`` erosions."""
    mag = _as_4d(magnitude, "magnitude")
    if np.any(mag < 0):
        raise ValueError("magnitude must be non-negative")
    rss = np.sqrt(np.sum(np.square(mag), axis=3, dtype=np.float32)) if mag.shape[3] > 1 else mag[..., 0]
    if not np.isfinite(factor) or factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    t = _threshold_of(rss, threshold, algorithm)
    m = _filled(rss > np.float32(t * factor), gaussian_sigma_vox, int(erosions), keep_largest)
    if not m.any():
        raise ValueError("magnitude mask is empty; lower the threshold factor")
    return m


def bet_phase_mask(
    phase_rad_4d,
    magnitude_4d,
    echo_times_s=None,
    voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
    quality_factor: float = 1.0,
    use_second_echo: bool = True,
    brain=None,
    **bet_kwargs,
) -> np.ndarray:
    """Brain extraction (:func:`~qsmprep.qsm.brain_extraction.bet_mask` of the magnitude, ``bet_kwargs``)
    intersected with ``quality > t * quality_factor`` (``quality``: :func:`phase_quality_map`, ``t``: its
    Otsu threshold over the whole image, as the ``phase`` method), then the largest component and hole
    filling: unreliable voxels are cut from the border of the brain (air/tissue interfaces, the skull's
    partial volume) while enclosed ones (veins, haemorrhage) stay in the mask as the dipole inversion needs.

    ``brain``: that brain extraction computed beforehand (``bet_mask(magnitude_4d, voxel_size_mm,
    **bet_kwargs)``, e.g. by a workflow node that runs it next to the phase-offset correction, which
    it does not depend on); ``bet_kwargs`` are then unused."""
    if not np.isfinite(quality_factor) or quality_factor <= 0:
        raise ValueError(f"quality_factor must be positive, got {quality_factor}")
    if brain is None:
        brain = bet_mask(magnitude_4d, voxel_size_mm, **bet_kwargs)
    else:
        brain = as_mask(brain, "brain", shape=np.shape(magnitude_4d)[:3])
    q = phase_quality_map(phase_rad_4d, magnitude_4d, echo_times_s, use_second_echo)
    m = brain & (q > np.float32(otsu_threshold(q) * quality_factor))
    if not m.any():
        raise ValueError("no voxel of the brain extraction has reliable phase; lower quality_factor")
    return fill_holes(largest_component(m))


# --------------------------------------------------------------------------------------------------
# registry entries
# --------------------------------------------------------------------------------------------------


@MASKING.register(
    "phase",
    label="QSMxT phase-quality mask",
    description="thresholding the ROMEO voxel-quality map of the first echo (Otsu threshold scaled by a factor), "
    "followed by hole filling and erosion, as in QSMxT",
    references=("stewart2022", "dymerska2021"),
    aliases=("phase-quality", "phase_quality", "phasequality", "quality"),
    data_args=("return_unfilled",),
    forwards=(phase_quality_mask,),
    ranges={"factor": "(0, inf)", "threshold": "[0, inf)", "erosions": "[0, inf)", "gaussian_sigma_vox": "(0, inf)"},
)
def phase(phase_rad_4d=None, magnitude_4d=None, echo_times_s=None, voxel_size_mm=(1.0, 1.0, 1.0), **kwargs):
    """MASKING entry: :func:`phase_quality_mask`. ``voxel_size_mm`` is unused.

    Its default of 3 pass-1 erosions differs from QSMxT's 2: one more erosion (as in QSMxT's BET preset) keeps the skull's partial-volume
    voxels out of the mask: on the simulated 1 mm head the Chimap NRMSE of V-SHARP + RTS in the output
    mask fell from 88.5 % to 77.8 % (2 mm: 93 % to 72 %) for 89 % instead of 92 % of the brain kept
    (benchmarks/bench_pipeline.py).
    """
    if phase_rad_4d is None:
        raise ValueError("phase masking needs phase_rad_4d")
    return phase_quality_mask(phase_rad_4d, magnitude_4d, echo_times_s, **kwargs)


@MASKING.register(
    "magnitude",
    label="magnitude threshold mask",
    description="thresholding the root-sum-of-squares magnitude over echoes (Otsu), followed by hole filling and "
    "erosion as in QSMxT",
    references=("stewart2022",),
    aliases=("mag",),
    forwards=(magnitude_mask,),
    ranges={"factor": "(0, inf)", "threshold": "[0, inf)", "erosions": "[0, inf)", "gaussian_sigma_vox": "(0, inf)"},
)
def magnitude(phase_rad_4d=None, magnitude_4d=None, echo_times_s=None, voxel_size_mm=(1.0, 1.0, 1.0), **kwargs):
    """MASKING entry: :func:`magnitude_mask`. Phase, echo times and voxel size are unused."""
    if magnitude_4d is None:
        raise ValueError("magnitude masking needs magnitude_4d")
    return magnitude_mask(magnitude_4d, **kwargs)


@MASKING.register(
    "robust",
    label="robust magnitude mask",
    description="a robust threshold of the combined magnitude (noise and signal levels from quantiles, as in "
    "MriResearchTools) with smoothing and hole filling",
    forwards=(robust_mask,),
    ranges={"factor": "(0, inf)", "threshold": "[0, inf)", "max_samples": "[1, inf)"},
)
def robust(phase_rad_4d=None, magnitude_4d=None, echo_times_s=None, voxel_size_mm=(1.0, 1.0, 1.0), **kwargs):
    """MASKING entry: :func:`robust_mask` of the RSS magnitude over echoes."""
    if magnitude_4d is None:
        raise ValueError("robust masking needs magnitude_4d")
    mag = _as_4d(magnitude_4d, "magnitude_4d")
    rss = np.sqrt(np.sum(np.square(mag), axis=3, dtype=np.float32))
    return robust_mask(rss, **kwargs)


#: Masking methods that need magnitude images (checked against the data before a run starts).
MAGNITUDE_MASKING = frozenset({"magnitude", "robust", "bet", "bet-phase"})

_BET_RANGES = {"fractional_threshold": "(0, 1)", "iterations": "[0, inf)", "subdivisions": "[0, 7]",
               "d1_mm": "(0, inf)", "d2_mm": "(0, inf)", "tolerance_mm": "[0, inf)", "erode_mm": "[0, inf)"}


@MASKING.register(
    "bet",
    label="BET brain extraction",
    description="brain extraction of the root-sum-of-squares magnitude over echoes with a deformable "
    "tessellated surface (BET; fractional intensity threshold 0.75 for GRE magnitude), which removes scalp, "
    "skull and neck",
    references=("smith2002",),
    aliases=("brain-extraction", "brain_extraction"),
    forwards=(bet_mask,),
    ranges=_BET_RANGES,
)
def bet(phase_rad_4d=None, magnitude_4d=None, echo_times_s=None, voxel_size_mm=(1.0, 1.0, 1.0), **kwargs):
    """MASKING entry: :func:`~qsmprep.qsm.brain_extraction.bet_mask` of the magnitude (phase and echo
    times unused)."""
    if magnitude_4d is None:
        raise ValueError("bet masking needs magnitude_4d")
    return bet_mask(magnitude_4d, voxel_size_mm, **kwargs)


@MASKING.register(
    "bet-phase",
    label="BET brain extraction and phase quality",
    description="brain extraction of the root-sum-of-squares magnitude with a deformable tessellated surface "
    "(BET; fractional intensity threshold 0.75 for GRE magnitude), restricted to voxels whose ROMEO phase "
    "quality exceeds its "
    "Otsu threshold, holes filled",
    references=("smith2002", "dymerska2021", "stewart2022", "consensus2024"),
    aliases=("bet+phase", "bet_phase"),
    data_args=("brain",),
    forwards=(bet_mask,),
    ranges={**_BET_RANGES, "quality_factor": "(0, inf)"},
)
def bet_phase(phase_rad_4d=None, magnitude_4d=None, echo_times_s=None, voxel_size_mm=(1.0, 1.0, 1.0),
              quality_factor: float = 1.0, use_second_echo: bool = True, brain=None, **kwargs):
    """MASKING entry: :func:`bet_phase_mask` (``brain``: its brain extraction, computed beforehand)."""
    if phase_rad_4d is None or magnitude_4d is None:
        raise ValueError("bet-phase masking needs phase_rad_4d and magnitude_4d")
    return bet_phase_mask(phase_rad_4d, magnitude_4d, echo_times_s, voxel_size_mm, quality_factor=quality_factor,
                          use_second_echo=use_second_echo, brain=brain, **kwargs)


#: Parameters of the ``bet-phase`` method that are not BET's (the rest go to
#: :func:`~qsmprep.qsm.brain_extraction.bet_mask` when the brain extraction runs on its own).
BET_PHASE_QUALITY_PARAMS = frozenset({"quality_factor", "use_second_echo"})
