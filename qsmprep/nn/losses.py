"""Training losses (torch) for the neural QSM stages; tensors ``(B, 1, X, Y, Z)``, masks 0/1.

``uqsm_loss`` is the self-supervised data-consistency loss of uQSM (Liu J, Koch KM, "Meta-QSM" /
"uQSM", arXiv 1905.05953 and MRM 2021): the misfit between the unit phasors of the measured phase
and of the phase of the modelled field ``Phi chi``, weighted (e.g. by magnitude), plus total
variation. It needs no ground truth, so it can fine-tune a network on the measured field itself.
"""

from __future__ import annotations

import math

import torch

from qsmprep.qsm.constants import GAMMA_BAR_HZ_PER_T

__all__ = ["masked_l1", "masked_l2", "nrmse", "total_variation", "phase_per_ppm", "uqsm_loss"]


def _mask_like(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(x)
    if mask.shape != x.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the volumes have shape {tuple(x.shape)}")
    return mask.to(x.dtype)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error over the mask voxels (all voxels when ``mask`` is None)."""
    m = _mask_like(mask, pred)
    return ((pred - target).abs() * m).sum() / m.sum().clamp_min(1.0)


def masked_l2(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the mask voxels."""
    m = _mask_like(mask, pred)
    return ((pred - target) ** 2 * m).sum() / m.sum().clamp_min(1.0)


def nrmse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, demean: bool = True) -> torch.Tensor:
    """NRMSE (%) per sample, averaged over the batch: ``100 ||x - t|| / ||t||`` in the mask, each
    demeaned in the mask by default (like :func:`qsmprep.qsm.metrics.nrmse`)."""
    m = _mask_like(mask, pred)
    dims = tuple(range(1, pred.ndim))
    n = m.sum(dim=dims, keepdim=True).clamp_min(1.0)
    x, t = pred, target
    if demean:
        x = x - (x * m).sum(dim=dims, keepdim=True) / n
        t = t - (t * m).sum(dim=dims, keepdim=True) / n
    err = torch.sqrt((((x - t) * m) ** 2).sum(dim=dims))
    ref = torch.sqrt(((t * m) ** 2).sum(dim=dims)).clamp_min(1e-12)
    return (100.0 * err / ref).mean()


def total_variation(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Anisotropic TV: mean over the mask of ``sum_i |x(r + e_i) - x(r)|`` (forward differences)."""
    m = _mask_like(mask, x)
    tv = torch.zeros((), dtype=x.dtype, device=x.device)
    for d in (-3, -2, -1):
        n = x.shape[d]
        diff = (x.narrow(d, 1, n - 1) - x.narrow(d, 0, n - 1)).abs()
        tv = tv + (diff * m.narrow(d, 0, n - 1)).sum()
    return tv / m.sum().clamp_min(1.0)


def phase_per_ppm(b0_tesla: float, te_s: float) -> float:
    """Phase (rad) per ppm of field at ``b0_tesla`` (T) and echo time ``te_s`` (s): ``2 pi gamma_bar B0 TE 1e-6``."""
    if not (b0_tesla > 0 and te_s > 0):
        raise ValueError(f"b0_tesla and te_s must be positive, got {b0_tesla} T and {te_s} s")
    if te_s > 1.0:
        raise ValueError(f"te_s is in seconds; {te_s} looks like milliseconds")
    return 2.0 * math.pi * GAMMA_BAR_HZ_PER_T * float(b0_tesla) * float(te_s) * 1e-6


def uqsm_loss(
    chi_ppm: torch.Tensor,
    field_ppm: torch.Tensor,
    mask: torch.Tensor,
    kernel: torch.Tensor,
    weight: torch.Tensor | None = None,
    b0_tesla: float = 3.0,
    te_s: float = 0.02,
    tv_weight: float = 0.0,
    phase_scale: float | None = None,
) -> torch.Tensor:
    """uQSM self-supervised loss (Liu & Koch 2019/2021).

    ``mean_mask |W (exp(i phi(Phi chi)) - exp(i phi(f)))|^2 + tv_weight * TV(chi)``, with
    ``phi(f) = phase_scale * f`` rad and ``phase_scale = 2 pi gamma_bar B0 TE 1e-6`` rad/ppm (from
    ``b0_tesla``, ``te_s``) unless given. ``|e^{ia} - e^{ib}|^2 = 2 (1 - cos(a - b))`` is used (real
    arithmetic). ``Phi`` = circular dipole convolution with ``kernel`` (from
    :func:`qsmprep.nn.dipole.dipole_kernel_torch` for the volume's shape; zero-pad beforehand if
    the wrap matters). ``weight`` (e.g. normalised magnitude) defaults to 1.
    """
    from qsmprep.nn.dipole import dipole_convolve

    if chi_ppm.shape != field_ppm.shape:
        raise ValueError(f"chi_ppm {tuple(chi_ppm.shape)} and field_ppm {tuple(field_ppm.shape)} differ in shape")
    m = _mask_like(mask, chi_ppm)
    s = phase_per_ppm(b0_tesla, te_s) if phase_scale is None else float(phase_scale)
    model = dipole_convolve(chi_ppm, kernel)
    w2 = m if weight is None else m * weight.to(chi_ppm.dtype) ** 2
    misfit = 2.0 * (1.0 - torch.cos(s * (model - field_ppm)))
    loss = (misfit * w2).sum() / m.sum().clamp_min(1.0)
    if tv_weight:
        loss = loss + float(tv_weight) * total_variation(chi_ppm, m)
    return loss
