"""Variational network for dipole inversion (NeXtQSM: Cognolato et al., Med Image Anal 2023;
after Hammernik et al., MRM 2018 and the learned proximal/gradient schemes of LPCNN and MoDL-QSM).

``S`` unrolled steps ``chi <- M [chi - lambda_i Phi^T M (Phi chi - f) - s_chi Psi_i(chi / s_chi)]``
with ``Phi`` the dipole convolution for the scan's true B0 direction and voxel size (oblique and
anisotropic supported), ``Psi_i`` a small CNN per step and ``lambda_i = softplus(p_i) > 0`` learned.
Fields and chi are in ppm; ``Psi_i`` sees ``chi / chi_scale_ppm`` (O(1) numbers). Since
``||Phi^T M Phi|| <= 4/9``, ``lambda_i`` near 1 is a stable gradient step.

``data_term="exact"`` (MoDL: Aggarwal et al., IEEE TMI 2019; MoDL-QSM: Feng et al., NeuroImage 2021)
replaces the gradient step by an exact data-consistency step: ``z = chi - s_chi Psi_i(chi / s_chi)``,
``chi <- M F^-1[(D F f + mu_i F z) / (D^2 + mu_i)]`` with learned ``mu_i = softplus(q_i) > 0`` (the field
outside the mask taken as 0), which keeps the well-conditioned k-space (away from the magic-angle
cone) tied to the measured field and so preserves the contrast of large structures.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from qsmprep.nn.dipole import dipole_convolve, tkd_inverse_kernel
from qsmprep.nn.unet import UNet3d

__all__ = ["VarNet", "tkd_start"]

INITS = ("tkd", "zeros")
DATA_TERMS = ("gradient", "exact")


def tkd_start(field_ppm: torch.Tensor, mask: torch.Tensor, kernel: torch.Tensor, delta: float = 0.15) -> torch.Tensor:
    """Truncated k-space division (Shmueli et al., MRM 2009) of the masked field, times ``mask`` (ppm)."""
    return dipole_convolve(field_ppm * mask, tkd_inverse_kernel(kernel, delta)) * mask


class _SmallCNN(nn.Sequential):
    """Three 3x3x3 convolutions ``1 -> width -> width -> 1`` with LeakyReLU (receptive radius 3)."""

    def __init__(self, width: int):
        super().__init__(
            nn.Conv3d(1, width, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv3d(width, width, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv3d(width, 1, 3, padding=1),
        )
        self.multiple = 1


class VarNet(nn.Module):
    """Unrolled variational network ``(field_ppm, mask, kernel) -> chi_ppm`` (all ``(B, 1, X, Y, Z)``).

    ``steps`` unrolled gradient steps, each with its own regulariser ``Psi_i``: ``UNet3d(1, 1, width,
    depth)`` when ``depth >= 1``, a 3-layer CNN of ``width`` channels when ``depth == 0``.
    ``init_step``: initial ``lambda_i``. ``init``: starting point ``x0`` when none is given:
    ``"tkd"`` (default; TKD with ``tkd_delta``, masked) or ``"zeros"``. ``field_scale_ppm`` and
    ``chi_scale_ppm`` are the fixed scales (typical local field ~0.05 ppm, chi ~0.2 ppm) that make the
    regulariser inputs O(1). ``data_term``: ``"gradient"`` (default) or ``"exact"`` (closed-form
    data consistency with learned prior weights ``mu_i``, initially ``init_mu``; see the module
    docstring). Spatial sizes must be multiples of :attr:`multiple`.
    """

    def __init__(
        self,
        steps: int = 5,
        width: int = 16,
        depth: int = 2,
        init_step: float = 1.0,
        init: str = "tkd",
        tkd_delta: float = 0.15,
        field_scale_ppm: float = 0.05,
        chi_scale_ppm: float = 0.2,
        norm: str = "group",
        data_term: str = "gradient",
        init_mu: float = 0.05,
    ):
        super().__init__()
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not init_step > 0:
            raise ValueError(f"init_step must be positive, got {init_step}")
        if data_term not in DATA_TERMS:
            raise ValueError(f"data_term must be one of {DATA_TERMS}, got {data_term!r}")
        if not init_mu > 0:
            raise ValueError(f"init_mu must be positive, got {init_mu}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.steps, self.width, self.depth = int(steps), int(width), int(depth)
        self.init, self.tkd_delta, self.data_term = init, float(tkd_delta), data_term
        self.field_scale_ppm, self.chi_scale_ppm = float(field_scale_ppm), float(chi_scale_ppm)
        if self.depth >= 1:
            self.psi = nn.ModuleList([UNet3d(1, 1, self.width, self.depth, norm=norm) for _ in range(self.steps)])
            self.multiple = 2**self.depth
        else:
            self.psi = nn.ModuleList([_SmallCNN(self.width) for _ in range(self.steps)])
            self.multiple = 1
        # softplus^-1(init_step)
        raw = float(init_step) + math.log(-math.expm1(-float(init_step)))
        if data_term == "gradient":
            self.step_raw = nn.Parameter(torch.full((self.steps,), raw, dtype=torch.float32))
        else:
            raw_mu = float(init_mu) + math.log(-math.expm1(-float(init_mu)))
            self.mu_raw = nn.Parameter(torch.full((self.steps,), raw_mu, dtype=torch.float32))

    def step_sizes(self) -> torch.Tensor:
        """The positive step sizes ``lambda_i = softplus(p_i)`` (gradient data term)."""
        return F.softplus(self.step_raw)

    def dc_weights(self) -> torch.Tensor:
        """The positive prior weights ``mu_i = softplus(q_i)`` of the exact data-consistency steps."""
        return F.softplus(self.mu_raw)

    def forward(
        self, field_ppm: torch.Tensor, mask: torch.Tensor, kernel: torch.Tensor, x0: torch.Tensor | None = None
    ) -> torch.Tensor:
        if field_ppm.ndim != 5 or field_ppm.shape[1] != 1 or mask.shape != field_ppm.shape:
            raise ValueError(
                f"VarNet expects field and mask of the same shape (B, 1, X, Y, Z), got "
                f"{tuple(field_ppm.shape)} and {tuple(mask.shape)}"
            )
        m = mask.to(field_ppm.dtype)
        f = field_ppm * m
        if x0 is not None:
            x = x0 * m
        elif self.init == "tkd":
            x = tkd_start(f, m, kernel, self.tkd_delta)
        else:
            x = torch.zeros_like(f)
        s = self.chi_scale_ppm
        if self.data_term == "exact":
            dims = (-3, -2, -1)
            fk = torch.fft.rfftn(f, dim=dims) * kernel
            d2 = kernel * kernel
            mu = self.dc_weights()
            for i in range(self.steps):
                z = x - s * self.psi[i](x / s)
                xk = (fk + mu[i] * torch.fft.rfftn(z, dim=dims)) / (d2 + mu[i])
                x = torch.fft.irfftn(xk, s=tuple(f.shape[-3:]), dim=dims) * m
            return x
        lam = self.step_sizes()
        for i in range(self.steps):
            grad = dipole_convolve(m * (dipole_convolve(x, kernel) - f), kernel)  # Phi^T = Phi (D real, even)
            x = (x - lam[i] * grad - s * self.psi[i](x / s)) * m
        return x
