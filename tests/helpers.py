"""Plain helpers shared by the test modules: coordinate grids, shapes, overlap, NIfTI writing.

``tests/`` has no ``__init__.py``: pytest's default (``prepend``) import mode puts this folder on
``sys.path``, so the test modules import these with ``from helpers import ...`` (also in xdist workers).
Fixtures that build data (phantoms, simulated BIDS datasets, tiny runs) live in ``conftest.py``.
Nothing here depends on qsmprep, so a renamed package module cannot break the helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "TWO_PI",
    "centred_grid_mm",
    "unit_grid",
    "ellipsoid",
    "dice",
    "partial_volume_sphere",
    "save_nifti",
    "write_json",
]

TWO_PI = 2.0 * np.pi


def centred_grid_mm(shape, voxel_size_mm=(1.0, 1.0, 1.0)) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm (``indexing="ij"``), zero at the grid centre ``(n - 1) / 2``."""
    c = [(n - 1) / 2 for n in shape]
    return np.meshgrid(*[(np.arange(n) - ci) * v for n, ci, v in zip(shape, c, voxel_size_mm)], indexing="ij")


def unit_grid(shape) -> list[np.ndarray]:
    """float32 coordinates ``(i - n/2) / (n/2)`` in [-1, 1) along every axis (``indexing="ij"``)."""
    return np.meshgrid(*[(np.arange(n, dtype=np.float32) - n / 2) / (n / 2) for n in shape], indexing="ij")


def ellipsoid(grid, centre, semi_axes) -> np.ndarray:
    """Boolean solid ellipsoid ``sum(((g - c) / s)^2) <= 1`` on the coordinate arrays ``grid``."""
    return sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, semi_axes)) <= 1


def dice(a, b) -> float:
    """Dice overlap of two boolean masks."""
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def partial_volume_sphere(n: int, radius_vox: float, supersample: int = 4):
    """A sphere centred at voxel ``n // 2`` of an ``n^3`` grid with partial-volume edges (fraction of
    ``supersample^3`` sub-voxels inside), float32, and the voxel coordinates ``(x, y, z)`` it was drawn on."""
    c = (np.arange(n) - n // 2).astype(np.float32)
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    frac = np.zeros((n, n, n), np.float32)
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    for dx in offsets:
        for dy in offsets:
            for dz in offsets:
                frac += (x + dx) ** 2 + (y + dy) ** 2 + (z + dz) ** 2 <= radius_vox**2
    return frac / supersample**3, (x, y, z)


def save_nifti(path, data, affine=None, dtype=None, scanner_codes: bool = False) -> str:
    """Write ``data`` (cast to ``dtype`` when given) as NIfTI-1 with ``affine`` (identity when None).

    Parent folders are created. ``scanner_codes=True`` also sets the sform and qform from the affine
    with code 1 (scanner), like a converted scanner image; otherwise nibabel's defaults apply.
    Returns the path as a string.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(data) if dtype is None else np.asarray(data).astype(dtype)
    affine = np.eye(4) if affine is None else affine
    img = nib.Nifti1Image(array, affine)
    if scanner_codes:
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
