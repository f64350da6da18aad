"""Image I/O of the work directory and the inputs: direct I/O (``O_DIRECT``) with its buffered fallback,
ISA-L reading of gzipped NIfTI, and the FFT backends of :mod:`qsmprep.qsm.fft`."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from qsmprep.interfaces import _nifti
from qsmprep.interfaces._nifti import load_float, load_mask, save_like
from qsmprep.qsm import fft as qfft
from qsmprep.utils import direct_io
from qsmprep.utils.gzip_nifti import inflate_gzip, load_gz_image


def _ref_image(shape=(70, 64, 60)):
    aff = np.diag([1.1, 1.0, 1.2, 1.0])
    aff[:3, 3] = (-30, -40, 12)
    img = nib.Nifti1Image(np.zeros(shape[:3], np.float32), aff)
    img.header.set_qform(aff, 1)
    img.header.set_sform(aff, 1)
    return img


@pytest.mark.parametrize("direct", ["1", "0"])
def test_save_and_load_give_nibabels_bytes_and_values(tmp_path, monkeypatch, direct):
    """Above DIRECT_IO_MIN_BYTES the work-directory images go through O_DIRECT (or the buffered fallback):
    the file is byte for byte what nibabel writes, and reads back the same values (4D float32, uint8 mask)."""
    monkeypatch.setenv("QSMPREP_DIRECT_IO", direct)
    ref = _ref_image()
    rng = np.random.default_rng(0)
    vol4 = np.asfortranarray(rng.normal(size=ref.shape + (3,)).astype(np.float32))
    assert vol4.nbytes >= _nifti.DIRECT_IO_MIN_BYTES
    out = save_like(vol4, ref, tmp_path / "phase.nii")
    data, img = load_float(out)
    np.testing.assert_array_equal(data, vol4)
    assert np.allclose(img.affine, ref.affine) and data.dtype == np.float32
    # the same bytes as nibabel's own writer
    want = tmp_path / "nib.nii"
    nib.save(nib.load(out), want)
    assert (tmp_path / "phase.nii").read_bytes() == want.read_bytes()
    mask = vol4[..., 0] > 0.5
    out_m = save_like(mask, ref, tmp_path / "mask.nii", "uint8")
    np.testing.assert_array_equal(load_mask(out_m), mask)
    assert nib.load(out_m).get_data_dtype() == np.uint8
    # a scaled image is not read raw: nibabel applies the scaling
    scaled = nib.Nifti1Image(vol4[..., 0], ref.affine)
    scaled.header.set_slope_inter(2.0, 1.0)
    nib.save(scaled, tmp_path / "scaled.nii")
    np.testing.assert_allclose(load_float(tmp_path / "scaled.nii")[0], vol4[..., 0] * 2 + 1, rtol=1e-6)


def test_direct_io_round_trip_and_fallback(tmp_path, monkeypatch):
    payload = np.frombuffer(np.random.default_rng(1).bytes(3 * direct_io.ALIGN + 123), np.uint8)
    buf = direct_io.aligned_empty(payload.size)
    assert buf.ctypes.data % direct_io.ALIGN == 0 and buf.size % direct_io.ALIGN == 0
    buf[: payload.size] = payload
    direct_io.write_file(tmp_path / "a.bin", buf, payload.size)
    assert (tmp_path / "a.bin").read_bytes() == payload.tobytes()  # rounded up, then truncated to its size
    back = direct_io.read_file(tmp_path / "a.bin")
    assert back.ctypes.data % direct_io.ALIGN == 0 and back.tobytes() == payload.tobytes()
    # a file system without O_DIRECT (EINVAL on open): the same bytes through buffered I/O
    real_open = direct_io.os.open

    def no_direct(path, flags, *a):
        if flags & getattr(direct_io.os, "O_DIRECT", 0):
            raise OSError(direct_io.errno.EINVAL, "O_DIRECT not supported")
        return real_open(path, flags, *a)

    monkeypatch.setattr(direct_io.os, "open", no_direct)
    direct_io.write_file(tmp_path / "b.bin", buf, payload.size)
    assert (tmp_path / "b.bin").read_bytes() == payload.tobytes()
    assert direct_io.read_file(tmp_path / "b.bin").tobytes() == payload.tobytes()
    monkeypatch.setenv("QSMPREP_DIRECT_IO", "off")
    assert not direct_io.direct_io_enabled()
    # the in-memory file nibabel writes into refuses to grow past its capacity
    f = direct_io.AlignedBuffer(10)
    f.seek(4)
    f.write(b"ab")
    assert f.size == 6 and bytes(f.buffer[:6]) == b"\0\0\0\0ab"
    with pytest.raises(OSError, match="holds"):
        f.write(b"x" * direct_io.ALIGN * 2)


def test_gzip_nifti_reads_multi_member_files_and_refuses_truncated_ones(tmp_path):
    ref = _ref_image((12, 10, 8))
    data = np.arange(12 * 10 * 8, dtype=np.float32).reshape(12, 10, 8)
    nib.save(nib.Nifti1Image(data, ref.affine, ref.header), tmp_path / "a.nii.gz")
    img = load_gz_image(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    assert np.allclose(img.affine, ref.affine)
    plain = gzip.decompress((tmp_path / "a.nii.gz").read_bytes())
    two = gzip.compress(plain[:1000]) + gzip.compress(plain[1000:])  # concatenated members: one stream
    assert inflate_gzip(two) == plain
    with pytest.raises(EOFError):
        inflate_gzip(gzip.compress(plain)[:-100])


def test_fft_backends_agree(monkeypatch):
    """torch (MKL) and SciPy (pocketfft) give the same transforms to float32 rounding; the scope restores."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 17, 15)).astype(np.float32)
    x4 = np.asfortranarray(rng.normal(size=(12, 10, 9, 2)).astype(np.float32))
    shape = (24, 18, 16)
    out = {}
    with qfft.fft_backend_scope("auto"):
        assert qfft.fft_backend() == "torch+scipy"  # torch's forward transforms, SciPy's inverse real one
    for backend in ("torch", "scipy"):
        with qfft.fft_backend_scope(backend):
            assert qfft.fft_backend() == backend
            k = qfft.rfftn(x, shape)
            ro = x.copy()
            ro.flags.writeable = False  # read-only input (a memory-mapped image) is accepted
            out[backend] = (k, qfft.irfftn(k.copy(), shape), qfft.irfftn(qfft.rfftn(ro), x.shape, overwrite=True),
                            qfft.fftn(x4), qfft.ifftn(qfft.fftn(x4.astype(np.complex64))))
            assert out[backend][1].dtype == np.float32 and k.dtype == np.complex64
    for a, b in zip(out["torch"], out["scipy"]):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    np.testing.assert_allclose(out["torch"][2], x, atol=1e-5)
    assert qfft.FFT_BACKEND == "auto"
    with pytest.raises(ValueError, match="FFT backend"):
        with qfft.fft_backend_scope("fftw"):
            pass
    assert qfft.FFT_BACKEND == "auto"
    # the thread count follows FFT_WORKERS (set_threads)
    import torch

    monkeypatch.setattr(qfft, "FFT_WORKERS", 1)
    with qfft.fft_backend_scope("torch"):
        qfft.rfftn(x)
        assert torch.get_num_threads() == 1
