"""FFT helpers: real FFTs in float32/complex64 on all cores, k-space grids and padding.

All k-space operators in :mod:`qsmprep.qsm` use the half-spectrum layout of :func:`numpy.fft.rfftn`
(last axis of length ``n // 2 + 1``); kernels that are real and even (dipole, SMV, Laplacian) fit it.

The forward transforms run in PyTorch's CPU FFT when torch is installed (a qsmprep dependency; on x86
it is Intel MKL's FFT), the inverse real transform in SciPy's pocketfft: on 2 cores a float32 3D
forward real FFT of PDF's 192 x 240 x 200 box takes 7-17 ms in torch 2.13 and 16-19 ms in SciPy, the
inverse 32-45 ms in torch and 22-34 ms in SciPy (``benchmarks/bench_fft.py`` prints both), and PDF and
MEDI spend more than half of their time in FFTs. Results agree to float32 rounding (relative 4e-7);
each backend is deterministic for a given thread count (MKL's last bits change with the count).
``QSMPREP_FFT_BACKEND`` (or :data:`FFT_BACKEND`): ``auto`` (this split, the default), ``torch`` (every
transform in torch) or ``scipy`` (none).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import scipy.fft as sfft

#: Number of FFT worker threads (-1: all cores).
FFT_WORKERS = -1

#: FFT library: ``"auto"`` (torch's forward transforms and SciPy's inverse real one; SciPy alone without
#: torch), ``"torch"`` or ``"scipy"``; the environment variable ``QSMPREP_FFT_BACKEND`` sets the default.
FFT_BACKEND = os.environ.get("QSMPREP_FFT_BACKEND", "auto").strip().lower() or "auto"

_TORCH = None  # the torch module once imported (False: not importable)


def _torch():
    """torch when the FFT backend is torch (imported on first use: a ~1 s import that array code
    without FFTs does not pay), else None."""
    global _TORCH
    backend = FFT_BACKEND
    if backend not in ("auto", "torch", "scipy"):
        raise ValueError(f"FFT backend must be 'auto', 'torch' or 'scipy', got {backend!r} (QSMPREP_FFT_BACKEND)")
    if backend == "scipy":
        return None
    if _TORCH is None:
        try:
            import torch
        except ImportError:
            if backend == "torch":
                raise
            torch = False
        _TORCH = torch
    if _TORCH is False:
        return None
    n = int(FFT_WORKERS) if int(FFT_WORKERS) > 0 else (os.cpu_count() or 1)
    if _TORCH.get_num_threads() != n:
        _TORCH.set_num_threads(n)
    return _TORCH


@contextmanager
def fft_backend_scope(backend: str):
    """Run the block with :data:`FFT_BACKEND` set to ``backend`` (``"auto"``, ``"torch"``, ``"scipy"``)."""
    global FFT_BACKEND
    old = FFT_BACKEND
    FFT_BACKEND = str(backend).strip().lower()
    try:
        _torch()  # validates the name
        yield
    finally:
        FFT_BACKEND = old


def fft_backend() -> str:
    """The FFT libraries the transforms below use now: ``"torch"``, ``"scipy"`` or ``"torch+scipy"``
    (forward transforms in torch, the inverse real one in SciPy)."""
    if _torch() is None:
        return "scipy"
    return "torch" if FFT_BACKEND == "torch" else "torch+scipy"


def _tensor(torch, x: np.ndarray):
    if not x.flags.writeable:  # torch.from_numpy shares memory and warns about read-only arrays
        x = x.copy()
    return torch.from_numpy(x)


def rfftn(x: np.ndarray, shape: Sequence[int] | None = None) -> np.ndarray:
    """Real 3D FFT of ``x`` (zero-padded at the end to ``shape`` when given); complex64 out."""
    x = np.asarray(x, dtype=np.float32)
    torch = _torch()
    if torch is not None:
        s = None if shape is None else tuple(int(n) for n in shape)
        return torch.fft.rfftn(_tensor(torch, x), s=s, dim=(0, 1, 2)).numpy()
    return sfft.rfftn(x, s=shape, axes=(0, 1, 2), workers=FFT_WORKERS)


def irfftn(x_k: np.ndarray, shape: Sequence[int], overwrite: bool = False) -> np.ndarray:
    """Inverse of :func:`rfftn` for a real array of ``shape``; float32 out.

    ``overwrite=True`` lets the FFT use ``x_k`` as its work space (its content is then undefined): for a
    spectrum that is a temporary, it saves the copy of the half spectrum (about 30 % of the CPU time of
    a 3D inverse real FFT in SciPy); the result is the same."""
    torch = _torch() if FFT_BACKEND == "torch" else None  # auto: SciPy's inverse is the faster one
    if torch is not None:
        x_k = np.asarray(x_k)
        if x_k.dtype != np.complex64 and x_k.dtype != np.complex128:
            x_k = x_k.astype(np.complex64)
        out = torch.fft.irfftn(_tensor(torch, x_k), s=tuple(int(n) for n in shape), dim=(0, 1, 2)).numpy()
        return out.astype(np.float32, copy=False)
    out = sfft.irfftn(x_k, s=tuple(shape), axes=(0, 1, 2), workers=FFT_WORKERS, overwrite_x=overwrite)
    return out.astype(np.float32, copy=False)


def _complex_fft(x: np.ndarray, inverse: bool) -> np.ndarray:
    torch = _torch()
    if torch is not None:
        x = np.asarray(x)
        if not (np.iscomplexobj(x) or x.dtype == np.float32 or x.dtype == np.float64):
            x = x.astype(np.float64)
        op = torch.fft.ifftn if inverse else torch.fft.fftn
        return op(_tensor(torch, x), dim=(0, 1, 2)).numpy()
    op = sfft.ifftn if inverse else sfft.fftn
    return op(x, axes=(0, 1, 2), workers=FFT_WORKERS)


def fftn(x: np.ndarray) -> np.ndarray:
    """Complex 3D FFT on all cores (complex64 for complex64/float32 input)."""
    return _complex_fft(x, inverse=False)


def ifftn(x_k: np.ndarray) -> np.ndarray:
    """Inverse of :func:`fftn`."""
    return _complex_fft(x_k, inverse=True)


def fast_shape(shape: Sequence[int], pad: Sequence[int] | int = 0) -> tuple[int, ...]:
    """Smallest FFT-friendly shape >= ``shape + 2*pad`` (5-smooth lengths, even on the last axis)."""
    pad = np.broadcast_to(np.asarray(pad, dtype=int), (len(shape),))
    out = []
    for i, (n, p) in enumerate(zip(shape, pad)):
        m = sfft.next_fast_len(int(n + 2 * p), real=True)
        if i == len(shape) - 1 and m % 2:
            m = sfft.next_fast_len(m + 1, real=True)
        out.append(int(m))
    return tuple(out)


def pad_volume(x: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad ``x`` (3D or more) centred into ``shape`` (first 3 axes); return it and the crop slices."""
    x = np.asarray(x)
    if tuple(shape) == tuple(x.shape[:3]):
        return x, tuple(slice(0, n) for n in x.shape[:3])
    before = [(s - n) // 2 for s, n in zip(shape, x.shape[:3])]
    if any(b < 0 for b in before):
        raise ValueError(f"cannot pad shape {x.shape[:3]} into smaller shape {tuple(shape)}")
    out = np.zeros(tuple(shape) + x.shape[3:], dtype=x.dtype)
    crop = tuple(slice(b, b + n) for b, n in zip(before, x.shape[:3]))
    out[crop] = x
    return out, crop


def kspace_coordinates(
    shape: Sequence[int], voxel_size_mm: Sequence[float], real: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable k-space coordinates (cycles/mm) for a grid of ``shape`` and voxel size (mm).

    ``real=True`` gives the half-spectrum layout of :func:`rfftn` (last axis ``n//2 + 1``).
    """
    nx, ny, nz = (int(n) for n in shape)
    vx, vy, vz = (float(v) for v in voxel_size_mm)
    kx = np.fft.fftfreq(nx, d=vx).astype(np.float32)[:, None, None]
    ky = np.fft.fftfreq(ny, d=vy).astype(np.float32)[None, :, None]
    kz_fn = np.fft.rfftfreq if real else np.fft.fftfreq
    kz = kz_fn(nz, d=vz).astype(np.float32)[None, None, :]
    return kx, ky, kz


def image_coordinates_mm(shape: Sequence[int], voxel_size_mm: Sequence[float]) -> tuple[np.ndarray, ...]:
    """Broadcastable signed distances (mm) from the origin voxel with periodic wrap (FFT kernel layout)."""
    coords = []
    for axis, (n, v) in enumerate(zip(shape, voxel_size_mm)):
        idx = np.fft.fftfreq(int(n), d=1.0 / int(n)).astype(np.float32) * np.float32(v)
        view = [1, 1, 1]
        view[axis] = int(n)
        coords.append(idx.reshape(view))
    return tuple(coords)


def mask_bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box (slices) of a non-empty boolean mask."""
    sl = []
    for ax in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(sl)


class PaddedBox:
    """The mask bounding box zero-padded by ``pad`` voxels per side to a fast FFT shape."""

    def __init__(self, mask: np.ndarray, pad):
        self.full_shape = mask.shape
        self.bbox = mask_bbox(mask)
        mc = mask[self.bbox]
        self.shape = fast_shape(mc.shape, pad)
        self.mask, self.crop = pad_volume(mc, self.shape)

    def pad(self, vol: np.ndarray) -> np.ndarray:
        """``vol`` (full grid) masked, cropped to the box and zero-padded; float32."""
        vc = np.where(self.mask[self.crop], vol[self.bbox], np.float32(0.0)).astype(np.float32, copy=False)
        return pad_volume(vc, self.shape)[0]

    def unpad(self, field: np.ndarray, mask_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Back to the full grid: float32 field (0 outside ``mask_out``) and the bool mask."""
        out = np.zeros(self.full_shape, np.float32)
        mout = np.zeros(self.full_shape, bool)
        mc = mask_out[self.crop]
        out[self.bbox] = np.where(mc, field[self.crop], np.float32(0.0))
        mout[self.bbox] = mc
        return out, mout
