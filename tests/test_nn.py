"""Tests of qsmprep.nn: networks, dipole operator, model files, padded/tiled inference, registered methods.

All networks here are tiny and built in the tests (untrained or with hand-set weights); no shipped model
files are needed (a missing model must raise ModelFileError).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

import qsmprep.methods  # noqa: F401  (the complete catalogue: registers the learned methods)
import qsmprep.nn as qnn
from qsmprep.nn import inference as inf
from qsmprep.nn.models import ModelFileError
from qsmprep.qsm.geometry import forward_field_ppm
from qsmprep.qsm.inversion import tkd
from qsmprep.qsm.registry import BGREMOVE, INVERSION

torch.manual_seed(0)


def _oblique(deg=25.0, axis=(1.0, 0.3, 0.0)):
    from qsmprep.qsm.geometry import rotation_matrix

    b = rotation_matrix(axis, deg) @ np.array([0.0, 0.0, 1.0])
    return b / np.linalg.norm(b)


def _ellipsoid(shape, radii, centre=None):
    c = [(n - 1) / 2 for n in shape] if centre is None else centre
    g = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((gi - ci) / ri) ** 2 for gi, ci, ri in zip(g, c, radii)) <= 1.0


def _local_conv_net(channels=4):
    """Two 3x3x3 convolutions (receptive radius 2), no normalisation: translation-equivariant."""
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, channels, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(channels, 1, 3, padding=1)
    )
    return net.eval()


def _identity_unet(width=4, depth=2):
    """A residual UNet3d whose output head is zero: it returns its input exactly."""
    net = qnn.UNet3d(1, 1, width=width, depth=depth, residual=True)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    return net.eval()


# ------------------------------------------------------------------------------------------------
# padded prediction, networks
# ------------------------------------------------------------------------------------------------


def test_predict_padded_crop_is_exact_on_odd_shapes():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((13, 17, 11)).astype(np.float32)
    seen = []

    def fn(t):
        seen.append(tuple(t.shape))
        return 2 * t + 1

    out = inf.predict_padded(fn, v, 8, "cpu")
    assert seen == [(1, 1, 16, 24, 16)]
    assert out.shape == v.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, 2 * v + 1)
    # channels-first input with two channels, net returning one channel
    v2 = np.stack([v, -v])
    out2 = inf.predict_padded(lambda t: t[:, :1] - t[:, 1:], v2, 4, "cpu", pad_mode="edge")
    assert out2.shape == (1,) + v.shape
    np.testing.assert_allclose(out2[0], 2 * v, rtol=1e-6)
    with pytest.raises(ValueError, match="3D or channels-first 4D"):
        inf.predict_padded(fn, v[0], 8)


def test_unet_shapes_identity_and_size_check():
    net = _identity_unet(width=4, depth=2)
    rng = np.random.default_rng(1)
    v = rng.standard_normal((13, 10, 7)).astype(np.float32)
    out = inf.predict_padded(net, v, net.multiple, "cpu")
    assert out.shape == v.shape
    np.testing.assert_allclose(out, v, atol=1e-6)
    plain = qnn.UNet3d(1, 2, width=4, depth=3).eval()
    assert plain.multiple == 8
    y = inf.predict_padded(plain, v, plain.multiple, "cpu")
    assert y.shape == (2,) + v.shape and np.all(np.isfinite(y))
    with pytest.raises(ValueError, match="multiples of 8"):
        plain(torch.zeros(1, 1, 12, 16, 16))
    with pytest.raises(ValueError, match="norm"):
        qnn.UNet3d(norm="layer")


def test_varnet_round_trip_through_predict_padded():
    net = qnn.VarNet(steps=2, width=4, depth=1).eval()
    rng = np.random.default_rng(2)
    m = _ellipsoid((11, 13, 9), (4, 5, 3.5))
    f = (rng.standard_normal(m.shape) * 0.05).astype(np.float32) * m
    vs, b = (1.0, 0.9, 1.2), _oblique()

    def fn(t):
        k = qnn.dipole_kernel_torch(t.shape[2:], vs, b)
        return net(t[:, :1], t[:, 1:2], k)

    out = inf.predict_padded(fn, np.stack([f, m.astype(np.float32)]), net.multiple, "cpu")
    assert out.shape == (1,) + m.shape
    assert np.all(np.isfinite(out)) and np.all(out[0][~m] == 0) and np.abs(out[0][m]).max() > 0


def test_dipole_convolve_matches_numpy_forward_model():
    rng = np.random.default_rng(3)
    chi = rng.standard_normal((16, 18, 20)).astype(np.float32)
    vs, b = (0.8, 1.0, 1.5), _oblique(30.0)
    ref = forward_field_ppm(chi, vs, b, pad_voxels=0)
    k = qnn.dipole_kernel_torch(chi.shape, vs, b)
    assert k.dtype == torch.float32 and tuple(k.shape) == (16, 18, 11)
    got = qnn.dipole_convolve(torch.from_numpy(chi)[None, None], k)[0, 0].numpy()
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err
    with pytest.raises(ValueError, match="dipole kernel has shape"):
        qnn.dipole_convolve(torch.zeros(1, 1, 16, 18, 18), k)


@pytest.mark.parametrize("depth,init", [(1, "tkd"), (0, "zeros")])
def test_varnet_gradients_flow(depth, init):
    torch.manual_seed(0)
    net = qnn.VarNet(steps=2, width=4, depth=depth, init=init)
    m = torch.from_numpy(_ellipsoid((8, 8, 8), (3, 3.5, 3))[None, None].astype(np.float32))
    f = torch.randn(1, 1, 8, 8, 8) * 0.05 * m
    k = qnn.dipole_kernel_torch((8, 8, 8), (1, 1, 1), _oblique())
    chi = net(f, m, k)
    assert chi.shape == f.shape and torch.all(chi[m == 0] == 0)
    loss = ((chi - 0.1 * m) ** 2).mean()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.all(torch.isfinite(p.grad)), name
    assert torch.all(net.step_raw.grad != 0)
    assert torch.allclose(net.step_sizes(), torch.ones(2), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# model files
# ------------------------------------------------------------------------------------------------


def _save_small_unet(tmp_path, name="m", scales=None, net=None, kwargs=None):
    kwargs = kwargs or {"in_channels": 1, "out_channels": 1, "width": 4, "depth": 2}
    net = net if net is not None else qnn.build_model("unet3d", **kwargs)
    card = qnn.save_model(
        net, tmp_path / f"{name}.pt", "unet3d", kwargs, {"licence": "test", "seed": 0},
        scales or {"input_ppm": 0.05, "output_ppm": 0.2}, "0.0-test",
    )
    return net, card


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    net, card = _save_small_unet(tmp_path)
    pt = tmp_path / "m.pt"
    assert card["sha256"] == qnn.sha256_file(pt)
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk["sha256"] == card["sha256"] and on_disk["architecture"] == "unet3d"
    assert on_disk["licence"] == "test" and on_disk["name"] == "m"
    # deterministic bytes
    qnn.save_model(net, tmp_path / "m2.pt", "unet3d", card["kwargs"], {}, card["scales"], "0.0-test")
    assert qnn.sha256_file(tmp_path / "m2.pt") == card["sha256"]
    assert qnn.available_models(tmp_path) == ["m", "m2"]
    loaded, lcard = qnn.load_model("m", directory=tmp_path)
    assert not loaded.training and lcard["scales"] == {"input_ppm": 0.05, "output_ppm": 0.2}
    x = torch.randn(1, 1, 8, 12, 8)
    with torch.no_grad():
        np.testing.assert_array_equal(net.eval()(x).numpy(), loaded(x).numpy())
    # a path to the .pt works too
    assert qnn.load_model(str(pt))[1]["sha256"] == card["sha256"]
    prov = qnn.model_provenance("m", model_dir=tmp_path)
    assert prov["sha256"] == card["sha256"] and prov["version"] == "0.0-test" and prov["name"] == "m"
    with pytest.raises(ValueError, match="unknown model architecture"):
        qnn.build_model("resnet")


def test_model_file_errors_name_the_file(tmp_path):
    _save_small_unet(tmp_path)
    pt, js = tmp_path / "m.pt", tmp_path / "m.json"
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"m\.pt has sha256 .* model card m\.json says") as exc:
        qnn.load_model("m", directory=tmp_path)
    assert str(pt) in str(exc.value) and "\n" not in str(exc.value)
    pt.unlink()
    with pytest.raises(ModelFileError, match="not found") as exc:
        qnn.load_model("m", directory=tmp_path)
    assert str(pt) in str(exc.value)
    _save_small_unet(tmp_path)
    js.unlink()
    with pytest.raises(ModelFileError, match="model card") as exc:
        qnn.load_model("m", directory=tmp_path)
    assert str(js) in str(exc.value)
    assert issubclass(ModelFileError, ValueError)


def test_model_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("QSMPREP_MODEL_DIR", str(tmp_path))
    assert qnn.model_dir() == tmp_path
    _save_small_unet(tmp_path, name="deepqsm")
    assert qnn.available_models() == ["deepqsm"]


def test_resolve_device():
    assert inf.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert inf.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unsupported device|unknown device"):
        inf.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            inf.resolve_device("cuda")


# ------------------------------------------------------------------------------------------------
# tiling, resampling
# ------------------------------------------------------------------------------------------------


def test_tiled_equals_untiled_for_local_net():
    torch.manual_seed(2)
    net = _local_conv_net()
    rng = np.random.default_rng(4)
    v = ndimage.gaussian_filter(rng.standard_normal((41, 37, 30)), 1.5).astype(np.float32)
    full = inf.predict_padded(net, v, 4, "cpu")
    calls = []

    def counted(t):
        calls.append(tuple(t.shape[2:]))
        return net(t)

    tiled = inf.predict_padded(counted, v, 4, "cpu", tile=20, overlap=12)  # margin 12//4 = 3 >= radius 2
    assert len(calls) > 8 and max(max(c) for c in calls) == 20
    rel = np.abs(tiled - full).max() / np.abs(full).max()
    assert rel < 1e-4, rel
    # automatic tiling above the voxel budget gives the same result
    auto = inf.predict_padded(net, v, 4, "cpu", overlap=12, max_voxels=10_000)
    assert np.abs(auto - full).max() / np.abs(full).max() < 1e-4


def test_b0_rotation_and_resample_round_trip():
    b = _oblique(25.0)
    r = inf._b0_rotation(b)
    np.testing.assert_allclose(r @ b, [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(inf._b0_rotation(-b), r, atol=1e-12)
    shape, vs = (40, 44, 34), np.array([0.9, 1.1, 1.3])
    m = _ellipsoid(shape, (16, 18, 12))
    g = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, vs)], indexing="ij")
    smooth = (np.exp(-(g[0] ** 2 + g[1] ** 2 + g[2] ** 2) / (2 * 8.0**2)) + 0.02 * g[0]).astype(np.float32)
    seen = {}

    def ident(v, mk):
        seen["shape"] = v.shape
        assert np.all(v[~mk] == 0)
        return v

    back = inf._apply_b0_aligned(smooth, m, vs, b, ident)
    assert seen["shape"] != shape  # resampled to the 1 mm B0 grid
    inner = ndimage.binary_erosion(m, iterations=3)
    rel = np.sqrt(np.mean((back - smooth)[inner] ** 2) / np.mean(smooth[inner] ** 2))
    # two trilinear interpolations of a smooth (sigma 8 mm) volume: relative RMS error below 1 %
    assert rel < 0.01, rel
    # axial 1 mm data are not resampled, and come back exactly
    back1 = inf._apply_b0_aligned(smooth, m, np.ones(3), np.array([0, 0, -1.0]), ident)
    assert seen["shape"] == tuple(s.stop - s.start for s in inf._bbox(m, inf.BBOX_MARGIN))
    np.testing.assert_array_equal(back1[m], smooth[m])


# ------------------------------------------------------------------------------------------------
# registered methods
# ------------------------------------------------------------------------------------------------


def _field_case(shape=(30, 32, 26), radii=(10, 12, 8), seed=5):
    rng = np.random.default_rng(seed)
    m = _ellipsoid(shape, radii)
    chi = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0).astype(np.float32) * m * 0.5
    return m, chi


def test_registered_and_missing_model_is_a_clear_error(tmp_path):
    assert INVERSION.get("deepqsm") is qnn.deepqsm and INVERSION.get("nextqsm") is qnn.nextqsm_inversion
    assert BGREMOVE.get("nextqsm") is qnn.nextqsm_bgremove
    assert BGREMOVE.get("nextqsm-unet") is qnn.nextqsm_unet_bgremove
    m, chi = _field_case()
    f = forward_field_ppm(chi) * m
    with pytest.raises(ModelFileError, match=r"model file .*deepqsm\.pt not found") as exc:
        qnn.deepqsm(f, m, device="cpu", model_dir=tmp_path)
    assert "qsmprep-train" in str(exc.value)
    with pytest.raises(ModelFileError, match=r"nextqsm-varnet\.pt not found"):
        qnn.nextqsm_inversion(f, m, (1, 1, 1), (0, 0, 1), device="cpu", model_dir=tmp_path)
    with pytest.raises(ModelFileError, match=r"nextqsm-bg\.pt not found"):
        qnn.nextqsm_unet_bgremove(f, m, (1, 1, 1), (0, 0, 1), device="cpu", model_dir=tmp_path)
    with pytest.raises(ModelFileError, match=r"nextqsm-varnet\.pt not found"):
        qnn.nextqsm_bgremove(f, m, (1, 1, 1), (0, 0, 1), device="cpu", model_dir=tmp_path)
    with pytest.raises(ModelFileError):
        qnn.model_provenance("deepqsm", model_dir=tmp_path)


@pytest.mark.parametrize("func", [qnn.deepqsm, qnn.nextqsm_inversion, qnn.nextqsm_bgremove, qnn.nextqsm_unet_bgremove])
def test_bad_inputs_raise_clear_errors(func, tmp_path):
    m, chi = _field_case()
    f = forward_field_ppm(chi) * m
    with pytest.raises(ValueError, match="mask has shape"):
        func(f, m[:-1], model_dir=tmp_path)
    bad = f.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        func(bad, m, model_dir=tmp_path)
    with pytest.raises(ValueError, match="unit vector"):
        func(f, m, (1, 1, 1), (0, 0, 2), model_dir=tmp_path)
    with pytest.raises(ValueError, match="empty"):
        func(f, np.zeros_like(m), model_dir=tmp_path)
    with pytest.raises(ValueError, match="voxel_size_mm"):
        func(f, m, (1, -1, 1), model_dir=tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available") if not torch.cuda.is_available() else pytest.raises(ModelFileError):
        func(f, m, device="cuda", model_dir=tmp_path)


def test_deepqsm_and_bg_with_identity_nets(tmp_path):
    """Identity nets check the cropping, scaling, masking and resampling paths end to end."""
    kw = {"in_channels": 1, "out_channels": 1, "width": 4, "depth": 2, "residual": True}
    _save_small_unet(tmp_path, "deepqsm", {"input_ppm": 0.05, "output_ppm": 0.05}, _identity_unet(), kw)
    _save_small_unet(tmp_path, "nextqsm-bg", {"input_ppm": 1.0, "output_ppm": 1.0}, _identity_unet(), kw)
    m, chi = _field_case()
    f = (forward_field_ppm(chi, pad_voxels=8) * m).astype(np.float32)
    out = qnn.deepqsm(f, m, device="cpu", model_dir=tmp_path, data_consistency_mu=0)
    assert out.dtype == np.float32 and out.shape == m.shape
    np.testing.assert_allclose(out, f, atol=1e-7)
    # oblique, anisotropic: resampled to 1 mm and back; equal to the input away from the mask edge
    vs, b = (1.0, 1.0, 1.2), _oblique(20.0)
    out_o = qnn.deepqsm(f + 0.01 * m, m, vs, b, device="cpu", model_dir=tmp_path, data_consistency_mu=0)
    assert np.all(out_o[~m] == 0)
    inner = ndimage.binary_erosion(m, iterations=3)
    assert np.abs(out_o - f - 0.01)[inner].mean() < 0.2 * np.abs(f[inner]).mean()
    total = f + np.float32(0.3)
    local, m2 = qnn.nextqsm_unet_bgremove(total, m, device="cpu", model_dir=tmp_path)
    assert m2.dtype == bool and np.array_equal(m2, m)
    np.testing.assert_allclose(local, (f - f[m].mean()) * m, atol=1e-6)
    assert abs(local[m].mean()) < 1e-7


def _save_tkd_varnet(directory) -> None:
    """``nextqsm-varnet`` in ``directory``: regularisers that output 0 and steps of ~0, i.e. its TKD start."""
    kwargs = {"steps": 2, "width": 4, "depth": 0, "init_step": 1e-6}
    net = qnn.build_model("varnet", **kwargs)
    with torch.no_grad():
        for psi in net.psi:
            psi[-1].weight.zero_()
            psi[-1].bias.zero_()
    qnn.save_model(net, directory / "nextqsm-varnet.pt", "varnet", kwargs, {}, {}, "0.0-test")


def test_nextqsm_inversion_reduces_to_tkd(tmp_path):
    """A VarNet whose regularisers output 0 and whose steps are ~0 is its TKD start: compare with tkd()."""
    _save_tkd_varnet(tmp_path)
    shape = (34, 38, 30)
    m = _ellipsoid(shape, (9.5, 11.5, 7.5))  # bounding box 20 x 24 x 16 -> padded 36 x 40 x 32
    rng = np.random.default_rng(6)
    chi = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0).astype(np.float32) * m * 0.5
    vs, b = (1.0, 0.9, 1.2), _oblique(30.0)
    f = forward_field_ppm(chi, vs, b, pad_voxels=8) * m
    got = qnn.nextqsm_inversion(f, m, vs, b, device="cpu", model_dir=tmp_path)
    ref = tkd(f, m, vs, b, delta=0.15, pad_voxels=8)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err
    assert np.all(got[~m] == 0)


@pytest.mark.integration
def test_nextqsm_bgremove_is_pdf_alternated_with_the_varnet(tmp_path):
    """The learned background removal is pdf_harmonic_restored with the VarNet as ``invert`` (here one that
    reduces to TKD), demeaned in the mask; with no alternation it is PDF (demeaned)."""
    from qsmprep.qsm.bgremove import pdf, pdf_harmonic_restored
    from qsmprep.qsm.masking import erode_mask_mm

    _save_tkd_varnet(tmp_path)
    vs, b = (1.0, 1.0, 1.2), _oblique(20.0)
    total, m = _bg_test_case(vs, b)  # has an offset: the output is demeaned in the mask
    local, m_out = qnn.nextqsm_bgremove(total, m, vs, b, device="cpu", model_dir=tmp_path, n_outer=2, rim_mm=0)
    assert local.dtype == np.float32 and np.array_equal(m_out, m) and np.all(local[~m] == 0)
    assert abs(float(local[m].mean())) < 1e-6
    # by default the mask's 2 mm rim is dropped first (estimated masks hold skull voxels there)
    loc_r, m_r = qnn.nextqsm_bgremove(total, m, vs, b, device="cpu", model_dir=tmp_path, n_outer=1)
    np.testing.assert_array_equal(m_r, erode_mask_mm(m, vs, 2.0))
    assert m_r.sum() < m.sum() and np.all(loc_r[~m_r] == 0)

    def invert(f, mk):
        chi = qnn.nextqsm_inversion(f, mk, vs, b, device="cpu", model_dir=tmp_path)
        calls.append(f.dtype)
        return chi

    calls = []

    ref = pdf_harmonic_restored(total - total[m].mean(), m, vs, b, invert=invert, n_outer=2,
                                refit_max_iter=qnn.inference.NEXTQSM_BG_REFIT_ITER)[0]
    ref = np.where(m, ref - ref[m].mean(), 0)
    np.testing.assert_allclose(local, ref, atol=1e-6 * np.abs(ref).max())
    assert calls == [np.float32, np.float32]
    plain = qnn.nextqsm_bgremove(total, m, vs, b, device="cpu", model_dir=tmp_path, n_outer=0, rim_mm=0)[0]
    p_ref = pdf(total - total[m].mean(), m, vs, b)[0]
    np.testing.assert_allclose(plain, np.where(m, p_ref - p_ref[m].mean(), 0), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# exact data consistency (VarNet) and the TKD-primed DeepQSM input
# ------------------------------------------------------------------------------------------------


def _zero_regularisers(net):
    with torch.no_grad():
        for psi in net.psi:
            psi[-1].weight.zero_()
            psi[-1].bias.zero_()
    return net


def test_varnet_exact_data_term_contracts_towards_the_inverse():
    """With Psi = 0 and M = 1 each exact step is X <- (D F f + mu X) / (D^2 + mu): the k-space error
    shrinks by mu / (D^2 + mu) per step, so the error falls with every step and matches that formula."""
    shape = (24, 24, 24)
    rng = np.random.default_rng(2)
    chi = torch.from_numpy(ndimage.gaussian_filter(rng.standard_normal(shape), 1.5).astype(np.float32))[None, None]
    k = qnn.dipole_kernel_torch(shape, (1, 1, 1), _oblique(15.0))
    f = qnn.dipole_convolve(chi, k)
    m = torch.ones_like(f)
    errs = []
    for steps in (1, 2, 4):
        net = _zero_regularisers(qnn.VarNet(steps=steps, width=2, depth=0, data_term="exact", init_mu=0.05)).eval()
        with torch.no_grad():
            y = net(f, m, k)
        errs.append(float((y - chi).norm() / chi.norm()))
        # analytic: X_s = X* + (mu / (D^2 + mu))^s (X_0 - X*) with X_0 = TKD
        x0k = torch.fft.rfftn(qnn.varnet.tkd_start(f, m, k), dim=(-3, -2, -1))
        ck = torch.fft.rfftn(chi, dim=(-3, -2, -1))
        r = 0.05 / (k * k + 0.05)
        ref = torch.fft.irfftn(ck + r**steps * (x0k - ck), s=shape, dim=(-3, -2, -1))
        ref = ref - ref.mean() + y.mean()  # the k = 0 term is undetermined (D(0) = 0)
        assert float((y - ref).norm() / ref.norm()) < 1e-4
    assert errs[0] > errs[1] > errs[2], errs
    with pytest.raises(ValueError, match="data_term"):
        qnn.VarNet(data_term="prox")


def test_varnet_exact_gradients_reach_mu_and_regularisers():
    torch.manual_seed(0)
    net = qnn.VarNet(steps=2, width=4, depth=0, data_term="exact")
    m = torch.from_numpy(_ellipsoid((8, 8, 8), (3, 3.5, 3))[None, None].astype(np.float32))
    f = torch.randn(1, 1, 8, 8, 8) * 0.05 * m
    chi = net(f, m, qnn.dipole_kernel_torch((8, 8, 8), (1, 1, 1), _oblique()))
    assert torch.all(chi[m == 0] == 0)
    ((chi - 0.1 * m) ** 2).mean().backward()
    assert not hasattr(net, "step_raw")
    assert torch.all(net.mu_raw.grad != 0) and torch.allclose(net.dc_weights(), torch.full((2,), 0.05), atol=1e-6)
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.all(torch.isfinite(p.grad)), name


def test_tkd_padded_matches_classical_tkd():
    m, chi = _field_case()
    f = (forward_field_ppm(chi, pad_voxels=8) * m).astype(np.float32)
    got = qnn.dipole.tkd_padded(torch.from_numpy(f)[None, None], torch.from_numpy(m.astype(np.float32))[None, None],
                                delta=0.15, pad=16)[0, 0].numpy()
    ref = tkd(f, m, delta=0.15, pad_voxels=16)
    assert np.all(got[~m] == 0)
    err = np.linalg.norm((got - ref)[m]) / np.linalg.norm(ref[m])
    assert err < 0.05, err


def test_tkd_primed_deepqsm_with_zero_correction_is_tkd(tmp_path):
    """A residual 2-channel U-Net with a zero head returns its TKD channel: deepqsm() must then give TKD of the
    field in ppm (the gain and RMS scalings cancel), also after the oblique resampling path."""
    kw = {"in_channels": 2, "out_channels": 1, "width": 4, "depth": 2, "residual": True}
    net = qnn.UNet3d(**kw)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    _save_small_unet(tmp_path, "deepqsm", {"input_ppm": 0.05, "output_ppm": 0.2, "tkd_delta": 0.15}, net.eval(), kw)
    m, chi = _field_case()
    f = (forward_field_ppm(chi, pad_voxels=8) * m).astype(np.float32)
    out = qnn.deepqsm(f, m, device="cpu", model_dir=tmp_path, data_consistency_mu=0)
    ref = tkd(f, m, delta=0.15, pad_voxels=16)
    assert out.dtype == np.float32 and np.all(out[~m] == 0)
    assert np.linalg.norm((out - ref)[m]) / np.linalg.norm(ref[m]) < 0.05
    # linear in the field (RMS normalisation), as the physics requires
    np.testing.assert_allclose(qnn.deepqsm(3 * f, m, device="cpu", model_dir=tmp_path, data_consistency_mu=0), 3 * out,
                               rtol=1e-4, atol=1e-7)
    # default: the network output is the prior of one exact data-consistency step
    from qsmprep.qsm.inversion import data_consistency

    dc = qnn.deepqsm(f, m, device="cpu", model_dir=tmp_path)
    np.testing.assert_allclose(dc, data_consistency(out, f, m, mu=inf.DEEPQSM_DC_MU), atol=1e-6)
    with pytest.raises(ValueError, match="data_consistency_mu"):
        qnn.deepqsm(f, m, device="cpu", model_dir=tmp_path, data_consistency_mu=-1)
    with pytest.raises(ValueError, match="1 .field. or 2"):
        qnn.unet.unet_input(torch.zeros(1, 1, 8, 8, 8), torch.ones(1, 1, 8, 8, 8), 3)


def _zero_correction_bg_net(directory, card: dict) -> None:
    """Save a residual 3-channel background U-Net with a zero head (it returns its prior channel)."""
    kw = {"in_channels": 3, "out_channels": 1, "width": 4, "depth": 2, "residual": True}
    net = qnn.UNet3d(**kw)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    qnn.save_model(net.eval(), directory / "nextqsm-bg.pt", "unet3d", kw, {"licence": "test", "seed": 0, **card},
                   {"input_ppm": 1.0, "output_ppm": 1.0}, "0.0-test")


def _bg_test_case(vs=(1.0, 1.0, 1.0), b0=(0.0, 0.0, 1.0)):
    """(total field ppm, mask): a smooth chi in an ellipsoid plus a constant and a linear (harmonic) field."""
    shape = (40, 44, 36)
    m = _ellipsoid(shape, (16, 18, 14))
    rng = np.random.default_rng(2)
    chi = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0).astype(np.float32) * m * 0.1
    g = np.indices(shape).astype(np.float32)
    return (forward_field_ppm(chi, vs, b0, pad_voxels=8) + 0.3 + 0.02 * g[0] - 0.01 * g[2]).astype(np.float32), m


def test_prior_guided_bg_net_with_zero_correction_is_its_prior(tmp_path):
    """A residual 3-channel background U-Net with a zero head returns its V-SHARP channel: nextqsm_unet_bgremove()
    must then give V-SHARP's local field (demeaned in the whole mask, 0 in V-SHARP's eroded rim), in ppm,
    linear in the field; its output mask is the whole brain mask."""
    from qsmprep.qsm.bgremove import vsharp

    _zero_correction_bg_net(tmp_path, {"prior": "vsharp"})
    total, m = _bg_test_case()
    shape = m.shape
    local, m_out = qnn.nextqsm_unet_bgremove(total, m, device="cpu", model_dir=tmp_path)
    ref, m_v = vsharp(total, m)
    ref = np.where(m_v, ref, 0)
    ref = (ref - ref[m].mean()) * m
    assert local.dtype == np.float32 and np.array_equal(m_out, m) and np.all(local[~m] == 0)
    np.testing.assert_allclose(local, ref, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(qnn.nextqsm_unet_bgremove(2.5 * total, m, device="cpu", model_dir=tmp_path)[0], 2.5 * local,
                               atol=1e-4 * np.abs(local).max())
    stack = inf.bg_prior_stack(total, m, (1, 1, 1), (0, 0, 1))
    assert stack.shape == (3,) + shape and np.array_equal(stack[2] > 0, m_v)
    with pytest.raises(ValueError, match=r"\(B, 3, X, Y, Z\)"):
        qnn.unet.bg_unet_input(torch.zeros(1, 2, 8, 8, 8), torch.ones(1, 1, 8, 8, 8))


def test_coarse_pdf_guided_bg_net_with_zero_correction_is_pdf(tmp_path):
    """The shipped kind of background net (card prior "pdf", grid_mm): its correction is predicted on a coarse
    B0-aligned grid and added to PDF on the input grid, so a zero-correction net returns PDF itself (whole
    mask, demeaned), also for oblique B0 and anisotropic voxels, and linear in the field."""
    from qsmprep.qsm.bgremove import pdf

    _zero_correction_bg_net(tmp_path, {"prior": "pdf", "grid_mm": 2.0})
    for vs, b0 in (((1.0, 1.0, 1.0), (0.0, 0.0, 1.0)), ((1.0, 1.0, 1.5), (0.2, 0.1, 0.97))):
        b0 = tuple(np.asarray(b0) / np.linalg.norm(b0))
        total, m = _bg_test_case(vs, b0)
        local, m_out = qnn.nextqsm_unet_bgremove(total, m, vs, b0, device="cpu", model_dir=tmp_path)
        ref, _ = pdf(total - total[m].mean(), m, vs, b0)  # nextqsm_bgremove demeans the total field first
        ref = (ref - ref[m].mean()) * m
        assert local.dtype == np.float32 and np.array_equal(m_out, m) and np.all(local[~m] == 0)
        np.testing.assert_allclose(local, ref, atol=1e-3 * np.abs(ref).max())  # float32 rounding of s * (prior / s)
        y = qnn.nextqsm_unet_bgremove(2.5 * total, m, vs, b0, device="cpu", model_dir=tmp_path)[0]
        # linear up to PDF's own stopping rule (relative tolerance: float32 rounding may change its iteration count)
        assert np.linalg.norm(y - 2.5 * local) < 1e-2 * np.linalg.norm(2.5 * local)
