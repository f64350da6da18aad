"""Susceptibility-weighted imaging (SWI) and its minimum-intensity projection (minIP), CLEAR-SWI style.

SWI (Haacke EM et al., *Susceptibility weighted imaging (SWI).* MRM 2004;52:612) multiplies a
magnitude image by a mask of the high-pass filtered phase raised to a power, which darkens paramagnetic
veins. CLEAR-SWI (Eckstein K et al., *Improved susceptibility weighted imaging at ultra-high field using
bipolar multi-echo acquisition and optimized image processing: CLEAR-SWI.* NeuroImage 2021;237:118175;
defaults of its reference implementation CLEARSWI.jl) does this with multi-echo data:

- magnitude: root-sum-of-squares over echoes (:func:`combine_magnitude_rss`; CLEAR-SWI's ``SNR``
  combination, the SNR-optimal weighting ``w_e = M_e`` for equal noise per echo);
- phase: the multi-echo B0 map in Hz from the unwrapped echoes (here the pipeline's ``fieldmap_hz``),
  minus its Gaussian-smoothed version, smoothed in-plane only (sigma 4 voxels in the two axes across the
  slice axis, none along it; normalised by the smoothed mask) (:func:`highpass_field_hz`);
- phase mask: ``tanh`` scaling ``w = (1 + tanh(1 - f / m)) / 2`` with ``m`` = median of the positive
  filtered field in the mask × 10 / strength (strength 4), or Haacke's linear mask of the positive
  values raised to a power (``positive``, power 4) (:func:`phase_weights`);
- SWI = combined magnitude × phase mask; minIP = moving minimum over a slab along the slice axis
  (:func:`minimum_intensity_projection`).

Sign: qsmprep's phase is ``+2 pi f TE`` with ``f = gamma/2pi dB`` (:mod:`qsmprep.simulate.signal`), so
paramagnetic sources (veins, +0.3..0.45 ppm) along B0 have a *positive* field inside; the mask darkens
positive filtered field. CLEAR-SWI's sensitivity (homogeneity) correction and softplus magnitude scaling
are not applied. float32 throughout.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from qsmprep.qsm.arrays import as_b0_dir, as_float_volume, as_mask, as_voxel_size, same_shape

__all__ = [
    "SWI_PHASE_SCALINGS",
    "combine_magnitude_rss",
    "highpass_field_hz",
    "phase_weights",
    "slice_axis",
    "minimum_intensity_projection",
    "swi",
]

#: Phase-mask scalings: CLEAR-SWI's sigmoid ``tanh`` (default) and Haacke's linear mask of positive field.
SWI_PHASE_SCALINGS = ("tanh", "positive")


def combine_magnitude_rss(magnitude_4d) -> np.ndarray:
    """Root-sum-of-squares of the echoes (x, y, z, echo) -> (x, y, z): CLEAR-SWI's ``SNR`` magnitude
    combination (Eckstein et al., NeuroImage 2021). A 3D magnitude is returned as float32."""
    mag = as_float_volume(magnitude_4d, "magnitude_4d", ndim=(3, 4))
    if mag.ndim == 3:
        return mag.copy()
    out = np.zeros(mag.shape[:3], np.float32)
    for e in range(mag.shape[3]):
        out += np.square(mag[..., e])
    return np.sqrt(out, out=out)


def slice_axis(b0_dir: Sequence[float]) -> int:
    """The voxel axis closest to B0 (the slice axis of an axial acquisition)."""
    return int(np.argmax(np.abs(as_b0_dir(b0_dir))))


def highpass_field_hz(field_hz, mask, sigma_voxels: float = 4.0, axis: int = 2) -> np.ndarray:
    """``field - G(field)``: the field (Hz) minus its Gaussian-smoothed version inside ``mask``, smoothed
    in the plane across ``axis`` only (sigma ``sigma_voxels`` in the two other axes; CLEAR-SWI's default
    filter ``[4, 4, 0]`` voxels). The smoothing is normalised by the smoothed mask, so the mask edge
    does not pull the low-pass towards 0. Zero outside ``mask``. float32 Hz."""
    f = as_float_volume(field_hz, "field_hz")
    m = as_mask(mask, "mask", f.shape)
    if not sigma_voxels > 0:
        raise ValueError(f"sigma_voxels must be positive, got {sigma_voxels}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    sigma = [float(sigma_voxels)] * 3
    sigma[axis] = 0.0
    mf = m.astype(np.float32)
    num = ndi.gaussian_filter(np.where(m, f, np.float32(0)), sigma, mode="constant")
    den = ndi.gaussian_filter(mf, sigma, mode="constant")
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.where(den > 1e-6, num / den, np.float32(0))
    return np.where(m, f - low, np.float32(0)).astype(np.float32)


def phase_weights(highpass_hz, mask, scaling: str = "tanh", strength: float = 4.0) -> np.ndarray:
    """The SWI phase mask in [0, 1] from the high-pass filtered field (Hz); positive (paramagnetic) field
    is darkened. The field counts as 0 outside ``mask``.

    - ``"tanh"`` (CLEAR-SWI default): ``w = (1 + tanh(1 - f / m)) / 2``, ``m`` = median of the positive
      field in the mask × 10 / ``strength`` (default 4); ``w(0) = 0.88``, ``w(m) = 0.5``.
    - ``"positive"`` (Haacke et al., MRM 2004): ``w = (1 - f / f_max) ** strength`` for ``0 < f < f_max``,
      0 above, 1 for ``f <= 0``; ``f_max`` is the 99th percentile of the positive field in the mask (the
      phase pi of Haacke's mask), ``strength`` the power (4 in Haacke 2004).
    """
    f = as_float_volume(highpass_hz, "highpass_hz")
    m = as_mask(mask, "mask", f.shape)
    if scaling not in SWI_PHASE_SCALINGS:
        raise ValueError(f"unknown phase scaling {scaling!r}; choose one of {', '.join(SWI_PHASE_SCALINGS)}")
    if not strength > 0:
        raise ValueError(f"strength must be positive, got {strength}")
    f = np.where(m, f, np.float32(0))
    positive = f[m & (f > 0)]
    if positive.size == 0:  # no paramagnetic field: nothing to darken
        return np.ones(f.shape, np.float32)
    if scaling == "tanh":
        scale = np.float32(np.median(positive) * 10.0 / float(strength))
        w = (np.float32(1) + np.tanh(np.float32(1) - f / scale)) * np.float32(0.5)
    else:
        f_max = np.float32(np.percentile(positive, 99.0))
        w = np.clip(np.float32(1) - np.maximum(f, 0) / f_max, 0.0, 1.0) ** np.float32(strength)
    return np.clip(w, 0.0, 1.0).astype(np.float32)


def minimum_intensity_projection(image, voxel_size_mm, axis: int = 2, slab_mm: float = 16.0) -> np.ndarray:
    """Moving minimum over a slab of ``slab_mm`` along ``axis`` (round(slab / voxel size) slices, at least
    1, centred; edges repeat the outermost slice): the minIP of an SWI, same grid as ``image``."""
    img = as_float_volume(image, "image")
    vs = as_voxel_size(voxel_size_mm)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if not slab_mm > 0:
        raise ValueError(f"slab_mm must be positive, got {slab_mm}")
    n = max(1, int(round(float(slab_mm) / float(vs[axis]))))
    return ndi.minimum_filter1d(img, size=n, axis=axis, mode="nearest").astype(np.float32)


def swi(
    magnitude_4d,
    field_hz,
    mask,
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    highpass_sigma_voxels: float = 4.0,
    phase_scaling: str = "tanh",
    phase_strength: float = 4.0,
) -> tuple[np.ndarray, np.ndarray]:
    """CLEAR-SWI (Eckstein et al., NeuroImage 2021): root-sum-of-squares magnitude × phase mask of the
    in-plane high-pass filtered B0 field (Hz; in-plane = across the voxel axis closest to ``b0_dir``).

    Returns float32 ``(swi, phase_mask)`` on the magnitude grid (``swi`` in the magnitude's units,
    whole image; outside ``mask`` the phase mask is that of zero field).
    """
    mag = combine_magnitude_rss(magnitude_4d)
    f = as_float_volume(field_hz, "field_hz")
    same_shape(f, mag, "field_hz", "magnitude_4d")
    hp = highpass_field_hz(f, mask, highpass_sigma_voxels, slice_axis(b0_dir))
    w = phase_weights(hp, mask, phase_scaling, phase_strength)
    return (mag * w).astype(np.float32), w
