"""NIfTI and provenance helpers shared by the qsmprep Nipype interfaces (I/O only, no physics).

Intermediate images are written uncompressed (``.nii``) into the node's working directory: gzip of a
head-sized 4D volume costs seconds and the work directory is scratch space. Images of at least
:data:`DIRECT_IO_MIN_BYTES` are written and read with direct I/O (:mod:`qsmprep.utils.direct_io`: the same
bytes, without the page cache). Every output keeps the affine, qform/sform codes and spatial header
fields of its reference image (the echo-1 magnitude), with float32 data (masks uint8) and no scaling.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.fileholders import FileHolder

from qsmprep.utils.direct_io import AlignedBuffer, direct_io_enabled, read_file


__all__ = [
    "DIRECT_IO_MIN_BYTES",
    "load_float",
    "load_mask",
    "save_like",
    "set_threads",
]


#: uncompressed images with at least this many bytes of data are written and read with direct I/O
DIRECT_IO_MIN_BYTES = 1 << 20


def _read_direct(path: str, dtype: np.dtype | None = None) -> tuple[np.ndarray, nib.Nifti1Image] | None:
    """Data of an uncompressed NIfTI file read with direct I/O (a view, Fortran order as stored) and the
    image (header only), when the data are unscaled, in native byte order (and of ``dtype`` when given)
    and at least :data:`DIRECT_IO_MIN_BYTES`; None otherwise (the caller reads it with nibabel)."""
    if path.endswith(".gz") or not direct_io_enabled():
        return None
    img = nib.load(path)
    proxy = img.dataobj  # the offset and scaling as stored (the image's header has them reset)
    dt = np.dtype(proxy.dtype)
    n = int(np.prod(img.shape, dtype=np.int64)) * dt.itemsize
    if n < DIRECT_IO_MIN_BYTES or not dt.isnative or (dtype is not None and dt != dtype):
        return None
    if float(proxy.slope) != 1.0 or float(proxy.inter) != 0.0:
        return None
    off = int(proxy.offset)
    raw = read_file(path)
    if raw.size < off + n:  # truncated: nibabel reports it in its words
        return None
    return raw[off:off + n].view(dt).reshape(img.shape, order="F"), img


def _write(img: nib.Nifti1Image, path: str) -> None:
    """``nib.save(img, path)``; an uncompressed image of at least :data:`DIRECT_IO_MIN_BYTES` is assembled
    by nibabel in an aligned buffer and written with direct I/O (the same bytes as ``nib.save``)."""
    hdr = img.header
    nbytes = int(np.prod(img.shape, dtype=np.int64)) * hdr.get_data_dtype().itemsize
    if path.endswith(".gz") or not direct_io_enabled() or nbytes < DIRECT_IO_MIN_BYTES:
        nib.save(img, path)
        return
    head = max(int(hdr["vox_offset"]), 352 + hdr.extensions.get_sizeondisk())
    buf = AlignedBuffer(head + nbytes)
    holder = FileHolder(fileobj=buf)
    img.to_file_map({"image": holder, "header": holder})
    buf.save(path)


def load_float(path: str | os.PathLike) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Data of a NIfTI file as float32 (header scaling applied, Fortran order as stored) and the image
    (for its header). A gzipped file is decompressed in memory with ISA-L (faster than zlib; releases
    the GIL, so several files can be read in threads); a large unscaled float32 ``.nii`` is read with
    direct I/O."""
    path = str(path)
    if path.endswith(".gz"):
        from qsmprep.utils.gzip_nifti import load_gz_image

        img = load_gz_image(path)
        data = np.asarray(img.get_fdata(dtype=np.float32))
        # the same header and affine, without holding on to the decompressed bytes
        return data, type(img)(data, img.affine, img.header)
    direct = _read_direct(path, np.dtype(np.float32))
    if direct is not None:
        return direct
    img = nib.load(path)
    return np.asarray(img.get_fdata(dtype=np.float32)), img


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask image as a boolean array (non-zero = inside)."""
    direct = _read_direct(str(path))
    if direct is not None:
        return direct[0] != 0
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
    _write(img, str(path))
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
