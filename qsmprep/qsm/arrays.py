"""Input checks shared by the public functions of :mod:`qsmprep.qsm`.

Every check raises :class:`ValueError` with a message that names the argument and the problem, so
that callers (interfaces, the CLI) can pass it on to users unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def as_float_volume(arr, name: str, ndim: int | tuple[int, ...] = 3, allow_nan: bool = False) -> np.ndarray:
    """Return ``arr`` as a float32 array after checking its dimensionality and finiteness."""
    a = np.asarray(arr)
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if a.ndim not in ndims:
        want = " or ".join(f"{n}D" for n in ndims)
        raise ValueError(f"{name} must be a {want} array, got shape {a.shape}")
    if np.iscomplexobj(a):
        raise ValueError(f"{name} must be real-valued, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    a = a.astype(np.float32, copy=False)
    if not allow_nan and not np.all(np.isfinite(a)):
        n_bad = int(np.count_nonzero(~np.isfinite(a)))
        raise ValueError(f"{name} contains {n_bad} NaN or infinite values; replace them (e.g. with 0) first")
    return a


def as_mask(mask, name: str = "mask", shape: Sequence[int] | None = None) -> np.ndarray:
    """Return ``mask`` as a boolean array, checking its shape and that it is not empty."""
    m = np.asarray(mask)
    if shape is not None and tuple(m.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {m.shape} but the data have shape {tuple(shape)}")
    if m.dtype != bool:
        if not np.all(np.isfinite(m)):
            raise ValueError(f"{name} contains NaN or infinite values")
        m = m > 0.5 if np.issubdtype(m.dtype, np.floating) else m != 0
    if not m.any():
        raise ValueError(f"{name} is empty: it has no voxel set")
    return m


def as_voxel_size(voxel_size_mm, ndim: int = 3) -> np.ndarray:
    """Return voxel sizes (mm) as a float64 array of length ``ndim``; a scalar is broadcast."""
    vs = np.asarray(voxel_size_mm, dtype=np.float64).reshape(-1)
    if vs.size == 1:
        vs = np.repeat(vs, ndim)
    if vs.size != ndim:
        raise ValueError(f"voxel_size_mm must have {ndim} entries, got {vs.size}")
    if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size_mm must be positive and finite, got {vs.tolist()}")
    return vs


def as_b0_dir(b0_dir, atol: float = 1e-3) -> np.ndarray:
    """Return the B0 direction as a float64 unit 3-vector; refuse vectors that are not unit length."""
    b = np.asarray(b0_dir, dtype=np.float64).reshape(-1)
    if b.size != 3 or not np.all(np.isfinite(b)):
        raise ValueError(f"b0_dir must be a finite 3-vector, got {np.asarray(b0_dir).tolist()}")
    norm = float(np.linalg.norm(b))
    if abs(norm - 1.0) > atol:
        raise ValueError(
            f"b0_dir must be a unit vector (|b| = 1), got |b| = {norm:.4g}; normalise it first"
        )
    return b / norm


def as_echo_times(echo_times_s, n_echoes: int | None = None, min_echoes: int = 1) -> np.ndarray:
    """Return echo times (s) as float64, checking count, positivity and that they are in seconds."""
    te = np.asarray(echo_times_s, dtype=np.float64).reshape(-1)
    if te.size < min_echoes:
        raise ValueError(f"at least {min_echoes} echo time(s) are needed, got {te.size}")
    if n_echoes is not None and te.size != n_echoes:
        raise ValueError(f"got {te.size} echo times for {n_echoes} echoes")
    if not np.all(np.isfinite(te)) or np.any(te <= 0):
        raise ValueError(f"echo times must be positive and finite, got {te.tolist()}")
    if np.any(te > 1.0):
        raise ValueError(f"echo times must be in seconds; got {te.tolist()} (milliseconds?)")
    return te


def same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str, ndim: int = 3) -> None:
    """Raise if the first ``ndim`` dimensions of ``a`` and ``b`` differ."""
    if tuple(a.shape[:ndim]) != tuple(b.shape[:ndim]):
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}")
