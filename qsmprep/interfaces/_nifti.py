"""NIfTI and provenance helpers shared by the qsmprep Nipype interfaces (I/O only, no physics).

Intermediate images are written uncompressed (``.nii``) into the node's working directory: gzip of a
head-sized 4D volume costs seconds and the work directory is scratch space. Every output keeps the
affine, qform/sform codes and spatial header fields of its reference image (the echo-1 magnitude),
with float32 data (masks uint8) and no scaling.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np


__all__ = [
    "load_float",
    "load_mask",
    "save_like",
    "set_threads",
]


def load_float(path: str | os.PathLike) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Data of a NIfTI file as float32 (header scaling applied, Fortran order as stored) and the image
    (for its header). A gzipped file is decompressed in memory with ISA-L (faster than zlib; releases
    the GIL, so several files can be read in threads)."""
    path = str(path)
    if path.endswith(".gz"):
        from isal import isal_zlib

        with open(path, "rb") as fh:
            raw = isal_zlib.decompress(fh.read(), wbits=31)
        klass = nib.Nifti2Image if int.from_bytes(raw[:4], "little") in (540, 469893120) else nib.Nifti1Image
        img = klass.from_bytes(raw)
        data = np.asarray(img.get_fdata(dtype=np.float32))
        # the same header and affine, without holding on to the decompressed bytes
        return data, klass(data, img.affine, img.header)
    img = nib.load(path)
    return np.asarray(img.get_fdata(dtype=np.float32)), img


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask image as a boolean array (non-zero = inside)."""
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj) != 0


def save_like(
    data: np.ndarray,
    ref: nib.Nifti1Image,
    path: str | os.PathLike,
    dtype: str | np.dtype = "float32",
) -> str:
    """Save ``data`` with the affine, qform/sform (and codes) and units of ``ref``; returns the path.

    The data are cast to ``dtype`` (float32 by default; ``uint8`` for masks) without scaling
    (``scl_slope``/``scl_inter`` unset), calibration range and intent reset.
    """
    dtype = np.dtype(dtype)
    arr = np.asarray(data)
    if dtype == np.uint8 and arr.dtype == bool:
        arr = arr.astype(np.uint8)
    # NIfTI stores voxels in Fortran order: a Fortran-ordered array (as nibabel loads them, and as
    # LoadEchoes builds its 4D series) is written in one copy; a C-ordered 4D array would be gathered
    # with a stride of one volume per value (seconds for a head-sized series)
    arr = np.asarray(arr, dtype=dtype)
    if not (arr.flags.f_contiguous or arr.flags.c_contiguous):
        arr = np.asfortranarray(arr)
    hdr = ref.header.copy()
    img = nib.Nifti1Image(arr, ref.affine, hdr)
    img.set_data_dtype(dtype)
    rh = ref.header
    sform_code = int(rh["sform_code"])
    qform_code = int(rh["qform_code"])
    if sform_code > 0:
        img.set_sform(ref.get_sform(), code=sform_code)
    else:
        img.set_sform(ref.affine, code=0)
    if qform_code > 0:
        img.set_qform(ref.get_qform(), code=qform_code)
    elif sform_code == 0:  # no orientation in the reference: store the affine as a scanner qform
        img.set_qform(ref.affine, code=1)
    h = img.header
    h.set_slope_inter(None, None)
    h["cal_min"] = 0
    h["cal_max"] = 0
    h.set_intent("none")
    h["descrip"] = b"qsmprep"
    nib.save(img, str(path))
    return str(Path(path).resolve())


def set_threads(n: int | None) -> int:
    """Limit numba's and :mod:`qsmprep.qsm.fft`'s worker threads to ``n`` (all cores when None/<1)."""
    import numba

    from qsmprep.qsm import fft as _fft

    n_max = int(numba.config.NUMBA_NUM_THREADS)
    n = n_max if n is None or int(n) < 1 else min(int(n), n_max)
    numba.set_num_threads(n)
    _fft.FFT_WORKERS = n
    return n
