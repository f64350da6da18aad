"""Acquisition geometry and the dipole forward model.

Conventions: volumes are indexed (i, j, k) like NIfTI data arrays; ``voxel_size_mm`` holds the voxel
spacing along those axes; ``b0_dir`` is the unit B0 vector expressed in that voxel-axis frame.
Susceptibility is in ppm (SI), fields are relative fields ``dB/B0`` in ppm unless named ``_hz``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmprep.qsm import fft as _fft
from qsmprep.qsm.arrays import as_b0_dir, as_float_volume, as_voxel_size

#: B0 along the scanner (and NIfTI world) z axis.
B0_WORLD = (0.0, 0.0, 1.0)


def voxel_size_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along the array axes: the column norms of the affine's 3x3 part."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {a.shape}")
    return np.linalg.norm(a[:3, :3], axis=0)


def b0_direction_from_affine(affine: np.ndarray, b0_world: Sequence[float] = B0_WORLD) -> np.ndarray:
    """Unit B0 direction in voxel coordinates from a NIfTI affine.

    Uses the pure rotation ``R = A diag(1/voxel_size)`` so that anisotropic voxels do not skew the
    direction: ``b = R^T b0_world`` (Kiersnowski et al., MRM 2023).
    """
    a = np.asarray(affine, dtype=np.float64)
    vs = voxel_size_from_affine(a)
    if np.any(vs <= 0):
        raise ValueError("affine is singular: a voxel axis has zero length")
    rot = a[:3, :3] / vs[None, :]
    b = rot.T @ np.asarray(b0_world, dtype=np.float64)
    return b / np.linalg.norm(b)


def obliquity_deg(b0_dir: Sequence[float]) -> float:
    """Angle (degrees) between B0 and the nearest voxel axis; 0 for a straight axial acquisition."""
    b = as_b0_dir(b0_dir)
    return float(np.degrees(np.arccos(np.clip(np.max(np.abs(b)), 0.0, 1.0))))


def rotation_matrix(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """3x3 rotation matrix about ``axis`` by ``angle_deg`` degrees (right-hand rule)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    t = np.radians(angle_deg)
    ux = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.cos(t) * np.eye(3) + np.sin(t) * ux + (1 - np.cos(t)) * np.outer(u, u)


def dipole_kernel(
    shape: Sequence[int],
    voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    real: bool = True,
) -> np.ndarray:
    """Unit dipole kernel in k-space, ``D(k) = 1/3 - (k.b)^2/|k|^2`` with ``D(0) = 0`` (float32).

    ``k`` is in physical units so anisotropic voxels are handled (Salomir 2003, Marques & Bowtell
    2005). ``real=True`` returns the :func:`numpy.fft.rfftn` half-spectrum layout.
    """
    vs = as_voxel_size(voxel_size_mm)
    b = as_b0_dir(b0_dir).astype(np.float32)
    k = _fft.kspace_coordinates(shape, vs, real=real)
    k2 = k[0] * k[0] + k[1] * k[1] + k[2] * k[2]
    # (k.b)^2 with the cross terms averaged over +-k on the Nyquist planes of even axes, where -N/2
    # has no +N/2 partner: keeps D Hermitian-symmetric (real fields) for oblique B0.
    kc = [ki.copy() for ki in k]
    for axis, n in enumerate(shape):
        if int(n) % 2 == 0 and kc[axis].shape[axis] > int(n) // 2:
            idx = [slice(None)] * 3
            idx[axis] = int(n) // 2
            kc[axis][tuple(idx)] = 0.0
    kb2 = (k[0] * b[0]) ** 2 + (k[1] * b[1]) ** 2 + (k[2] * b[2]) ** 2
    kb2 = kb2 + 2 * (kc[0] * kc[1] * (b[0] * b[1]) + kc[0] * kc[2] * (b[0] * b[2]) + kc[1] * kc[2] * (b[1] * b[2]))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.float32(1.0 / 3.0) - kb2 / k2
    d[0, 0, 0] = 0.0
    return d.astype(np.float32, copy=False)


def smv_kernel(
    shape: Sequence[int], voxel_size_mm: Sequence[float], radius_mm: float, real: bool = True
) -> np.ndarray:
    """k-space spherical mean value kernel ``S = F(s_r)`` for a normalised sphere of ``radius_mm`` (float32).

    The sphere is drawn on the voxel grid in physical units (an ellipsoid in index space for
    anisotropic voxels) with periodic wrap about the origin, so ``S(0) = 1`` exactly.
    """
    vs = as_voxel_size(voxel_size_mm)
    if radius_mm <= 0:
        raise ValueError(f"radius_mm must be positive, got {radius_mm}")
    x, y, z = _fft.image_coordinates_mm(shape, vs)
    sphere = ((x * x + y * y + z * z) <= np.float32(radius_mm) ** 2).astype(np.float32)
    sphere /= sphere.sum()
    if real:
        return _fft.rfftn(sphere).real.astype(np.float32)
    return _fft.fftn(sphere).real.astype(np.float32)


def sphere_volume_voxels(voxel_size_mm: Sequence[float], radius_mm: float) -> int:
    """Number of grid voxels inside a sphere of ``radius_mm`` (for choosing kernels on coarse grids)."""
    vs = as_voxel_size(voxel_size_mm)
    half = np.ceil(radius_mm / vs).astype(int)
    axes = [np.arange(-h, h + 1) * v for h, v in zip(half, vs)]
    gx, gy, gz = np.meshgrid(*axes, indexing="ij")
    return int(np.count_nonzero(gx**2 + gy**2 + gz**2 <= radius_mm**2))


def forward_field_ppm(
    chi_ppm: np.ndarray,
    voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    pad_voxels: int | Sequence[int] = 0,
) -> np.ndarray:
    """Relative field (ppm) of a susceptibility distribution (ppm): ``F^-1[D F chi]``.

    ``pad_voxels`` zero-pads each side before the FFT to suppress circular wrap of the field from
    sources near the edges (use about half the object size for a faithful free-space field).
    """
    chi = as_float_volume(chi_ppm, "chi_ppm")
    shape = _fft.fast_shape(chi.shape, pad_voxels)
    chi_p, crop = _fft.pad_volume(chi, shape)
    d = dipole_kernel(shape, voxel_size_mm, b0_dir)
    field = _fft.irfftn(_fft.rfftn(chi_p) * d, shape, overwrite=True)
    return np.ascontiguousarray(field[crop])
