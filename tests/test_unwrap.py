"""ROMEO and Laplacian phase unwrapping on small synthetic volumes with known true phase."""

import numpy as np
import pytest

from qsmprep.qsm import unwrap as uw
from qsmprep.qsm.registry import UNWRAP

N = 64
TWO_PI = 2 * np.pi


def _coords(n=N):
    c = (np.arange(n, dtype=np.float32) - n / 2) / n
    return np.meshgrid(c, c, c, indexing="ij")


def _smooth_field(n=N, amp=20.0, offset=0.0):
    """Smooth phase (rad) with several wraps: a Gaussian bump of ``amp`` rad plus a quadratic."""
    x, y, z = _coords(n)
    g = np.exp(-((x - 0.05) ** 2 + (y + 0.05) ** 2 + z**2) / (2 * 0.15**2))
    f = amp * g + 12.0 * (x**2 - y * z) + 4.0 * x + offset
    return f.astype(np.float32)


def _sphere_mask(n=N, r=0.42):
    x, y, z = _coords(n)
    return (x**2 + y**2 + z**2) < r**2


def _agreement(result, truth, mask):
    """Fraction of mask voxels equal to truth up to the (median) global 2*pi*k, and that k."""
    d = (result - truth)[mask].astype(np.float64)
    k = np.round(np.median(d) / TWO_PI)
    return float(np.mean(np.abs(d - TWO_PI * k) < 1e-3)), int(k)


def _discrete_laplacian(u, voxel_size_mm):
    """7-point Laplacian at interior voxels (zero on the outer layer)."""
    lap = np.zeros_like(u, dtype=np.float64)
    core = (slice(1, -1),) * 3
    for ax, h in enumerate(voxel_size_mm):
        lap[core] += (np.roll(u, 1, ax) - 2 * u + np.roll(u, -1, ax))[core] / h**2
    return lap


@pytest.fixture(scope="module")
def single_echo():
    rng = np.random.default_rng(0)
    truth = _smooth_field() + rng.normal(0, 0.25, (N, N, N)).astype(np.float32)
    mask = _sphere_mask()
    # outside the head: pure noise phase and low magnitude
    truth = np.where(mask, truth, rng.uniform(-np.pi, np.pi, truth.shape)).astype(np.float32)
    mag = np.where(mask, 1.0, 0.05).astype(np.float32) * rng.uniform(0.8, 1.0, truth.shape).astype(np.float32)
    return truth, uw.wrap_to_pi(truth), mag, mask


def test_romeo_single_echo_with_mask(single_echo):
    truth, wrapped, mag, mask = single_echo
    assert np.abs(truth[mask]).max() > 3 * np.pi  # several wraps
    out = uw.romeo_unwrap(wrapped, magnitude=mag, mask=mask)
    assert out.dtype == np.float32 and out.shape == wrapped.shape
    frac, _ = _agreement(out, truth, mask)
    assert frac >= 0.995
    # outside the mask the input comes back unchanged; everywhere the output is 2*pi-congruent
    np.testing.assert_array_equal(out[~mask], wrapped[~mask])
    k = (out - wrapped) / TWO_PI
    assert np.abs(k - np.round(k)).max() < 1e-3


@pytest.mark.parametrize("use_mag", [True, False], ids=["romeo3", "no-magnitude"])
def test_romeo_without_mask_grows_through_noise_last(single_echo, use_mag):
    truth, wrapped, mag, mask = single_echo
    out = uw.romeo_unwrap(wrapped, magnitude=mag if use_mag else None)
    frac, _ = _agreement(out, truth, mask)
    assert frac >= 0.995


def test_romeo_named_weight_sets(single_echo):
    truth, wrapped, mag, mask = single_echo
    for weights in ("romeo", "romeo2", "romeo6", ("pc", "pl")):
        out = uw.romeo_unwrap(wrapped, magnitude=mag, mask=mask, weights=weights)
        assert _agreement(out, truth, mask)[0] >= 0.995, weights


def test_romeo_seed_correction_with_second_echo():
    """With a second (shorter) echo, TE ratio 2, the absolute level is recovered (k = 0) although the
    phase is above pi everywhere (3.3 to 10.8 rad)."""
    rng = np.random.default_rng(1)
    mask = _sphere_mask()
    truth1 = _smooth_field(amp=6.0, offset=4.5) + rng.normal(0, 0.1, (N, N, N)).astype(np.float32)
    truth2 = truth1 / 2
    w1, w2 = uw.wrap_to_pi(truth1), uw.wrap_to_pi(truth2)
    out = uw.romeo_unwrap(w1, mask=mask, phase2_rad=w2, te_ratio=2.0)
    frac, k = _agreement(out, truth1, mask)
    assert frac >= 0.995 and k == 0
    # without the second echo the seed is only known modulo 2*pi
    frac, k = _agreement(uw.romeo_unwrap(w1, mask=mask), truth1, mask)
    assert frac >= 0.995 and k != 0


def test_romeo_disconnected_components_each_unwrapped():
    rng = np.random.default_rng(2)
    x, y, z = _coords()
    truth = _smooth_field(amp=18.0) + rng.normal(0, 0.2, (N, N, N)).astype(np.float32)
    blob1 = ((x + 0.22) ** 2 + y**2 + z**2) < 0.18**2
    blob2 = ((x - 0.22) ** 2 + y**2 + z**2) < 0.18**2
    out = uw.romeo_unwrap(uw.wrap_to_pi(truth), mask=blob1 | blob2)
    for blob in (blob1, blob2):
        assert _agreement(out, truth, blob)[0] >= 0.995


def _multiecho(tes, field_scale, offset_hz=0.0, seed=3):
    rng = np.random.default_rng(seed)
    mask = _sphere_mask()
    field_hz = (_smooth_field(amp=20.0) * field_scale + offset_hz).astype(np.float32)
    truth = np.stack([TWO_PI * field_hz * t for t in tes], axis=-1).astype(np.float32)
    decay = np.exp(-np.asarray(tes) / 0.04).astype(np.float32)
    mag = (np.where(mask, 1.0, 0.05)[..., None] * decay).astype(np.float32)
    noise = rng.normal(0, 1, truth.shape).astype(np.float32) * (0.02 / mag)
    truth = truth + noise
    truth[~mask] = rng.uniform(-np.pi, np.pi, (int((~mask).sum()), len(tes)))
    return truth, uw.wrap_to_pi(truth).astype(np.float32), mag, mask


def test_romeo_multiecho_every_echo_exact():
    tes = (0.004, 0.008, 0.012, 0.016)
    # field about +-100 Hz: up to ~10 rad at the last echo, median near 0 at the first
    truth, wrapped, mag, mask = _multiecho(tes, field_scale=5.0)
    assert np.abs(truth[..., -1][mask]).max() > 2 * np.pi
    out = uw.romeo_unwrap_multiecho(wrapped, tes, magnitude_4d=mag, mask=mask)
    assert out.shape == wrapped.shape and out.dtype == np.float32
    for e in range(len(tes)):
        frac, k = _agreement(out[..., e], truth[..., e], mask)
        assert frac >= 0.995 and k == 0, (e, frac, k)
    np.testing.assert_array_equal(out[~mask], wrapped[~mask])
    # no mask (noise all around): still exact inside the object up to one 2*pi*k per echo
    out = uw.romeo_unwrap_multiecho(wrapped, tes, magnitude_4d=mag)
    for e in range(len(tes)):
        frac, k = _agreement(out[..., e], truth[..., e], mask)
        assert frac >= 0.995, (e, frac, k)


def test_romeo_multiecho_global_correction_uses_temporal_consistency():
    """Uneven TEs and a template median above pi: the temporally consistent level wins over
    ROMEO's 'median into (-pi, pi]' choice (which would be off by 2*pi here)."""
    tes = (0.004, 0.009, 0.0135, 0.020)
    truth, wrapped, mag, mask = _multiecho(tes, field_scale=2.0, offset_hz=190.0)
    assert np.median(truth[..., 0][mask]) > np.pi
    for template in (0, 2):
        out = uw.romeo_unwrap_multiecho(wrapped, tes, magnitude_4d=mag, mask=mask, template_echo=template)
        for e in range(len(tes)):
            frac, k = _agreement(out[..., e], truth[..., e], mask)
            assert frac >= 0.995 and k == 0, (template, e, frac, k)


def test_template_shift_estimate():
    tes = np.array([0.004, 0.009, 0.0135, 0.020])
    truth, wrapped, _, mask = _multiecho(tuple(tes), field_scale=2.0)
    u = truth[..., 0][mask]
    others = [wrapped[..., e][mask] for e in (1, 2, 3)]
    ratios = list(tes[1:] / tes[0])
    assert uw._template_k(u + TWO_PI, others, ratios, k0=0) == -1
    assert uw._template_k(u - 2 * TWO_PI, others, ratios, k0=0) == 2
    # integer TE ratios cannot resolve the ambiguity: the tie goes to k0
    ratios_int = [2.0, 3.0, 4.0]
    others_int = [uw.wrap_to_pi(u * r) for r in ratios_int]
    assert uw._template_k(u + TWO_PI, others_int, ratios_int, k0=0) == 0


def test_voxel_quality_range_and_noise():
    rng = np.random.default_rng(4)
    x, _, _ = _coords()
    truth = _smooth_field(amp=15.0) + rng.normal(0, 0.1, (N, N, N)).astype(np.float32)
    noisy = x > 0.2
    truth[noisy] = rng.uniform(-np.pi, np.pi, int(noisy.sum()))
    wrapped = uw.wrap_to_pi(truth)
    q = uw.romeo_voxel_quality(wrapped)
    assert q.dtype == np.float32 and q.shape == wrapped.shape
    assert q.min() >= 0.0 and q.max() <= 1.0
    clean = (x < 0.1) & (x > -0.4)
    assert q[clean].mean() > 0.7
    assert q[noisy & (x > 0.25)].mean() < 0.35
    # with a mask: zero outside
    mask = _sphere_mask()
    qm = uw.romeo_voxel_quality(wrapped, mask=mask, magnitude=np.ones_like(wrapped))
    assert np.all(qm[~mask] == 0) and qm[mask].max() <= 1.0


def test_edge_weights_quantisation():
    phase = np.zeros((8, 9, 10), np.float32)
    w = uw.romeo_edge_weights(phase)
    assert w.dtype == np.uint8 and w.shape == (8, 9, 10, 3)
    assert np.all(w[-1, :, :, 0] == 0) and np.all(w[:, -1, :, 1] == 0) and np.all(w[:, :, -1, 2] == 0)
    assert np.all(w[1:-2, 1:-2, 1:-2] == 1)  # perfect edges -> best bin
    # a linear ramp (1.3 rad/voxel along x, 0.7 along z, wrapping) is perfectly "linear": pl = 1,
    # while phase coherence penalises the steep gradient
    x, _, z = np.meshgrid(np.arange(8), np.arange(9), np.arange(10), indexing="ij")
    ramp = uw.wrap_to_pi((1.3 * x + 0.7 * z).astype(np.float32))
    assert np.all(uw.romeo_edge_weights(ramp, weights=("pl",))[1:-2, 1:-2, 1:-2] == 1)
    w_pc = uw.romeo_edge_weights(ramp, weights=("pc",))[:-1, :-1, :-1]
    assert np.all(w_pc[..., 0] == np.round(255 * 0.9 * 1.3 / np.pi))
    assert np.all(w_pc[..., 1] == 1)
    noisy = np.random.default_rng(5).uniform(-np.pi, np.pi, (8, 9, 10)).astype(np.float32)
    wn = uw.romeo_edge_weights(noisy)
    assert wn[:-1, :-1, :-1].min() >= 1 and wn[:-1, :-1, :-1].mean() > 100


def test_romeo_deterministic_and_input_untouched(single_echo):
    truth, wrapped, mag, mask = single_echo
    before = wrapped.copy()
    a = uw.romeo_unwrap(wrapped, magnitude=mag)
    b = uw.romeo_unwrap(wrapped, magnitude=mag)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(wrapped, before)
    tes = (0.004, 0.008, 0.012)
    _, w4, m4, mk = _multiecho(tes, field_scale=4.0)
    np.testing.assert_array_equal(
        uw.romeo_unwrap_multiecho(w4, tes, m4, mk), uw.romeo_unwrap_multiecho(w4, tes, m4, mk)
    )


# ------------------------------------------------------------------------------------------------
# Laplacian unwrapping
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("voxel_size_mm", [(1.0, 1.0, 1.0), (0.8, 1.0, 1.6)])
def test_laplacian_dct_without_mask_recovers_phase_up_to_mean(voxel_size_mm):
    """Neumann (DCT) solve of the wrapped-difference Laplacian is exact up to a constant."""
    truth = _smooth_field(amp=20.0) + np.random.default_rng(6).normal(0, 0.2, (N, N, N)).astype(np.float32)
    out = uw.laplacian_unwrap(uw.wrap_to_pi(truth), voxel_size_mm=voxel_size_mm)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, truth - truth.mean(), atol=2e-3)


@pytest.mark.parametrize("method", ["dct", "fft"])
@pytest.mark.parametrize("voxel_size_mm", [(1.0, 1.0, 1.0), (0.8, 1.0, 1.6)])
def test_laplacian_matches_true_laplacian_in_mask(method, voxel_size_mm):
    rng = np.random.default_rng(7)
    mask = _sphere_mask()
    truth = _smooth_field(amp=20.0) + rng.normal(0, 0.1, (N, N, N)).astype(np.float32)
    wrapped = np.where(mask, uw.wrap_to_pi(truth), rng.uniform(-np.pi, np.pi, truth.shape)).astype(np.float32)
    out = uw.laplacian_unwrap(wrapped, voxel_size_mm=voxel_size_mm, mask=mask, method=method)
    assert np.all(out[~mask] == 0)
    interior = mask.copy()
    for ax in range(3):
        interior &= np.roll(mask, 1, ax) & np.roll(mask, -1, ax)
    lap_out = _discrete_laplacian(out, voxel_size_mm)[interior]
    lap_true = _discrete_laplacian(truth, voxel_size_mm)[interior]
    scale = np.abs(lap_true).max()
    assert np.abs(lap_out - lap_true).max() < 1e-3 * scale + 1e-3
    # not 2*pi-congruent: the harmonic part (incl. the linear term) is removed, the rest is kept
    assert np.abs(np.corrcoef(out[mask], truth[mask])[0, 1]) > 0.5


def test_laplacian_fft_periodic_exact_for_periodic_phase():
    x, y, z = _coords()
    truth = (14.0 * np.sin(TWO_PI * x) * np.cos(TWO_PI * 2 * y) + 6.0 * np.cos(TWO_PI * z)).astype(np.float32)
    out = uw.laplacian_unwrap(uw.wrap_to_pi(truth), method="fft")
    np.testing.assert_allclose(out, truth - truth.mean(), atol=2e-3)


# ------------------------------------------------------------------------------------------------
# registry and input validation
# ------------------------------------------------------------------------------------------------


def test_registry_entries(single_echo):
    truth, wrapped, mag, mask = single_echo
    assert "romeo" in UNWRAP and "laplacian" in UNWRAP
    out = UNWRAP.get("romeo")(wrapped, magnitude=mag, mask=mask)
    assert _agreement(out, truth, mask)[0] >= 0.995
    tes = (0.004, 0.008, 0.012)
    t4, w4, m4, mk = _multiecho(tes, field_scale=4.0)
    out4 = UNWRAP.get("romeo")(w4, magnitude=m4, mask=mk, echo_times_s=tes)
    assert out4.shape == w4.shape and _agreement(out4[..., 2], t4[..., 2], mk) == (pytest.approx(1.0, abs=5e-3), 0)
    lap4 = UNWRAP.get("laplacian")(w4, mask=mk, voxel_size_mm=(1, 1, 1))
    assert lap4.shape == w4.shape and lap4.dtype == np.float32
    with pytest.raises(ValueError, match="echo_times_s"):
        UNWRAP.get("romeo")(w4)


def test_input_errors():
    ph = np.zeros((8, 8, 8), np.float32)
    ph4 = np.zeros((8, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="magnitude"):
        uw.romeo_unwrap(ph, magnitude=np.ones((8, 8, 7), np.float32))
    with pytest.raises(ValueError, match="mask"):
        uw.romeo_unwrap(ph, mask=np.ones((8, 8, 7), bool))
    with pytest.raises(ValueError, match="phase2_rad"):
        uw.romeo_unwrap(ph, phase2_rad=np.zeros((7, 8, 8), np.float32), te_ratio=0.5)
    with pytest.raises(ValueError, match="te_ratio"):
        uw.romeo_unwrap(ph, phase2_rad=ph)
    bad = ph.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        uw.romeo_unwrap(bad)
    with pytest.raises(ValueError, match="NaN"):
        uw.laplacian_unwrap(bad)
    with pytest.raises(ValueError, match="empty"):
        uw.romeo_unwrap(ph, mask=np.zeros((8, 8, 8), bool))
    with pytest.raises(ValueError, match="empty"):
        uw.laplacian_unwrap(ph, mask=np.zeros((8, 8, 8), bool))
    with pytest.raises(ValueError, match="empty"):
        uw.romeo_voxel_quality(ph, mask=np.zeros((8, 8, 8), bool))
    with pytest.raises(ValueError, match="weights"):
        uw.romeo_unwrap(ph, weights="best")
    with pytest.raises(ValueError, match="3D"):
        uw.romeo_unwrap(ph4)
    with pytest.raises(ValueError, match="at least 2"):
        uw.romeo_unwrap_multiecho(ph4[..., :1], (0.004,))
    with pytest.raises(ValueError, match="echo times"):
        uw.romeo_unwrap_multiecho(ph4, (0.004, 0.008))
    with pytest.raises(ValueError, match="seconds"):
        uw.romeo_unwrap_multiecho(ph4, (4.0, 8.0, 12.0))
    with pytest.raises(ValueError, match="magnitude_4d"):
        uw.romeo_unwrap_multiecho(ph4, (0.004, 0.008, 0.012), magnitude_4d=np.ones((8, 8, 8, 2), np.float32))
    with pytest.raises(ValueError, match="template_echo"):
        uw.romeo_unwrap_multiecho(ph4, (0.004, 0.008, 0.012), template_echo=3)
    with pytest.raises(ValueError, match="mask"):
        uw.romeo_unwrap_multiecho(ph4, (0.004, 0.008, 0.012), mask=np.ones((8, 8, 9), bool))
    with pytest.raises(ValueError, match="method"):
        uw.laplacian_unwrap(ph, method="mgpcg")
    with pytest.raises(ValueError, match="voxel_size_mm"):
        uw.laplacian_unwrap(ph, voxel_size_mm=(1, 1))
    with pytest.raises(ValueError, match="mask"):
        uw.laplacian_unwrap(ph, mask=np.ones((8, 8, 9), bool))
