"""Susceptibility referencing: remove the undetermined offset of a susceptibility map.

k-space inversions with ``D(0) = 0`` leave the mean susceptibility undetermined, so maps are reported
relative to a stated reference region (ISMRM consensus, Bilgic B et al., MRM 2024;91:1834,
doi:10.1002/mrm.30006). Registry :data:`~qsmprep.qsm.registry.REFERENCE`, signature
``f(chi_ppm, mask, **kw) -> chi_ppm`` (float32):

- ``mean``: subtract the mean of chi inside ``mask`` (the whole-brain reference); 0 outside ``mask``.
- ``csf``: subtract the mean of chi inside a CSF mask (given, or from R2* with
  :func:`csf_mask_from_r2star`, after MEDI's ``extract_CSF``; Liu Z et al., MRM 2018;79:2795);
  0 outside ``mask``.
- ``none``: return chi unchanged (float32 copy).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from qsmprep.qsm.arrays import as_float_volume, as_mask, as_voxel_size
from qsmprep.qsm.registry import REFERENCE

__all__ = ["reference_mean", "reference_csf", "reference_none", "csf_mask_from_r2star"]


def _chi_and_mask(chi_ppm, mask) -> tuple[np.ndarray, np.ndarray]:
    chi = as_float_volume(chi_ppm, "chi_ppm")
    m = as_mask(mask, "mask", shape=chi.shape)
    return chi, m


def _subtract(chi: np.ndarray, m: np.ndarray, offset: float) -> np.ndarray:
    return np.where(m, chi - np.float32(offset), np.float32(0.0)).astype(np.float32)


@REFERENCE.register(
    "mean", label="whole-brain mean", description="the mean susceptibility within the final brain mask",
    references=("consensus2024",), aliases=("whole-brain", "wholebrain"),
)
def reference_mean(chi_ppm, mask) -> np.ndarray:
    """``chi - mean(chi[mask])`` inside ``mask``, 0 outside (whole-brain reference; ppm, float32)."""
    chi, m = _chi_and_mask(chi_ppm, mask)
    return _subtract(chi, m, float(np.mean(chi[m], dtype=np.float64)))


@REFERENCE.register("none", label="none", description="no reference (the mean susceptibility is undetermined)")
def reference_none(chi_ppm, mask=None) -> np.ndarray:
    """No referencing: a float32 copy of ``chi_ppm`` (``mask`` is only checked for its shape)."""
    chi = as_float_volume(chi_ppm, "chi_ppm")
    if mask is not None:
        as_mask(mask, "mask", shape=chi.shape)
    return chi.copy()


@REFERENCE.register(
    "csf",
    label="ventricular CSF",
    description="the mean susceptibility of ventricular cerebrospinal fluid, segmented from the R2* map by "
    "thresholding near the brain centre",
    references=("liu2018csf", "consensus2024"),
    forwards=("qsmprep.qsm.reference:csf_mask_from_r2star",),
    ranges={"threshold_hz": "(0, inf)", "radius_mm": "(0, inf)", "min_voxels": "[1, inf)", "n_central": "[1, inf)",
            "erode_mm": "[0, inf)"},
)
def reference_csf(
    chi_ppm,
    mask,
    csf_mask=None,
    r2star_hz=None,
    voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
    threshold_hz: float = 5.0,
    radius_mm: float = 30.0,
    min_voxels: int = 10,
) -> np.ndarray:
    """Reference chi to the mean of a CSF region; 0 outside ``mask`` (ppm, float32).

    The region is ``csf_mask & mask`` when ``csf_mask`` is given, else it is derived from
    ``r2star_hz`` with :func:`csf_mask_from_r2star` (``threshold_hz``, ``radius_mm``). At least
    ``min_voxels`` CSF voxels are required.
    """
    chi, m = _chi_and_mask(chi_ppm, mask)
    if csf_mask is not None:
        csf = as_mask(csf_mask, "csf_mask", shape=chi.shape) & m
    elif r2star_hz is not None:
        csf = csf_mask_from_r2star(r2star_hz, m, voxel_size_mm, threshold_hz, radius_mm)
    else:
        raise ValueError("CSF referencing needs csf_mask or r2star_hz")
    n = int(np.count_nonzero(csf))
    if n < int(min_voxels):
        raise ValueError(f"the CSF mask has {n} voxels inside the brain mask, fewer than {int(min_voxels)}")
    return _subtract(chi, m, float(np.mean(chi[csf], dtype=np.float64)))


def csf_mask_from_r2star(
    r2star_hz,
    mask,
    voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
    threshold_hz: float = 5.0,
    radius_mm: float = 30.0,
    n_central: int = 2,
    erode_mm: float = 0.0,
) -> np.ndarray:
    """Ventricular CSF from an R2* map (after MEDI toolbox ``extract_CSF``; Liu Z et al., MRM 2018).

    Candidates are mask voxels with ``R2* < threshold_hz`` (1/s). The ``n_central`` largest
    26-connected candidate components inside a sphere of ``radius_mm`` around the mask's centre of
    mass (mm coordinates) pick the ventricles; the result is the union of the whole-mask candidate
    components that touch them. ``erode_mm > 0`` first erodes the mask with a sphere of that radius
    (MEDI's optional 10 mm SMV erosion). Unlike MEDI, central candidates are also restricted to the
    mask. Returns a boolean mask; ``ValueError`` if no candidate lies near the centre.
    """
    r2s = as_float_volume(r2star_hz, "r2star_hz")
    m = as_mask(mask, "mask", shape=r2s.shape)
    vs = as_voxel_size(voxel_size_mm)
    for name, val in (("threshold_hz", threshold_hz), ("radius_mm", radius_mm)):
        if not np.isfinite(val) or val <= 0:
            raise ValueError(f"{name} must be positive and finite, got {val!r}")
    if int(n_central) < 1:
        raise ValueError(f"n_central must be >= 1, got {n_central!r}")
    if not np.isfinite(erode_mm) or erode_mm < 0:
        raise ValueError(f"erode_mm must be >= 0, got {erode_mm!r}")

    coords = [np.arange(n, dtype=np.float64) * v for n, v in zip(m.shape, vs)]
    idx = np.nonzero(m)
    centre = [coords[a][idx[a]].mean() for a in range(3)]
    dist2 = sum(((c - c0) ** 2).reshape([-1 if a == i else 1 for a in range(3)])
                for i, (c, c0) in enumerate(zip(coords, centre)))
    central_sphere = dist2 <= radius_mm**2

    if erode_mm > 0:  # erosion by a ball: keep voxels farther than erode_mm from any outside voxel
        dist = ndi.distance_transform_edt(np.pad(m, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
        m = dist > erode_mm
        if not m.any():
            raise ValueError(f"the mask is empty after eroding it by {erode_mm} mm")

    low = (r2s < np.float32(threshold_hz)) & m
    full26 = np.ones((3, 3, 3), dtype=bool)
    central_lab, n_c = ndi.label(low & central_sphere, structure=full26)
    if n_c == 0:
        raise ValueError(
            f"no voxel with R2* < {threshold_hz} Hz within {radius_mm} mm of the brain centre: "
            "cannot find CSF"
        )
    sizes = np.bincount(central_lab.ravel())[1:]
    keep = np.argsort(sizes)[::-1][: int(n_central)] + 1
    seeds = np.isin(central_lab, keep)
    all_lab, _ = ndi.label(low, structure=full26)
    chosen = np.unique(all_lab[seeds])
    chosen = chosen[chosen > 0]
    return np.isin(all_lab, chosen)
