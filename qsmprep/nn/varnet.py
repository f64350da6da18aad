"""Variational network for dipole inversion (NeXtQSM: Cognolato et al., Med Image Anal 2023;
after Hammernik et al., MRM 2018 and the learned proximal/gradient schemes of LPCNN and MoDL-QSM).

``S`` unrolled steps ``chi <- M [chi - lambda_i Phi^T M (Phi chi - f) - s_chi Psi_i(chi / s_chi)]``
with ``Phi`` the dipole convolution for the scan's true B0 direction and voxel size (oblique and
anisotropic supported), ``Psi_i`` a small CNN per step and ``lambda_i = softplus(p_i) > 0`` learned.
Fields and chi are in ppm; ``Psi_i`` sees ``chi / chi_scale_ppm`` (O(1) numbers). Since
``||Phi^T M Phi|| <= 4/9``, ``lambda_i`` near 1 is a stable gradient step.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from qsmprep.nn.dipole import dipole_convolve
from qsmprep.nn.unet import UNet3d

__all__ = ["VarNet", "tkd_start"]

INITS = ("tkd", "zeros")


def tkd_start(field_ppm: torch.Tensor, mask: torch.Tensor, kernel: torch.Tensor, delta: float = 0.15) -> torch.Tensor:
    """Truncated k-space division (Shmueli et al., MRM 2009) of the masked field, times ``mask`` (ppm)."""
    sign = torch.where(kernel < 0, -1.0, 1.0).to(kernel.dtype)
    inv = torch.where(kernel.abs() > delta, 1.0 / torch.where(kernel == 0, 1.0, kernel), sign / delta)
    inv = inv.clone()
    inv[..., 0, 0, 0] = 0.0
    return dipole_convolve(field_ppm * mask, inv) * mask


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
    regulariser inputs O(1). Spatial sizes must be multiples of :attr:`multiple`.
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
    ):
        super().__init__()
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not init_step > 0:
            raise ValueError(f"init_step must be positive, got {init_step}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.steps, self.width, self.depth = int(steps), int(width), int(depth)
        self.init, self.tkd_delta = init, float(tkd_delta)
        self.field_scale_ppm, self.chi_scale_ppm = float(field_scale_ppm), float(chi_scale_ppm)
        if self.depth >= 1:
            self.psi = nn.ModuleList([UNet3d(1, 1, self.width, self.depth, norm=norm) for _ in range(self.steps)])
            self.multiple = 2**self.depth
        else:
            self.psi = nn.ModuleList([_SmallCNN(self.width) for _ in range(self.steps)])
            self.multiple = 1
        # softplus^-1(init_step)
        raw = float(init_step) + math.log(-math.expm1(-float(init_step)))
        self.step_raw = nn.Parameter(torch.full((self.steps,), raw, dtype=torch.float32))

    def step_sizes(self) -> torch.Tensor:
        """The positive step sizes ``lambda_i = softplus(p_i)``."""
        return F.softplus(self.step_raw)

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
        lam = self.step_sizes()
        s = self.chi_scale_ppm
        for i in range(self.steps):
            grad = dipole_convolve(m * (dipole_convolve(x, kernel) - f), kernel)  # Phi^T = Phi (D real, even)
            x = (x - lam[i] * grad - s * self.psi[i](x / s)) * m
        return x
