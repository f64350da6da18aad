"""Accuracy metrics of a susceptibility map against ground truth, inside an evaluation mask.

Signatures ``f(estimate, truth, mask, ...)``; maps in ppm; percentages where stated.

- :func:`nrmse`: demeaned NRMSE (%) (QSM Challenge 2.0, Bilgic B et al., MRM 2021;86:1241).
- :func:`ddnrmse`: demeaned and detrended NRMSE (%) (same source): the estimate is corrected by the
  least-squares line ``estimate = a truth + b`` before the error is taken.
- :func:`rmse`: 2016-challenge RMSE (%) ``100 ||x - t|| / ||t||`` without demeaning (FANSI
  ``compute_rmse``; Langkammer C et al., MRM 2018;79:1661), or the absolute RMSE in ppm.
- :func:`hfen`: high-frequency error norm (%): RMSE of Laplacian-of-Gaussian filtered maps
  (15^3 kernel, sigma 1.5 voxels; Ravishankar & Bresler 2011, 2016 challenge).
- :func:`xsim`: SSIM re-tuned for QSM (Milovic C et al., ISMRM 2022; FANSI ``compute_xsim``): native
  ppm, L = 1, K = (0.01, 0.001), Gaussian window sigma 1.5 of size 7^3, mean over the mask.
- :func:`pearson`: Pearson correlation inside the mask.
- :func:`dgm_slope`: slope of the regression of per-structure mean estimates on per-structure mean
  truths (QSM Challenge 2.0 reports ``|1 - slope|`` over the six deep grey-matter labels).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from qsmprep.qsm.arrays import as_float_volume, as_mask, same_shape

__all__ = ["nrmse", "ddnrmse", "rmse", "hfen", "xsim", "pearson", "dgm_slope", "log_kernel"]


def _inputs(estimate, truth, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = as_float_volume(estimate, "estimate")
    t = as_float_volume(truth, "truth")
    same_shape(x, t, "estimate", "truth")
    m = as_mask(mask, "mask", shape=x.shape)
    return x, t, m


def _demeaned(x: np.ndarray, t: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xv = x[m].astype(np.float64)
    tv = t[m].astype(np.float64)
    return xv - xv.mean(), tv - tv.mean()


def _ratio(err: np.ndarray, ref: np.ndarray, what: str) -> float:
    nref = float(np.linalg.norm(ref))
    if nref == 0.0:
        raise ValueError(f"{what}: the truth is constant inside the mask, the normalised error is undefined")
    return 100.0 * float(np.linalg.norm(err)) / nref


def nrmse(estimate, truth, mask) -> float:
    """Demeaned NRMSE (%): ``100 ||(x - mean x) - (t - mean t)|| / ||t - mean t||`` inside ``mask``."""
    x, t, m = _inputs(estimate, truth, mask)
    xv, tv = _demeaned(x, t, m)
    return _ratio(xv - tv, tv, "nrmse")


def _line_fit(t: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """Least-squares ``x = a t + b``."""
    tc = t - t.mean()
    den = float(np.dot(tc, tc))
    if den == 0.0:
        raise ValueError("the truth is constant: a regression on it is undefined")
    a = float(np.dot(tc, x - x.mean())) / den
    return a, float(x.mean() - a * t.mean())


def ddnrmse(estimate, truth, mask) -> float:
    """Demeaned and detrended NRMSE (%) (QSM Challenge 2.0).

    Fit ``x = a t + b`` over the demeaned mask values, correct ``x' = (x - b) / a`` and return
    ``100 ||x' - t|| / ||t||``. Insensitive to a global scaling of the estimate.
    """
    x, t, m = _inputs(estimate, truth, mask)
    xv, tv = _demeaned(x, t, m)
    a, b = _line_fit(tv, xv)
    if a == 0.0:
        raise ValueError("ddnrmse: the estimate is uncorrelated with the truth (slope 0)")
    return _ratio((xv - b) / a - tv, tv, "ddnrmse")


def rmse(estimate, truth, mask, normalise: bool = True) -> float:
    """RMSE inside ``mask`` without demeaning.

    ``normalise=True``: ``100 ||x - t|| / ||t||`` (%, the 2016 challenge / FANSI ``compute_rmse``);
    ``normalise=False``: ``sqrt(mean((x - t)^2))`` in the maps' unit (ppm).
    """
    x, t, m = _inputs(estimate, truth, mask)
    err = x[m].astype(np.float64) - t[m].astype(np.float64)
    if not normalise:
        return float(np.sqrt(np.mean(err * err)))
    return _ratio(err, t[m].astype(np.float64), "rmse")


def log_kernel(size: int = 15, sigma: float = 1.5) -> np.ndarray:
    """Zero-sum 3D Laplacian-of-Gaussian kernel (``size^3``, ``sigma`` in voxels), as in the 2016 challenge.

    ``h = exp(-r^2 / 2 sigma^2) / sum``, ``LoG = h (r^2 / sigma^4 - 3 / sigma^2)``, minus its mean.
    """
    if int(size) != size or size < 3 or size % 2 == 0:
        raise ValueError(f"size must be an odd integer >= 3, got {size!r}")
    if not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    r2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    h = np.exp(-r2 / (2.0 * sigma**2))
    h /= h.sum()
    log = h * (r2 / sigma**4 - 3.0 / sigma**2)
    return log - log.mean()


def _correlate_sep(v: np.ndarray, kernels: Sequence[np.ndarray]) -> np.ndarray:
    """Separable correlation with zero boundary (``kernels[i]`` along axis ``i``)."""
    for axis, k in enumerate(kernels):
        v = ndi.correlate1d(v, k, axis=axis, mode="constant", cval=0.0)
    return v


def _log_filter(v: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """``v`` convolved with :func:`log_kernel` (zero boundary), computed separably.

    The kernel is ``(q g g + g q g + g g q) / (S sigma^4) - 3 g g g / (S sigma^2) - c``, with
    ``g(t) = exp(-t^2 / 2 sigma^2)``, ``q = t^2 g``, ``S = (sum g)^3`` and ``c`` its mean (a box term).
    """
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-t * t / (2.0 * sigma**2))
    q = t * t * g
    s = g.sum() ** 3
    r2 = t[:, None, None] ** 2 + t[None, :, None] ** 2 + t[None, None, :] ** 2
    c = float(np.mean(np.exp(-r2 / (2.0 * sigma**2)) / s * (r2 / sigma**4 - 3.0 / sigma**2)))
    a_g = ndi.correlate1d(v, g, axis=0, mode="constant")
    a_q = ndi.correlate1d(v, q, axis=0, mode="constant")
    b_gg = ndi.correlate1d(a_g, g, axis=1, mode="constant")
    b_gq = ndi.correlate1d(a_g, q, axis=1, mode="constant")
    b_qg = ndi.correlate1d(a_q, g, axis=1, mode="constant")
    del a_g, a_q
    ggg = ndi.correlate1d(b_gg, g, axis=2, mode="constant")
    out = ndi.correlate1d(b_gg, q, axis=2, mode="constant")
    out += ndi.correlate1d(b_gq, g, axis=2, mode="constant")
    out += ndi.correlate1d(b_qg, g, axis=2, mode="constant")
    out /= s * sigma**4
    out -= ggg * (3.0 / (s * sigma**2))
    box = np.ones(size)
    out -= c * _correlate_sep(v, (box, box, box))
    return out


def hfen(estimate, truth, mask, size: int = 15, sigma: float = 1.5, demean: bool = True) -> float:
    """High-frequency error norm (%): ``rmse`` of LoG-filtered maps inside ``mask``.

    Both maps are zeroed outside ``mask`` (after subtracting their mask means when ``demean``, so an
    arbitrary reference offset does not create an edge at the mask boundary), convolved with
    :func:`log_kernel` (zero boundary, like MATLAB ``imfilter``), and compared inside ``mask``.
    """
    x, t, m = _inputs(estimate, truth, mask)
    log_kernel(size, sigma)  # validates size and sigma
    x = x.astype(np.float64)
    t = t.astype(np.float64)
    if demean:
        x = x - x[m].mean()
        t = t - t[m].mean()
    lx = _log_filter(np.where(m, x, 0.0), int(size), float(sigma))
    lt = _log_filter(np.where(m, t, 0.0), int(size), float(sigma))
    return _ratio(lx[m] - lt[m], lt[m], "hfen")


def xsim(
    estimate,
    truth,
    mask,
    k: Sequence[float] = (0.01, 0.001),
    dynamic_range: float = 1.0,
    sigma: float = 1.5,
    half_width: Sequence[int] = (3, 3, 3),
) -> float:
    """XSIM (Milovic et al., ISMRM 2022): SSIM on native-ppm maps, mean of the SSIM map over ``mask``.

    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` with ``L = dynamic_range`` (1 ppm); local statistics with a
    normalised Gaussian window (``sigma`` voxels, ``2 half_width + 1`` wide) and zero boundary like
    ``convn(..., 'same')``. Both maps are zeroed outside ``mask`` first (no demeaning).
    """
    x, t, m = _inputs(estimate, truth, mask)
    if len(k) != 2 or min(k) <= 0:
        raise ValueError(f"k must hold two positive constants, got {k!r}")
    if not np.isfinite(sigma) or sigma <= 0 or len(half_width) != 3 or min(half_width) < 0:
        raise ValueError(f"bad window: sigma={sigma!r}, half_width={half_width!r}")
    c1 = (float(k[0]) * dynamic_range) ** 2
    c2 = (float(k[1]) * dynamic_range) ** 2
    win = []
    for h in half_width:
        r = np.arange(-int(h), int(h) + 1, dtype=np.float64)
        w = np.exp(-r * r / (2.0 * sigma**2))
        win.append(w / w.sum())
    a = np.where(m, x, 0.0).astype(np.float64)
    b = np.where(m, t, 0.0).astype(np.float64)

    def filt(v):
        return _correlate_sep(v, win)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a * mu_a
    var_b = filt(b * b) - mu_b * mu_b
    cov = filt(a * b) - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float(np.mean(num[m] / den[m]))


def pearson(estimate, truth, mask) -> float:
    """Pearson correlation coefficient of ``estimate`` and ``truth`` inside ``mask``."""
    x, t, m = _inputs(estimate, truth, mask)
    xv, tv = _demeaned(x, t, m)
    den = float(np.linalg.norm(xv) * np.linalg.norm(tv))
    if den == 0.0:
        raise ValueError("pearson: a map is constant inside the mask")
    return float(np.dot(xv, tv)) / den


def dgm_slope(
    estimate,
    truth,
    mask,
    labels,
    label_values: Sequence[int] = (1, 2, 3, 4, 5, 6),
    min_voxels: int = 1,
) -> float:
    """Slope of the regression of per-structure mean ``estimate`` on per-structure mean ``truth``.

    Structures are the voxels of ``labels == v`` inside ``mask`` for each ``v`` of ``label_values``
    (default: the six deep grey-matter labels of QSM Challenge 2.0: caudate, globus pallidus,
    putamen, red nucleus, dentate nucleus, substantia nigra/STN). Structures with fewer than
    ``min_voxels`` voxels are skipped; at least two are needed. 1 is ideal; the challenge metric is
    ``|1 - slope|``.
    """
    x, t, m = _inputs(estimate, truth, mask)
    lab = np.asarray(labels)
    if lab.shape != x.shape:
        raise ValueError(f"labels has shape {lab.shape} but the maps have shape {x.shape}")
    xs, ts = [], []
    for v in label_values:
        sel = m & (lab == v)
        if np.count_nonzero(sel) >= max(int(min_voxels), 1):
            xs.append(float(np.mean(x[sel], dtype=np.float64)))
            ts.append(float(np.mean(t[sel], dtype=np.float64)))
    if len(xs) < 2:
        raise ValueError(f"dgm_slope needs at least 2 labelled structures in the mask, found {len(xs)}")
    a, _ = _line_fit(np.asarray(ts), np.asarray(xs))
    return a
