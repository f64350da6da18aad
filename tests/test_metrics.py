"""Accuracy metrics: known values, invariances, cross-check against the QSM-CI scorer, errors."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from qsmprep.qsm import metrics as M

SHAPE = (40, 44, 36)


@pytest.fixture(scope="module")
def data():
    """Smooth random 'truth' (ppm) in an ellipsoid mask, a noisy/blurred 'estimate', DGM-like labels."""
    rng = np.random.default_rng(0)
    c = [(n - 1) / 2 for n in SHAPE]
    g = np.meshgrid(*[np.arange(n) - ci for n, ci in zip(SHAPE, c)], indexing="ij")
    mask = sum((gi / s) ** 2 for gi, s in zip(g, (16, 18, 14))) <= 1
    truth = ndi.gaussian_filter(rng.standard_normal(SHAPE), 2.0).astype(np.float32) * 0.3
    labels = np.zeros(SHAPE, np.int16)
    for lab, (cx, cy, cz), val in [(1, (-6, -6, 0), 0.05), (2, (6, -6, 0), 0.15), (3, (-6, 6, 0), 0.08),
                                   (4, (6, 6, 0), 0.1), (5, (0, 0, -6), 0.12), (6, (0, 0, 6), 0.2)]:
        sel = sum((gi - ci) ** 2 for gi, ci in zip(g, (cx, cy, cz))) <= 9
        labels[sel] = lab
        truth[sel] += val
    truth = (truth * mask).astype(np.float32)
    est = ndi.gaussian_filter(truth, 0.8) + rng.normal(0, 0.01, SHAPE)
    est = (est * mask + 0.03).astype(np.float32)  # plus a reference offset
    return truth, est, mask, labels


def test_identical_maps(data):
    t, _, m, labels = data
    assert M.nrmse(t, t, m) == pytest.approx(0, abs=1e-9)
    assert M.ddnrmse(t, t, m) == pytest.approx(0, abs=1e-9)
    assert M.rmse(t, t, m) == pytest.approx(0, abs=1e-9)
    assert M.rmse(t, t, m, normalise=False) == pytest.approx(0, abs=1e-12)
    assert M.hfen(t, t, m) == pytest.approx(0, abs=1e-9)
    assert M.xsim(t, t, m) == pytest.approx(1, abs=1e-9)
    assert M.pearson(t, t, m) == pytest.approx(1, abs=1e-9)
    assert M.dgm_slope(t, t, m, labels) == pytest.approx(1, abs=1e-9)


def test_offset_and_scale(data):
    t, _, m, labels = data
    # a constant offset: the demeaned metrics ignore it, the 2016 RMSE does not
    assert M.nrmse(t + 0.1, t, m) == pytest.approx(0, abs=1e-4)
    assert M.hfen(t + 0.1, t, m) == pytest.approx(0, abs=1e-4)
    assert M.rmse(t + 0.1, t, m, normalise=False) == pytest.approx(0.1, rel=1e-5)
    assert M.rmse(t + 0.1, t, m) > 10
    # a global scaling: ddNRMSE removes it, NRMSE sees exactly |1 - s|
    s = 0.5
    assert M.ddnrmse(s * t, t, m) == pytest.approx(0, abs=1e-4)
    assert M.nrmse(s * t, t, m) == pytest.approx(100 * (1 - s), rel=1e-5)
    assert M.pearson(s * t + 0.2, t, m) == pytest.approx(1, abs=1e-6)
    assert M.pearson(-t, t, m) == pytest.approx(-1, abs=1e-6)
    assert M.dgm_slope(s * t + 0.2, t, m, labels) == pytest.approx(s, rel=1e-5)
    assert M.xsim(s * t, t, m) < 0.99


def test_known_values():
    m = np.ones((8, 8, 8), bool)
    t = np.zeros((8, 8, 8), np.float32)
    t[:4] = 1.0  # demeaned truth is +-0.5
    x = t.copy()
    x[0, 0, 0] += 0.5
    # ||x - t|| after demeaning: one voxel off by 0.5 minus the shift of the mean (0.5/512)
    err = np.full(512, -0.5 / 512)
    err[0] += 0.5
    assert M.nrmse(x, t, m) == pytest.approx(100 * np.linalg.norm(err) / np.sqrt(512 * 0.25), rel=1e-6)
    assert M.rmse(x, t, m) == pytest.approx(100 * 0.5 / np.sqrt(256), rel=1e-6)
    assert M.rmse(x, t, m, normalise=False) == pytest.approx(0.5 / np.sqrt(512), rel=1e-6)


def test_metrics_rank_worse_estimates(data):
    t, est, m, _ = data
    rng = np.random.default_rng(1)
    worse = est + rng.normal(0, 0.05, SHAPE).astype(np.float32)
    for f in (M.nrmse, M.ddnrmse, M.hfen, M.rmse):
        assert f(worse, t, m) > f(est, t, m)
    for f in (M.xsim, M.pearson):
        assert f(worse, t, m) < f(est, t, m)


def test_log_kernel():
    k = M.log_kernel()
    assert k.shape == (15, 15, 15)
    assert abs(k.sum()) < 1e-12
    assert k[7, 7, 7] < 0 and np.allclose(k, k[::-1, ::-1, ::-1])
    with pytest.raises(ValueError, match="odd"):
        M.log_kernel(14)


# --- cross-check against the QSM-CI scorer (qsm-ci package; reference only, not a runtime dependency)


@pytest.fixture(scope="module")
def qe():
    return pytest.importorskip("qsm_ci.qsm_eval")


def test_nrmse_ddnrmse_match_qsm_ci(qe, data):
    t, est, m, _ = data
    n, ndt = qe.nrmse_challenge(est.astype(float), t.astype(float), m)
    assert M.nrmse(est, t, m) == pytest.approx(n, rel=1e-6)
    assert M.ddnrmse(est, t, m) == pytest.approx(ndt, rel=1e-6)
    r = qe.correlation(est.astype(float), t.astype(float), m)
    assert M.pearson(est, t, m) == pytest.approx(r, rel=1e-6)


def test_hfen_close_to_qsm_ci(qe, data):
    """QSM-CI uses scipy's gaussian_laplace (17^3 support) on the raw maps; ours is the 2016 15^3 zero-sum
    kernel on demeaned, masked maps. On masked zero-mean inputs both agree closely."""
    t, est, m, _ = data
    td = np.where(m, t - t[m].mean(), 0.0)
    xd = np.where(m, est - est[m].mean(), 0.0)
    ours = M.hfen(est, t, m)
    theirs = qe.hfen(xd, td, m)
    assert ours == pytest.approx(theirs, rel=2e-3)


def test_xsim_matches_qsm_ci_with_its_window(qe, data):
    """QSM-CI/QSM.rs use 5^3 uniform windows; ours defaults to FANSI's 7^3 Gaussian (sigma 1.5). With a
    uniform 5^3 window (sigma -> inf) and a mask away from the volume border the two are identical."""
    t, est, m, _ = data
    theirs = qe.xsim(np.where(m, est, 0.0), np.where(m, t, 0.0), m)
    assert M.xsim(est, t, m, sigma=1e6, half_width=(2, 2, 2)) == pytest.approx(theirs, rel=1e-6)
    default = M.xsim(est, t, m)
    assert 0 < default < 1 and abs(default - theirs) < 0.15  # documented window difference


def test_dgm_slope_matches_qsm_ci(qe, data):
    t, est, m, labels = data
    assert abs(1 - M.dgm_slope(est, t, m, labels)) == pytest.approx(
        qe.dgm_linearity(est.astype(float), t.astype(float), labels), rel=1e-5
    )


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nrmse", "ddnrmse", "rmse", "hfen", "xsim", "pearson"])
def test_validation_errors(data, name):
    t, est, m, _ = data
    f = getattr(M, name)
    with pytest.raises(ValueError, match="shape"):
        f(est[:-1], t, m)
    with pytest.raises(ValueError, match="shape"):
        f(est, t, m[:, :-1])
    with pytest.raises(ValueError, match="empty"):
        f(est, t, np.zeros_like(m))
    bad = est.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        f(bad, t, m)


def test_degenerate_inputs(data):
    t, est, m, labels = data
    const = np.full(SHAPE, 0.1, np.float32)
    for f in (M.nrmse, M.ddnrmse, M.hfen, M.pearson):
        with pytest.raises(ValueError, match="constant"):
            f(est, const, m)
    with pytest.raises(ValueError, match="slope 0|uncorrelated|constant"):
        M.ddnrmse(const, t, m)
    with pytest.raises(ValueError, match="labels"):
        M.dgm_slope(est, t, m, labels[:-1])
    with pytest.raises(ValueError, match="at least 2"):
        M.dgm_slope(est, t, m, labels, label_values=(1, 99))
    with pytest.raises(ValueError, match="k must"):
        M.xsim(est, t, m, k=(0.01,))


def test_separable_filters_match_direct_convolution():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((20, 22, 18))
    direct = ndi.convolve(v, M.log_kernel(15, 1.5), mode="constant", cval=0.0)
    np.testing.assert_allclose(M._log_filter(v, 15, 1.5), direct, atol=1e-10 * np.abs(direct).max())
    r = np.arange(-3, 4)
    w1 = np.exp(-r**2 / (2 * 1.5**2))
    w3 = w1[:, None, None] * w1[None, :, None] * w1[None, None, :]
    direct = ndi.correlate(v, w3 / w3.sum(), mode="constant", cval=0.0)
    np.testing.assert_allclose(M._correlate_sep(v, [w1 / w1.sum()] * 3), direct, atol=1e-12)
