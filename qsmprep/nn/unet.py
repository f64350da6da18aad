"""3D U-Net (Ronneberger et al. 2015; Cicek et al. 2016) as used by DeepQSM (Bollmann et al.,
NeuroImage 2019;195:373) and the background network of NeXtQSM (Cognolato et al., Med Image Anal 2023).

Each level: two 3x3x3 convolutions, each followed by a normalisation and LeakyReLU; max-pooling down;
up: 1x1x1 convolution halving the channels (at the coarse level) + trilinear x2 upsampling, then skip
concatenation. Channels double per level. Spatial sizes must be multiples of ``2**depth``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qsmprep.nn.dipole import tkd_padded

__all__ = ["UNet3d", "bg_unet_input", "rms_in_mask", "unet_input"]

NORMS = ("group", "instance", "batch", "none")


def _groups(ch: int, max_groups: int = 8) -> int:
    for g in range(min(max_groups, ch), 0, -1):
        if ch % g == 0:
            return g
    return 1


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(_groups(ch), ch)
    if kind == "instance":
        return nn.InstanceNorm3d(ch, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(ch)
    return nn.Identity()


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str):
        bias = norm == "none"
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            nn.LeakyReLU(0.1, inplace=True),
        )


class UNet3d(nn.Module):
    """3D U-Net ``(B, in_channels, X, Y, Z) -> (B, out_channels, X, Y, Z)`` (float32).

    ``width`` channels at the finest level, doubling per level; ``depth`` poolings, so X, Y, Z must be
    multiples of :attr:`multiple` ``= 2**depth`` (see :func:`qsmprep.nn.inference.predict_padded`).
    ``residual``: add ``input[:, :out_channels]`` to the output. ``norm``: ``"group"`` (GroupNorm, up to
    8 groups; default), ``"instance"``, ``"batch"`` or ``"none"``. GroupNorm/InstanceNorm statistics
    are taken over the whole input, so tiled inference is then only approximately equal to whole-volume
    inference; ``"batch"`` (running statistics in eval mode) or ``"none"`` keep the network local.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        width: int = 16,
        depth: int = 3,
        residual: bool = False,
        norm: str = "group",
    ):
        super().__init__()
        if int(depth) < 1 or int(width) < 1 or int(in_channels) < 1 or int(out_channels) < 1:
            raise ValueError("UNet3d needs depth >= 1, width >= 1 and at least one input/output channel")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if residual and out_channels > in_channels:
            raise ValueError("residual=True needs out_channels <= in_channels")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.width, self.depth, self.residual, self.norm = int(width), int(depth), bool(residual), norm
        self.multiple = 2**self.depth
        ch = [self.width * 2**i for i in range(self.depth + 1)]
        self.down = nn.ModuleList(
            [_DoubleConv(self.in_channels if i == 0 else ch[i - 1], ch[i], norm) for i in range(self.depth)]
        )
        self.bottom = _DoubleConv(ch[self.depth - 1], ch[self.depth], norm)
        self.reduce = nn.ModuleList([nn.Conv3d(ch[i + 1], ch[i], 1) for i in range(self.depth)])
        self.up = nn.ModuleList([_DoubleConv(2 * ch[i], ch[i], norm) for i in range(self.depth)])
        self.head = nn.Conv3d(ch[0], self.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet3d expects (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        if any(int(n) % self.multiple for n in x.shape[2:]):
            raise ValueError(
                f"UNet3d(depth={self.depth}) needs spatial sizes that are multiples of {self.multiple}, "
                f"got {tuple(x.shape[2:])}; pad with qsmprep.nn.inference.predict_padded"
            )
        skips = []
        h = x
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = F.max_pool3d(h, 2)
        h = self.bottom(h)
        for i in reversed(range(self.depth)):
            # 1x1x1 conv at the coarse level then trilinear upsampling (both linear: they commute)
            h = F.interpolate(self.reduce[i](h), scale_factor=2, mode="trilinear", align_corners=False)
            h = self.up[i](torch.cat([h, skips.pop()], dim=1))
        out = self.head(h)
        if self.residual:
            out = out + x[:, : self.out_channels]
        return out


def rms_in_mask(x: torch.Tensor, mask: torch.Tensor, floor: float = 1e-9) -> torch.Tensor:
    """Per-sample RMS of ``x`` inside ``mask`` over the spatial dims, shape (B, 1, 1, 1, 1).

    The U-Nets are applied as ``rms * net(x / rms)`` (times a fixed unit ratio): the prediction is then
    exactly proportional to the input field, as the physics (a linear inverse problem) requires, while
    the normalisation layers would otherwise discard the input's amplitude.
    """
    m = mask.to(x.dtype)
    n = m.sum(dim=(-4, -3, -2, -1), keepdim=True).clamp_min(1)
    return ((x * x * m).sum(dim=(-4, -3, -2, -1), keepdim=True) / n).sqrt().clamp_min(floor)


def unet_input(x: torch.Tensor, mask: torch.Tensor, in_channels: int, tkd_gain: float = 1.0,
               tkd_delta: float = 0.15) -> torch.Tensor:
    """The U-Net input for an RMS-normalised field ``x`` (``(B, 1, X, Y, Z)``, axial B0, 1 mm).

    One channel: ``x`` itself (DeepQSM, background net). Two channels (the TKD-primed DeepQSM):
    ``[tkd_gain * TKD(x), x]`` with :func:`qsmprep.nn.dipole.tkd_padded` (threshold ``tkd_delta``);
    ``tkd_gain`` converts chi per unit field into the network's output units, so that a residual
    U-Net predicts a correction of TKD.
    """
    if int(in_channels) == 1:
        return x
    if int(in_channels) != 2:
        raise ValueError(f"a field U-Net takes 1 (field) or 2 (TKD, field) input channels, got {in_channels}")
    return torch.cat([tkd_padded(x, mask, delta=float(tkd_delta)) * float(tkd_gain), x], dim=1)


#: Input channels of the prior-guided background network: [prior local field, total field, prior mask].
BG_PRIOR_CHANNELS = 3


def bg_unet_input(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input of the prior-guided background U-Net and the scale of its output.

    ``x``: ``(B, 3, X, Y, Z)`` = [prior local field (ppm, e.g. V-SHARP, 0 outside its eroded mask),
    total field (ppm, demeaned in ``mask``), prior mask (0/1)]; ``mask``: ``(B, 1, X, Y, Z)`` brain mask.
    Returns ``([prior / s, total / s_t, prior mask], s)`` with ``s`` and ``s_t`` the RMS of the prior and
    of the total field in ``mask`` (:func:`rms_in_mask`): a residual U-Net then predicts a correction of
    the prior (and the field in the prior's eroded rim), in units of ``s``, and ``s * net(...)`` scales
    with the fields as a linear background removal must.
    """
    if x.ndim != 5 or x.shape[1] != BG_PRIOR_CHANNELS:
        raise ValueError(f"the background U-Net input must be (B, {BG_PRIOR_CHANNELS}, X, Y, Z), got {tuple(x.shape)}")
    m = mask.to(x.dtype)
    prior, total, prior_mask = x[:, 0:1] * m, x[:, 1:2] * m, x[:, 2:3] * m
    s = rms_in_mask(prior, m)
    s_t = rms_in_mask(total, m)
    return torch.cat([prior / s, total / s_t, prior_mask], dim=1), s
