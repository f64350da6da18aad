"""Differentiable dipole convolution in torch (the forward model of the neural QSM stages).

The kernel is :func:`qsmprep.qsm.geometry.dipole_kernel` (physical k, any ``b0_dir`` in the voxel
frame, anisotropic voxels, ``D(0) = 0``) in the :func:`torch.fft.rfftn` half-spectrum layout, so the
torch and numpy forward models agree to float32 precision.
"""

from __future__ import annotations

from typing import Sequence

import torch

from qsmprep.qsm.geometry import dipole_kernel

__all__ = ["dipole_kernel_torch", "dipole_convolve"]


def dipole_kernel_torch(
    shape: Sequence[int],
    voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Unit dipole kernel ``D(k) = 1/3 - (k.b)^2/|k|^2`` (float32, rfft layout ``(X, Y, Z//2+1)``).

    ``shape`` is the spatial shape of the volumes it will be applied to (after any padding).
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive integers, got {shape}")
    d = dipole_kernel(shape, voxel_size_mm, b0_dir, real=True)
    return torch.from_numpy(d).to(device=device, dtype=torch.float32)


def dipole_convolve(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``F^-1[D F x]`` over the last three dimensions of real ``x`` (e.g. ``(B, 1, X, Y, Z)``), differentiable.

    ``kernel`` comes from :func:`dipole_kernel_torch` for ``x``'s spatial shape. Circular convolution:
    zero-pad ``x`` beforehand when wrap-around matters.
    """
    spatial = tuple(x.shape[-3:])
    want = (spatial[0], spatial[1], spatial[2] // 2 + 1)
    if tuple(kernel.shape[-3:]) != want:
        raise ValueError(
            f"dipole kernel has shape {tuple(kernel.shape)} but volumes of spatial shape {spatial} need {want}"
        )
    xk = torch.fft.rfftn(x, dim=(-3, -2, -1))
    return torch.fft.irfftn(xk * kernel, s=spatial, dim=(-3, -2, -1))
