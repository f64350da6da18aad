"""MCPC-3D-S, B0 fitting and R2* mapping against synthetic multi-echo ground truth."""

import numpy as np
import pytest
from helpers import TWO_PI, unit_grid

from qsmprep.qsm.geometry import forward_field_ppm
from qsmprep.qsm.multiecho import (
    fit_b0_hz,
    fit_b0_hz_with_offset,
    fit_r2star,
    mcpc3ds,
    smooth_phase,
    t2star_s,
)
from qsmprep.qsm.phase import wrap_to_pi

TE = (0.004, 0.008, 0.012, 0.016, 0.020)
#: TE1 / dTE = 0.7 is not an integer: a wrong 2*pi in the unwrapped HIP phase corrupts phi0
TE_MCPC = (0.0035, 0.0085, 0.0135, 0.0185, 0.0235)
VS = (3.0, 3.0, 3.0)  # 64^3 x 3 mm: a head-sized field of view, so phi0 varies as in a real head


def _case(shape=(64, 64, 56), te=TE, snr=50.0, seed=0, fmax_hz=150.0, phi0_scale=1.0):
    """Ellipsoidal brain with susceptibility blobs, a strong background field (HIP wraps), a smooth
    phase offset with wraps, noise at ``snr`` (relative to M0 = 1)."""
    rng = np.random.default_rng(seed)
    x, y, z = unit_grid(shape)
    brain = (x / 0.62) ** 2 + (y / 0.68) ** 2 + (z / 0.7) ** 2 < 1
    chi = np.zeros(shape, np.float32)
    for c, r, v in [((0.2, 0.1, 0.0), 0.15, 0.2), ((-0.25, -0.1, 0.1), 0.12, -0.15), ((0.0, 0.3, -0.2), 0.1, 0.3)]:
        chi[(x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < r**2] = v
    local_hz = forward_field_ppm(chi * brain, VS, (0, 0, 1), pad_voxels=16) * 42.577 * 3.0
    f_hz = (local_hz + fmax_hz * (0.6 * x + 0.5 * y**2 - 0.4 * z + 0.3 * x * z)).astype(np.float32)
    phi0 = (phi0_scale * (1.2 * np.sin(2.0 * x + 0.5) + 0.8 * y * z + 1.5 * z**2) + 2.5).astype(np.float32)
    r2s = np.float32(25.0)
    te = np.asarray(te)
    mag = np.empty(shape + (te.size,), np.float32)
    ph = np.empty_like(mag)
    sig = 0.0 if snr is None else 1.0 / snr
    m0 = np.where(brain, 1.0, 0.02).astype(np.float32)
    for e, t in enumerate(te):
        s = m0 * np.exp(-r2s * t) * np.exp(1j * (phi0 + TWO_PI * f_hz * t))
        s = s + sig * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
        mag[..., e] = np.abs(s)
        ph[..., e] = np.angle(s)
    return dict(mag=mag, phase=ph, te=te, f_hz=f_hz, phi0=phi0, brain=brain)


@pytest.fixture(scope="module")
def case():
    return _case(te=TE_MCPC, fmax_hz=320.0, phi0_scale=2.0)


def _offset_error(off, phi0, mask):
    return float(np.median(np.abs(wrap_to_pi(off - phi0))[mask]))


# --------------------------------------------------------------------------------------------------
# MCPC-3D-S
# --------------------------------------------------------------------------------------------------


def test_mcpc3ds_removes_offset_with_romeo(case):
    c = case
    # the HIP phase wraps inside the brain: unwrapping is really needed
    assert np.abs(TWO_PI * c["f_hz"] * (TE_MCPC[1] - TE_MCPC[0]))[c["brain"]].max() > 1.5 * np.pi
    assert np.ptp(c["phi0"][c["brain"]]) > np.pi and c["phi0"][c["brain"]].max() > np.pi  # phi0 wraps
    pc, off = mcpc3ds(c["phase"], c["mag"], c["te"], VS)
    assert pc.shape == c["phase"].shape and pc.dtype == np.float32 and off.dtype == np.float32
    b = c["brain"]
    err = _offset_error(off, c["phi0"], b)
    assert err < 0.05, err
    assert np.percentile(np.abs(wrap_to_pi(off - c["phi0"]))[b], 95) < 0.25  # edge bias of masked smoothing
    assert np.mean(np.abs(wrap_to_pi(off - c["phi0"]))[b] > 0.5) < 0.002  # no unwrapping errors
    # corrected echoes carry only the field: 2*pi*f*TE (wrapped)
    for e, t in enumerate(TE_MCPC):
        d = np.abs(wrap_to_pi(pc[..., e] - TWO_PI * c["f_hz"] * t))[b]
        assert np.median(d) < 0.06, (e, np.median(d))
    # echoes 2 and 3 (TE1/dTE = 2) and an explicit mask
    pc2, off2 = mcpc3ds(c["phase"], c["mag"], c["te"], VS, echoes=(1, 2), mask=b)
    assert _offset_error(off2, c["phi0"], b) < 0.08
    # without unwrapping the HIP phase the offset is wrong where it wraps (guards the test itself)
    _, off_bad = mcpc3ds(c["phase"], c["mag"], c["te"], VS, unwrapper=lambda p, m, k: p)
    assert np.mean(np.abs(wrap_to_pi(off_bad - c["phi0"]))[b] > 0.5) > 0.05


def test_mcpc3ds_uneven_echoes_without_romeo():
    """Custom unwrapper (identity): a weak field so the HIP phase does not wrap; uneven TEs."""
    te = (0.003, 0.0075, 0.013, 0.0195)
    c = _case(shape=(48, 48, 40), te=te, fmax_hz=25.0, seed=1)
    b = c["brain"]
    assert np.abs(TWO_PI * c["f_hz"] * (te[1] - te[0]))[b].max() < np.pi
    pc, off = mcpc3ds(c["phase"], c["mag"], te, (4.0, 4.0, 4.0), unwrapper=lambda p, m, k: p, mask=b)
    assert _offset_error(off, c["phi0"], b) < 0.05
    b0 = fit_b0_hz(pc, te, c["mag"], mask=b)  # no temporal wraps in this weak field
    assert np.median(np.abs(b0 - c["f_hz"])[b]) < 1.0
    _, off_nomag = mcpc3ds(c["phase"], None, te, (4.0, 4.0, 4.0), unwrapper=lambda p, m, k: p)
    assert _offset_error(off_nomag, c["phi0"], b) < 0.05  # no magnitude, no mask: uniform weights


def test_mcpc3ds_errors(case):
    c = case
    ph, mag = c["phase"], c["mag"]
    ident = lambda p, m, k: p  # noqa: E731
    with pytest.raises(ValueError, match="at least 2"):
        mcpc3ds(ph[..., :1], mag[..., :1], TE[:1], VS, unwrapper=ident)
    with pytest.raises(ValueError, match="same echo time"):
        mcpc3ds(ph[..., :2], mag[..., :2], (0.004, 0.004), VS, unwrapper=ident)
    with pytest.raises(ValueError, match="two different"):
        mcpc3ds(ph, mag, TE, VS, echoes=(1, 1), unwrapper=ident)
    with pytest.raises(ValueError, match="two different"):
        mcpc3ds(ph, mag, TE, VS, echoes=(0, 7), unwrapper=ident)
    with pytest.raises(ValueError, match="echo times"):
        mcpc3ds(ph, mag, TE[:3], VS, unwrapper=ident)
    with pytest.raises(ValueError, match="shape"):
        mcpc3ds(ph, mag[:10], TE, VS, unwrapper=ident)
    bad = ph.copy()
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mcpc3ds(bad, mag, TE, VS, unwrapper=ident)
    with pytest.raises(ValueError, match="empty"):
        mcpc3ds(ph, mag, TE, VS, mask=np.zeros(ph.shape[:3], bool), unwrapper=ident)
    with pytest.raises(ValueError, match="sigma_mm"):
        mcpc3ds(ph, mag, TE, VS, sigma_mm=-1, unwrapper=ident)
    with pytest.raises(ValueError, match="required"):
        mcpc3ds(ph, mag, None, VS, unwrapper=ident)


def test_smooth_phase_extrapolates_and_keeps_smooth_phase():
    shape = (40, 40, 40)
    x, y, z = unit_grid(shape)
    phi = wrap_to_pi(2.0 * x + 1.0 * y * y + 3.0).astype(np.float32)
    w = ((x**2 + y**2 + z**2) < 0.4).astype(np.float32)
    s = smooth_phase(phi, w, sigma_vox=2.0)
    inner = (x**2 + y**2 + z**2) < 0.3
    assert np.median(np.abs(wrap_to_pi(s - phi))[inner]) < 0.02
    assert np.all(np.isfinite(s)) and s.min() >= -np.pi - 1e-6  # defined everywhere (corners too)
    with pytest.raises(ValueError, match="zero everywhere"):
        smooth_phase(phi, np.zeros_like(w), 2.0)


# --------------------------------------------------------------------------------------------------
# B0 fitting
# --------------------------------------------------------------------------------------------------


def _unwrapped_truth(snr, seed=3, shape=(32, 32, 32), te=TE):
    rng = np.random.default_rng(seed)
    x, y, z = unit_grid(shape)
    f = (80.0 * x + 40.0 * y * z - 30.0 * z**2).astype(np.float32)
    mag = np.stack([np.full(shape, np.exp(-25 * t), np.float32) for t in te], -1)
    ph = np.stack([TWO_PI * f * t for t in te], -1).astype(np.float32)
    if snr:
        ph = ph + rng.standard_normal(ph.shape).astype(np.float32) / (snr * mag)
    return f, ph, mag


@pytest.mark.parametrize("weighting", ["phase_snr", "phase_var", "average", "tes", "mag"])
def test_fit_b0_hz_accuracy(weighting):
    f, ph0, mag = _unwrapped_truth(None)
    b0 = fit_b0_hz(ph0, TE, mag, weighting=weighting)
    assert np.abs(b0 - f).max() < 1e-2
    f, ph, mag = _unwrapped_truth(50)
    b0 = fit_b0_hz(ph, TE, mag, weighting=weighting)
    assert b0.dtype == np.float32
    assert np.median(np.abs(b0 - f)) < 1.0


def test_fit_b0_hz_single_echo_mask_and_no_magnitude():
    f, ph, mag = _unwrapped_truth(None)
    np.testing.assert_allclose(fit_b0_hz(ph[..., 2], TE[2]), f, atol=1e-3)
    np.testing.assert_allclose(fit_b0_hz(ph[..., 2:3], TE[2:3]), f, atol=1e-3)
    np.testing.assert_allclose(fit_b0_hz(ph, TE), f, atol=1e-2)  # simulated magnitude weights
    m = np.zeros(f.shape, bool)
    m[8:20, 8:20, 8:20] = True
    b0 = fit_b0_hz(ph, TE, mag, mask=m)
    assert np.all(b0[~m] == 0) and np.abs(b0 - f)[m].max() < 1e-2


def test_fit_b0_hz_with_offset():
    f, ph, mag = _unwrapped_truth(None)
    off = np.float32(1.3) + 0.5 * unit_grid(f.shape)[0]
    b0, o, res = fit_b0_hz_with_offset(ph + off[..., None], TE, mag)
    assert np.abs(b0 - f).max() < 1e-2 and np.abs(o - off).max() < 1e-3 and res.max() < 1e-6
    f, ph, mag = _unwrapped_truth(50)
    b0, o, res = fit_b0_hz_with_offset(ph + off[..., None], TE, mag)
    assert np.median(np.abs(b0 - f)) < 3.0  # the intercept costs SNR
    assert np.median(np.abs(o - off)) < 0.05
    # residual ~ phase noise variance (sigma = 1/(snr*M)), reduced by the 2 fitted parameters
    sigma2 = np.mean(1 / (50 * mag[0, 0, 0]) ** 2)
    assert 0.2 * sigma2 < np.median(res) < 2 * sigma2
    b0a, _, _ = fit_b0_hz_with_offset(ph, TE)  # no magnitude: unweighted
    assert np.median(np.abs(b0a - f)) < 3.0


def test_fit_b0_hz_fits_the_residual_phase_offset():
    """Default: a per-voxel intercept, so an offset left by MCPC-3D-S does not enter the field; the fit
    through the origin (``fit_offset=False``) turns it into a field error of ``off / (2 pi TE)``."""
    f, ph, mag = _unwrapped_truth(None)
    off = (0.4 * unit_grid(f.shape)[0] ** 2 - 0.2).astype(np.float32)  # curved residual offset (rad)
    b0 = fit_b0_hz(ph + off[..., None], TE, mag)
    assert np.abs(b0 - f).max() < 1e-2
    b0o = fit_b0_hz(ph + off[..., None], TE, mag, fit_offset=False)
    assert np.abs(b0o - f).max() > 1.0  # 0.2 rad over TE ~ 10 ms: a few Hz
    # phase_var weights (w = M^2 TE^2, i.e. M^2 on the phase residuals): the slope of fit_b0_hz_with_offset
    np.testing.assert_allclose(fit_b0_hz(ph + off[..., None], TE, mag, weighting="phase_var"),
                               fit_b0_hz_with_offset(ph + off[..., None], TE, mag)[0], atol=1e-2)
    # the intercept costs noise: about twice the field std of the fit through the origin
    f, ph, mag = _unwrapped_truth(50)
    sd_line = np.std(fit_b0_hz(ph, TE, mag) - f)
    sd_origin = np.std(fit_b0_hz(ph, TE, mag, fit_offset=False) - f)
    assert 1.3 < sd_line / sd_origin < 3.0
    # one echo, or a single echo time: no line, phi / (2 pi TE)
    f, ph, mag = _unwrapped_truth(None)
    np.testing.assert_allclose(fit_b0_hz(ph[..., 2:3], TE[2:3], mag[..., 2:3]), f, atol=1e-3)


def test_fit_b0_errors():
    f, ph, mag = _unwrapped_truth(None, shape=(8, 8, 8))
    with pytest.raises(ValueError, match="echo times"):
        fit_b0_hz(ph, TE[:4], mag)
    with pytest.raises(ValueError, match="shape"):
        fit_b0_hz(ph, TE, mag[..., :3])
    with pytest.raises(ValueError, match="unknown B0 weighting"):
        fit_b0_hz(ph, TE, mag, weighting="best")
    bad = ph.copy()
    bad[0, 0, 0, 1] = np.inf
    with pytest.raises(ValueError, match="NaN"):
        fit_b0_hz(bad, TE, mag)
    with pytest.raises(ValueError, match="empty"):
        fit_b0_hz(ph, TE, mag, mask=np.zeros((8, 8, 8)))
    with pytest.raises(ValueError, match="milliseconds"):
        fit_b0_hz(ph, [4, 8, 12, 16, 20], mag)
    with pytest.raises(ValueError, match="at least 2"):
        fit_b0_hz_with_offset(ph[..., :1], TE[:1], mag[..., :1])
    with pytest.raises(ValueError, match="equal"):
        fit_b0_hz_with_offset(ph[..., :2], (0.01, 0.01), mag[..., :2])


# --------------------------------------------------------------------------------------------------
# R2*
# --------------------------------------------------------------------------------------------------


def _decay(snr, r2, te=TE, shape=(24, 24, 24), seed=5, s0=1.0):
    rng = np.random.default_rng(seed)
    s = s0 * np.exp(-np.asarray(r2, np.float64)[..., None] * np.asarray(te))
    if snr:
        s = s + (rng.standard_normal(s.shape) + 1j * rng.standard_normal(s.shape)) / snr
    return np.abs(s).astype(np.float32)


@pytest.mark.parametrize("method", ["loglinear", "arlo"])
def test_fit_r2star_accuracy(method):
    x, _, _ = unit_grid((24, 24, 24))
    r2 = (30.0 + 20.0 * x).astype(np.float32)  # 10..50 1/s
    mag = _decay(None, r2, s0=2.0)
    est, s0 = fit_r2star(mag, TE, method=method)
    tol = 1e-4 if method == "loglinear" else 0.01  # ARLO: Simpson-rule approximation
    assert np.max(np.abs(est - r2) / r2) < tol
    assert np.max(np.abs(s0 - 2.0)) < 0.02
    mag = _decay(500, r2, s0=1.0)
    est, s0 = fit_r2star(mag, TE, method=method)
    assert np.median(np.abs(est - r2) / r2) < 0.05
    assert abs(np.median(est - r2)) < 0.3  # unbiased


def test_fit_r2star_reweighting_removes_bias():
    mag = _decay(50, np.full((40, 40, 40), 20.0, np.float32), seed=6)
    biased, _ = fit_r2star(mag, TE, reweight=False)
    est, _ = fit_r2star(mag, TE)
    assert abs(np.mean(est) - 20.0) < 0.03
    assert abs(np.mean(est) - 20.0) < abs(np.mean(biased) - 20.0)


def test_fit_r2star_clip_mask_and_t2star():
    r2 = np.full((8, 8, 8), 30.0, np.float32)
    r2[0] = 3000.0
    r2[1] = -10.0  # growing signal
    mag = _decay(None, r2)
    m = np.ones((8, 8, 8), bool)
    m[7] = False
    est, s0 = fit_r2star(mag, TE, mask=m)
    assert np.all(est[0] == 1000.0) and np.all(est[1] == 0.0) and np.all(est[7] == 0) and np.all(s0[7] == 0)
    np.testing.assert_allclose(est[2:7], 30.0, rtol=1e-4)
    t2 = t2star_s(est)
    np.testing.assert_allclose(t2[2:7], 1 / 30.0, rtol=1e-4)
    assert np.all(t2[1] == 0)
    mag[3, 3, 3, :] = 0  # no signal: no fit, no NaN
    est, s0 = fit_r2star(mag, TE)
    assert est[3, 3, 3] == 0 and np.all(np.isfinite(est)) and np.all(np.isfinite(s0))


def test_fit_r2star_errors():
    mag = _decay(None, np.full((6, 6, 6), 20.0, np.float32))
    with pytest.raises(ValueError, match="at least 3 echoes"):
        fit_r2star(mag[..., :2], TE[:2], method="arlo")
    with pytest.raises(ValueError, match="equally spaced"):
        fit_r2star(mag[..., :4], (0.004, 0.008, 0.013, 0.016), method="arlo")
    with pytest.raises(ValueError, match="at least 2"):
        fit_r2star(mag[..., :1], TE[:1])
    with pytest.raises(ValueError, match="echo times"):
        fit_r2star(mag, TE[:3])
    with pytest.raises(ValueError, match="unknown R2"):
        fit_r2star(mag, TE, method="nlls")
    with pytest.raises(ValueError, match="non-negative"):
        fit_r2star(-mag, TE)
    with pytest.raises(ValueError, match="4D"):
        fit_r2star(mag[..., 0], TE[:1])
