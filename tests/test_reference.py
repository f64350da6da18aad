"""Susceptibility referencing: whole-brain mean, CSF (given or from R2*), none."""

import numpy as np
import pytest
from helpers import centred_grid_mm, ellipsoid

from qsmprep.qsm import reference as ref
from qsmprep.qsm.registry import REFERENCE

SHAPE = (48, 52, 44)


@pytest.fixture(scope="module")
def head():
    """Brain ellipsoid with two central 'ventricles' (one with a horn running outwards), a third, smaller
    central low-R2* blob, and peripheral 'sulcal' CSF far from the centre; tissue R2* 20 Hz, CSF 2 Hz."""
    g = centred_grid_mm(SHAPE)
    brain = ellipsoid(g, (0, 0, 0), (22, 24, 20))
    vent_l = ellipsoid(g, (-5, 0, 0), (3, 9, 4))
    vent_r = ellipsoid(g, (5, 0, 0), (3, 9, 4))
    horn = (np.abs(g[0] + 5) <= 1.5) & (np.abs(g[2]) <= 1.5) & (g[1] >= 0) & (g[1] <= 20)  # reaches 20 mm
    small = ellipsoid(g, (0, -14, 6), (1.5, 1.5, 1.5))  # third largest central component
    sulcus = ellipsoid(g, (0, 0, 17), (6, 6, 1.5))  # separate components 15-21 mm from the centre
    far = ellipsoid(g, (17, -12, 0), (2, 2, 2))
    csf_true = (vent_l | vent_r | horn) & brain
    r2s = np.full(SHAPE, 20.0, np.float32)
    r2s[csf_true | small | sulcus | far] = 2.0
    r2s[~brain] = 0.0  # outside the brain: no signal (low R2*), must be ignored
    return brain, r2s, csf_true, small, sulcus, far


def test_registry():
    assert {"mean", "csf", "none"} <= set(REFERENCE.names())


def test_mean_reference():
    rng = np.random.default_rng(0)
    chi = rng.normal(0.3, 0.05, SHAPE).astype(np.float32)
    m = ellipsoid(centred_grid_mm(SHAPE), (0, 0, 0), (20, 22, 18))
    out = REFERENCE.get("mean")(chi, m)
    assert out.dtype == np.float32
    assert abs(float(out[m].mean())) < 1e-6
    assert np.all(out[~m] == 0)
    diff = (chi - out)[m]
    np.testing.assert_allclose(diff, chi[m].mean(), atol=1e-6)


def test_none_reference_is_identity():
    chi = np.random.default_rng(1).normal(0.1, 0.05, SHAPE).astype(np.float64)
    out = REFERENCE.get("none")(chi, np.ones(SHAPE, bool))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, chi.astype(np.float32))
    assert out is not chi


def test_csf_reference_with_given_mask(head):
    brain, _, csf_true, *_ = head
    rng = np.random.default_rng(2)
    chi = rng.normal(0.02, 0.01, SHAPE).astype(np.float32)
    chi[csf_true] = 0.07 + rng.normal(0, 0.002, int(csf_true.sum()))
    out = ref.reference_csf(chi, brain, csf_mask=csf_true)
    assert abs(float(out[csf_true].mean())) < 1e-6
    np.testing.assert_allclose((chi - out)[brain], chi[csf_true].mean(), atol=1e-6)
    assert np.all(out[~brain] == 0)


def test_csf_mask_from_r2star_follows_extract_csf(head):
    brain, r2s, csf_true, small, sulcus, far = head
    csf = ref.csf_mask_from_r2star(r2s, brain, (1, 1, 1), threshold_hz=5.0, radius_mm=30.0)
    assert csf.dtype == bool
    # the two largest central components only (not the 3rd-5th, nor the no-signal outside)
    assert np.array_equal(csf, csf_true)
    assert not np.any(csf & (small | sulcus | far))
    # allowing five central components brings in the smaller ones
    csf5 = ref.csf_mask_from_r2star(r2s, brain, (1, 1, 1), n_central=5)
    assert np.array_equal(csf5, csf_true | small | sulcus | far)
    # a 12 mm sphere: components outside it are dropped, but the horn (up to 20 mm) stays because it
    # belongs to a whole-mask component that touches the centre
    csf12 = ref.csf_mask_from_r2star(r2s, brain, (1, 1, 1), radius_mm=12.0, n_central=5)
    assert np.array_equal(csf12, csf_true)


def test_csf_mask_uses_physical_radius(head):
    """Voxels 3 mm wide along x (same array) triple the physical x distances: the ventricles, 2 voxels
    from the centre, then lie 6 mm away and a 4 mm centre sphere misses them."""
    brain, r2s, csf_true, *_ = head
    csf_iso = ref.csf_mask_from_r2star(r2s, brain, (1, 1, 1), radius_mm=4.0)
    assert np.array_equal(csf_iso, csf_true)
    with pytest.raises(ValueError, match="no voxel"):
        ref.csf_mask_from_r2star(r2s, brain, (3.0, 1, 1), radius_mm=4.0)


def test_csf_mask_erosion_removes_peripheral_csf(head):
    brain, r2s, csf_true, *_ = head
    csf = ref.csf_mask_from_r2star(r2s, brain, (1, 1, 1), erode_mm=5.0)
    assert csf.sum() < csf_true.sum()  # horn tip near the brain edge removed
    assert np.all(csf <= csf_true)


def test_csf_reference_from_r2star(head):
    brain, r2s, csf_true, *_ = head
    chi = np.full(SHAPE, 0.05, np.float32)
    chi[csf_true] = 0.08
    out = REFERENCE.get("csf")(chi, brain, r2star_hz=r2s, voxel_size_mm=(1, 1, 1))
    assert abs(float(out[csf_true].mean())) < 1e-6
    assert np.allclose(out[brain & ~csf_true], -0.03, atol=1e-6)


def test_reference_errors(head):
    brain, r2s, csf_true, *_ = head
    chi = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="shape"):
        ref.reference_mean(chi, brain[:-1])
    with pytest.raises(ValueError, match="empty"):
        ref.reference_mean(chi, np.zeros(SHAPE, bool))
    bad = chi.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ref.reference_mean(bad, brain)
    with pytest.raises(ValueError, match="csf_mask or r2star_hz"):
        ref.reference_csf(chi, brain)
    tiny = np.zeros(SHAPE, bool)
    tiny[24, 26, 22] = True
    with pytest.raises(ValueError, match="fewer than"):
        ref.reference_csf(chi, brain, csf_mask=tiny)
    with pytest.raises(ValueError, match="shape"):
        ref.reference_csf(chi, brain, csf_mask=csf_true[:, :-1])
    with pytest.raises(ValueError, match="no voxel"):
        ref.csf_mask_from_r2star(np.full(SHAPE, 20.0, np.float32), brain)
    bad_r2 = r2s.copy()
    bad_r2[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ref.csf_mask_from_r2star(bad_r2, brain)
    with pytest.raises(ValueError, match="threshold_hz"):
        ref.csf_mask_from_r2star(r2s, brain, threshold_hz=-1)
    with pytest.raises(ValueError, match="voxel_size"):
        ref.csf_mask_from_r2star(r2s, brain, (1, 1))
    with pytest.raises(ValueError, match="empty"):
        ref.csf_mask_from_r2star(r2s, brain, erode_mm=40.0)
