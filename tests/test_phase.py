"""Phase units detection, scaling to radians (exact round trips) and complex helpers."""

import numpy as np
import pytest

from qsmprep.qsm.phase import (
    PHASE_RANGES,
    combine_echoes_complex,
    detect_phase_units,
    hermitian_product,
    mag_phase_from_real_imag,
    scale_phase_to_rad,
    to_complex,
    wrap_to_pi,
)

PI32 = np.float32(np.pi)


def _true_phase(shape=(16, 16, 8), seed=0):
    return np.random.default_rng(seed).uniform(-np.pi, np.pi, shape).astype(np.float32)


def _in_range(r):
    return r.dtype == np.float32 and r.min() >= -PI32 and r.max() < PI32


def test_siemens_rescaled_exact_round_trip():
    x = np.arange(-4096, 4096, 2, dtype=np.int16).reshape(8, 8, 64)  # -4096..4094
    assert detect_phase_units(x) == "integer"
    assert detect_phase_units(x, units="arbitrary") == "integer"
    r = scale_phase_to_rad(x)
    assert _in_range(r)
    np.testing.assert_allclose(r, x.astype(np.float64) * np.pi / 4096, atol=1e-6)
    back = np.round(r.astype(np.float64) * 4096 / np.pi).astype(np.int64)
    assert np.array_equal(back, x)


def test_siemens_raw_12bit_round_trip():
    x = np.arange(4096, dtype=np.uint16).reshape(16, 16, 16)
    assert detect_phase_units(x) == "integer"
    r = scale_phase_to_rad(x)
    assert _in_range(r)
    assert r.reshape(-1)[0] == -PI32 and abs(r.reshape(-1)[2048]) < 1e-6  # 0 -> -pi, 2048 -> 0
    back = np.round((r.astype(np.float64) + np.pi) * 4096 / (2 * np.pi)).astype(np.int64) % 4096
    assert np.array_equal(back, x)


@pytest.mark.parametrize("name", ["signed_12bit", "unsigned_16bit", "signed_16bit"])
def test_other_nominal_ranges_round_trip(name):
    low, period = PHASE_RANGES[name]
    truth = _true_phase()
    x = np.round((truth.astype(np.float64) + np.pi) / (2 * np.pi) * period + low)
    x = np.clip(x, low, low + period - 1).astype(np.int64)
    r = scale_phase_to_rad(x)
    assert detect_phase_units(x) == "integer"
    assert np.abs(wrap_to_pi(r - truth)).max() < 2 * np.pi / period + 1e-6


def test_ge_milliradians():
    truth = _true_phase()
    x = np.round(truth.astype(np.float64) * 1000).astype(np.int16)  # -3142..3142
    x.reshape(-1)[:2] = (-3142, 3142)
    r = scale_phase_to_rad(x)
    assert detect_phase_units(x) == "integer" and _in_range(r)
    assert np.abs(wrap_to_pi(r - x / 1000.0)).max() < 1e-6


def test_radians_unchanged_and_zero_to_two_pi():
    truth = _true_phase()
    assert detect_phase_units(truth) == "rad"
    assert detect_phase_units(truth, units="rad") == "rad"
    assert np.array_equal(scale_phase_to_rad(truth), truth)  # exact identity
    assert np.array_equal(scale_phase_to_rad(truth, units="Radians"), truth)
    pos = (truth + np.float32(np.pi)).astype(np.float32)  # [0, 2pi)
    assert detect_phase_units(pos) == "rad"
    r = scale_phase_to_rad(pos)
    assert _in_range(r)
    assert np.abs(wrap_to_pi(r - pos)).max() < 1e-6
    # float radians labelled 'arbitrary' are kept as radians
    assert np.array_equal(scale_phase_to_rad(truth, units="arbitrary"), truth)


def test_arbitrary_min_max_rescale():
    truth = np.linspace(-np.pi, np.pi, 4097)[:-1].astype(np.float64).reshape(16, 16, 16)
    x = 37.5 * truth + 12.0  # float, arbitrary scale: needs the sidecar
    r = scale_phase_to_rad(x, units="arbitrary")
    assert detect_phase_units(x, units="arbitrary") == "arbitrary"
    assert np.abs(wrap_to_pi(r - truth)).max() < 2e-3
    xi = np.round((truth + np.pi) * 1000 / (2 * np.pi)).astype(np.int32)  # 0..1000 integers
    assert detect_phase_units(xi) == "arbitrary"
    assert np.abs(wrap_to_pi(scale_phase_to_rad(xi) - truth)).max() < 1e-2


def test_phase_unit_errors():
    truth = _true_phase()
    with pytest.raises(ValueError, match="neither radians"):
        scale_phase_to_rad(truth * 6)  # unwrapped-looking float phase
    with pytest.raises(ValueError, match="Units are 'rad'"):
        scale_phase_to_rad(np.arange(-4096, 4096).reshape(16, 16, 32), units="rad")
    with pytest.raises(ValueError, match="unrecognised phase Units"):
        detect_phase_units(truth, units="Hz")
    with pytest.raises(ValueError, match="constant"):
        scale_phase_to_rad(np.zeros((4, 4, 4)))
    bad = truth.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        scale_phase_to_rad(bad)
    with pytest.raises(ValueError, match="real-valued"):
        scale_phase_to_rad(truth.astype(np.complex64))


def test_wrap_to_pi():
    x = np.array([0.0, np.pi, -np.pi, 3 * np.pi, -7.5, 100.0, 2 * np.pi - 1e-9], np.float64)
    w = wrap_to_pi(x)
    assert _in_range(w)
    np.testing.assert_allclose(np.cos(w), np.cos(x), atol=1e-5)
    np.testing.assert_allclose(np.sin(w), np.sin(x), atol=1e-5)
    w_pi = float(wrap_to_pi(np.float32(PI32)))  # float32(pi) > pi wraps to about -pi
    assert -PI32 <= w_pi < -PI32 + 1e-6


def test_complex_helpers():
    rng = np.random.default_rng(1)
    mag = rng.uniform(0.1, 2.0, (8, 8, 8)).astype(np.float32)
    ph = _true_phase((8, 8, 8), seed=2)
    z = to_complex(mag, ph)
    assert z.dtype == np.complex64
    m2, p2 = mag_phase_from_real_imag(z.real, z.imag)
    np.testing.assert_allclose(m2, mag, rtol=1e-5)
    assert np.abs(wrap_to_pi(p2 - ph)).max() < 1e-5
    ph2 = _true_phase((8, 8, 8), seed=3)
    h = hermitian_product(z, to_complex(mag, ph2))
    assert np.abs(wrap_to_pi(np.angle(h) - (ph2 - ph))).max() < 1e-5
    # channel sum: a per-channel offset common to both echoes cancels
    off = rng.uniform(-np.pi, np.pi, (1, 1, 1, 4))
    z1 = z[..., None] * np.exp(1j * off)
    z2 = to_complex(mag, ph2)[..., None] * np.exp(1j * off)
    hc = hermitian_product(z1, z2, channel_axis=3)
    assert hc.shape == (8, 8, 8)
    assert np.abs(wrap_to_pi(np.angle(hc) - (ph2 - ph))).max() < 1e-4
    with pytest.raises(ValueError, match="shape"):
        to_complex(mag, ph[:4])
    with pytest.raises(ValueError, match="shape"):
        hermitian_product(z, z[:4])


def test_combine_echoes_complex_linear_phase():
    rng = np.random.default_rng(4)
    step = rng.uniform(-2.5, 2.5, (6, 6, 6)).astype(np.float32)  # phase per echo spacing
    phi0 = rng.uniform(-np.pi, np.pi, (6, 6, 6)).astype(np.float32)
    ph = wrap_to_pi(phi0[..., None] + step[..., None] * np.arange(1, 5, dtype=np.float32))
    mag = np.ones_like(ph)
    w, d = combine_echoes_complex(mag, ph)
    assert np.abs(wrap_to_pi(d - step)).max() < 1e-4
    np.testing.assert_allclose(w, 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        combine_echoes_complex(mag[..., :1], ph[..., :1])
