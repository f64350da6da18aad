"""Differentiable dipole convolution in torch (the forward model of the neural QSM stages).

The kernel is :func:`qsmprep.qsm.geometry.dipole_kernel` (physical k, any ``b0_dir`` in the voxel
frame, anisotropic voxels, ``D(0) = 0``) in the :func:`torch.fft.rfftn` half-spectrum layout, so the
torch and numpy forward models agree to float32 precision.
"""

from __future__ import annotations

import functools
from typing import Sequence

import scipy.fft as sfft
import torch

from qsmprep.qsm.geometry import dipole_kernel

__all__ = ["dipole_kernel_torch", "dipole_convolve", "tkd_inverse_kernel", "tkd_padded"]


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


def tkd_inverse_kernel(kernel: torch.Tensor, delta: float = 0.15) -> torch.Tensor:
    """Truncated inverse of the dipole kernel (Shmueli et al., MRM 2009): ``1/D`` where ``|D| > delta``,
    ``sign(D)/delta`` elsewhere, 0 at ``k = 0`` (same layout as ``kernel``)."""
    sign = torch.where(kernel < 0, -1.0, 1.0).to(kernel.dtype)
    inv = torch.where(kernel.abs() > delta, 1.0 / torch.where(kernel == 0, 1.0, kernel), sign / delta)
    inv = inv.clone()
    inv[..., 0, 0, 0] = 0.0
    return inv


@functools.lru_cache(maxsize=8)
def _tkd_inverse_kernel_cpu(shape, voxel_size_mm, b0_dir, delta) -> torch.Tensor:
    """Cached TKD inverse kernel (training calls :func:`tkd_padded` on one patch shape every step)."""
    return tkd_inverse_kernel(dipole_kernel_torch(shape, voxel_size_mm, b0_dir), delta)


def tkd_padded(
    field_ppm: torch.Tensor,
    mask: torch.Tensor,
    delta: float = 0.15,
    pad: int = 16,
    voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
) -> torch.Tensor:
    """TKD of ``field_ppm * mask`` (``(B, C, X, Y, Z)``, ppm) zero-padded by ``pad`` voxels per side to a
    fast FFT size (no wrap-around), cropped back and masked: chi in ppm. The fixed first layer of the
    TKD-primed DeepQSM U-Net (:func:`qsmprep.nn.inference.deepqsm`)."""
    spatial = tuple(int(n) for n in field_ppm.shape[-3:])
    shape = tuple(sfft.next_fast_len(n + 2 * int(pad), real=True) for n in spatial)
    m = mask.to(field_ppm.dtype)
    before = [(t - n) // 2 for t, n in zip(shape, spatial)]
    widths = []
    for b, t, n in zip(reversed(before), reversed(shape), reversed(spatial)):
        widths += [b, t - n - b]
    x = torch.nn.functional.pad(field_ppm * m, widths)
    key = (shape, tuple(float(v) for v in voxel_size_mm), tuple(float(v) for v in b0_dir), float(delta))
    inv = _tkd_inverse_kernel_cpu(*key).to(field_ppm.device)
    y = dipole_convolve(x, inv)
    crop = tuple(slice(b, b + n) for b, n in zip(before, spatial))
    return y[(..., *crop)] * m
