"""Thresholds, morphology and brain masks on synthetic heads (brain, dark skull, bright scalp, air)."""

import numpy as np
import pytest
from helpers import TWO_PI, dice, unit_grid

from qsmprep.qsm import masking as mk
from qsmprep.qsm.registry import MASKING

TE = (0.004, 0.008, 0.012, 0.016)


def _head(shape=(64, 64, 56), snr=40.0, seed=0):
    """Brain (with a noisy 'vein' blob and dark sulci), 3-voxel dark skull, bright scalp, noisy air."""
    rng = np.random.default_rng(seed)
    x, y, z = unit_grid(shape)
    r_brain = np.sqrt((x / 0.6) ** 2 + (y / 0.66) ** 2 + (z / 0.68) ** 2)
    brain = r_brain < 1
    r_head = np.sqrt((x / 0.84) ** 2 + (y / 0.9) ** 2 + (z / 0.9) ** 2)
    skull_outer = np.sqrt((x / 0.72) ** 2 + (y / 0.78) ** 2 + (z / 0.79) ** 2) < 1
    scalp = (r_head < 1) & ~skull_outer
    vein = (x - 0.2) ** 2 + (y + 0.15) ** 2 + z**2 < 0.09**2  # inside the brain
    m0 = np.zeros(shape, np.float32)
    m0[brain] = 1.0
    m0[scalp] = 1.2
    m0[vein] = 0.15
    f_hz = 40.0 * x + 25.0 * y * z + 15.0 * np.sin(3 * y)
    phi0 = 0.8 * x - 0.5 * z
    te = np.asarray(TE)
    sig = 1.0 / snr
    mag = np.empty(shape + (te.size,), np.float32)
    ph = np.empty_like(mag)
    for e, t in enumerate(te):
        s = m0 * np.exp(-25 * t) * np.exp(1j * (phi0 + TWO_PI * f_hz * t))
        s = s + sig * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
        mag[..., e] = np.abs(s)
        ph[..., e] = np.angle(s)
    return dict(mag=mag, phase=ph, brain=brain, scalp=scalp, head=r_head < 1, vein=vein)


@pytest.fixture(scope="module")
def head():
    return _head()


# --------------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------------


def test_otsu_bimodal():
    rng = np.random.default_rng(0)
    lo = rng.normal(10, 2, 60_000)
    hi = rng.normal(50, 5, 20_000)
    v = np.concatenate([lo, hi]).astype(np.float32)
    t = mk.otsu_threshold(v)
    assert 16 < t < 40
    labels = np.r_[np.zeros(lo.size, bool), np.ones(hi.size, bool)]
    assert np.mean((v > t) == labels) > 0.999
    v_nan = np.r_[v, np.nan, np.inf]
    assert mk.otsu_threshold(v_nan) == pytest.approx(t)
    # brute force: between-class variance on the raw values is maximal within one bin of t
    cands = np.linspace(v.min(), v.max(), 2001)[1:-1]
    vv = np.sort(v.astype(np.float64))
    k = np.searchsorted(vv, cands, side="right")
    c1 = np.cumsum(vv)
    w0, w1 = k / vv.size, 1 - k / vv.size
    mu0 = c1[k - 1] / k
    mu1 = (c1[-1] - c1[k - 1]) / (vv.size - k)
    best = cands[np.argmax(w0 * w1 * (mu0 - mu1) ** 2)]
    assert abs(best - t) <= (v.max() - v.min()) / 256


def test_otsu_matches_skimage():
    skf = pytest.importorskip("skimage.filters", reason="optional cross-check with scikit-image")
    v = np.random.default_rng(2).gamma(2.0, 3.0, 50_000).astype(np.float32)
    assert mk.otsu_threshold(v) == pytest.approx(float(skf.threshold_otsu(v)), rel=1e-4)


def test_threshold_errors_and_modes():
    with pytest.raises(ValueError, match="equal"):
        mk.otsu_threshold(np.ones(100))
    with pytest.raises(ValueError, match="empty"):
        mk.otsu_threshold(np.array([]))
    with pytest.raises(ValueError, match="finite"):
        mk.otsu_threshold(np.array([np.nan, np.nan]))
    img = np.zeros((10, 10, 10), np.float32)
    img[2:8, 2:8, 2:8] = 100.0
    img += np.random.default_rng(1).uniform(0, 5, img.shape).astype(np.float32)
    assert np.array_equal(mk.threshold_mask(img), img > 50)
    assert np.array_equal(mk.threshold_mask(img, threshold=3), img > 3)  # integer: absolute
    lo, hi = img.min(), img.max()
    assert np.array_equal(mk.threshold_mask(img, threshold=0.5), img > lo + 0.5 * (hi - lo))
    assert np.array_equal(mk.threshold_mask(img, factor=2.0, threshold=3), img > 6)
    g = mk.threshold_mask(img, algorithm="gaussian")
    assert dice(g, img > 50) > 0.95
    with pytest.raises(ValueError, match="neither an integer"):
        mk.threshold_mask(img, threshold=1.5)
    with pytest.raises(ValueError, match="unknown threshold algorithm"):
        mk.threshold_mask(img, algorithm="li")
    with pytest.raises(ValueError, match="factor"):
        mk.threshold_mask(img, factor=0)


# --------------------------------------------------------------------------------------------------
# morphology
# --------------------------------------------------------------------------------------------------


def _block(n=12, lo=2, hi=10):
    m = np.zeros((n, n, n), bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def test_fill_small_holes():
    m = _block()
    m[5, 5, 5] = False  # 26 neighbours set
    m[2, 5, 5] = False  # face voxel: 17 neighbours set
    out = mk.fill_small_holes(m)
    assert out[5, 5, 5] and not out[2, 5, 5]
    assert np.count_nonzero(out & ~m) == 1
    m2 = _block()
    m2[5, 5, 5] = m2[5, 5, 6] = False  # each has 25 of 26
    assert mk.fill_small_holes(m2)[5, 5, 5] and not mk.fill_small_holes(m2, min_neighbours=26)[5, 5, 5]


def test_fill_holes_with_size_limit():
    m = _block(20, 1, 19)
    m[4:10, 4:10, 4:10] = False  # 216-voxel cavity
    m[14, 14, 14] = False  # 1-voxel cavity
    m[0:3, 9, 9] = False  # channel open to the array border: not a hole
    full = mk.fill_holes(m)
    assert full[4:10, 4:10, 4:10].all() and full[14, 14, 14] and not full[1, 9, 9]
    lim = mk.fill_holes(m, max_hole_size=10)
    assert not lim[6, 6, 6] and lim[14, 14, 14]


def test_erode_dilate_largest_component():
    m = _block()
    e1 = mk.erode_mask(m, 1)
    assert np.array_equal(e1, _block(12, 3, 9))
    assert np.array_equal(mk.erode_mask(m, 0), m)
    assert np.count_nonzero(mk.erode_mask(m, 4)) == 0
    d1 = mk.dilate_mask(e1, 1, connectivity=3)
    assert np.array_equal(d1, m)
    with pytest.raises(ValueError, match=">= 0"):
        mk.erode_mask(m, -1)
    two = np.zeros((20, 20, 20), bool)
    two[1:5, 1:5, 1:5] = True
    two[8:18, 8:18, 8:18] = True
    lc = mk.largest_component(two)
    assert lc.sum() == 1000 and not lc[2, 2, 2]
    with pytest.raises(ValueError, match="empty"):
        mk.largest_component(np.zeros((5, 5, 5), bool))
    diag = np.zeros((5, 5, 5), bool)
    diag[1, 1, 1] = diag[2, 2, 2] = True  # 26-connected only
    assert mk.largest_component(diag).sum() == 2
    assert mk.largest_component(diag, connectivity=1).sum() == 1


def test_gaussian_fill_closes_gaps():
    x, y, z = unit_grid((48, 48, 48))
    ball = x**2 + y**2 + z**2 < 0.6**2
    sulci = ball & (np.abs(x - 0.1) < 0.03)  # a 1-voxel slit through the ball
    out = mk.gaussian_fill(ball & ~sulci)
    deep = x**2 + y**2 + z**2 < 0.5**2
    assert out[sulci & deep].all()  # the slit is closed away from the surface
    assert np.all(out[ball & ~sulci])  # filling never removes voxels
    assert np.count_nonzero(out & ~mk.dilate_mask(ball, 2)) == 0


def test_robust_mask(head):
    rss = np.sqrt(np.sum(head["mag"] ** 2, axis=3))
    m = mk.robust_mask(rss)
    bright = head["brain"] | head["scalp"]
    assert dice(m, bright | mk.fill_holes(bright)) > 0.8  # skull gap partly filled by smoothing
    assert np.count_nonzero(m & ~mk.dilate_mask(head["head"], 2)) == 0  # no air
    with pytest.raises(ValueError, match="3D"):
        mk.robust_mask(head["mag"])


# --------------------------------------------------------------------------------------------------
# brain masks
# --------------------------------------------------------------------------------------------------


def test_phase_quality_mask(head):
    h = head
    filled, unfilled = mk.phase_quality_mask(h["phase"], h["mag"], TE, return_unfilled=True)
    b = h["brain"]
    assert filled.dtype == bool and filled.shape == b.shape
    assert np.count_nonzero(filled & h["scalp"]) == 0  # scalp separated by the dark skull
    assert np.count_nonzero(filled & ~h["head"]) == 0  # no air
    assert np.count_nonzero(filled & ~b) == 0  # no skull (3 erosions)
    # boundary voxels have low quality (noisy neighbours) and 3 erosions follow: the brain eroded by
    # 4 voxels must be entirely inside
    assert np.mean(filled[mk.erode_mask(b, 4)]) > 0.999
    assert filled[h["vein"]].all()  # pass 1 is filled
    assert np.mean(unfilled[h["vein"]]) < 0.2  # pass 2 excludes the unreliable region
    assert np.count_nonzero(unfilled & ~filled) == 0
    no_erosion = mk.phase_quality_mask(h["phase"], h["mag"], TE, erosions=(0, 0))
    assert dice(no_erosion, b) > 0.93
    assert np.count_nonzero(no_erosion & ~mk.dilate_mask(b, 1)) == 0
    only = mk.phase_quality_mask(h["phase"], h["mag"], TE)
    assert np.array_equal(only, filled)
    # single echo (no second echo for the gradient coherence) still gives a good mask
    single = mk.phase_quality_mask(h["phase"][..., 0], h["mag"][..., 0], erosions=0)
    assert dice(single, b) > 0.9 and np.count_nonzero(single & h["scalp"]) == 0
    # QSMxT behaviour without the largest-component step: the filling swallows the skull
    # (QSMxT's 2 erosions: with our default 3 both masks lose the skull)
    no_lc = mk.phase_quality_mask(h["phase"], h["mag"], TE, keep_largest=False, erosions=(2, 0))
    two = mk.phase_quality_mask(h["phase"], h["mag"], TE, erosions=(2, 0))
    assert np.count_nonzero(no_lc & ~b) > np.count_nonzero(two & ~b)


def test_phase_quality_mask_errors(head):
    h = head
    with pytest.raises(ValueError, match="shape"):
        mk.phase_quality_mask(h["phase"], h["mag"][..., :2], TE)
    with pytest.raises(ValueError, match="echo times"):
        mk.phase_quality_mask(h["phase"], h["mag"], TE[:2])
    bad = h["phase"].copy()
    bad[3, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mk.phase_quality_mask(bad, h["mag"], TE)
    with pytest.raises(ValueError, match="factor"):
        mk.phase_quality_mask(h["phase"], h["mag"], TE, factor=(1.5, -1))
    with pytest.raises(ValueError, match="empty"):
        mk.phase_quality_mask(h["phase"], h["mag"], TE, threshold=1000)


def test_magnitude_mask(head):
    h = head
    m = mk.magnitude_mask(h["mag"])
    assert np.count_nonzero(m & h["scalp"]) == 0 and np.count_nonzero(m & ~h["brain"]) == 0
    assert np.mean(m[mk.erode_mask(h["brain"], 3)]) > 0.999
    assert dice(mk.magnitude_mask(h["mag"], erosions=0), h["brain"]) > 0.93
    assert m[h["vein"]].all()  # dark vein filled
    m1 = mk.magnitude_mask(h["mag"][..., 0], erosions=0)
    assert np.count_nonzero(m1) > np.count_nonzero(m)
    with pytest.raises(ValueError, match="non-negative"):
        mk.magnitude_mask(-h["mag"])
    with pytest.raises(ValueError, match="empty"):
        mk.magnitude_mask(h["mag"], threshold=10**6)


def test_masking_registry(head):
    h = head
    assert {"phase", "magnitude", "robust"} <= set(MASKING.names())
    m = MASKING.get("phase")(h["phase"], h["mag"], TE, (1.0, 1.0, 1.0))
    assert np.array_equal(m, mk.phase_quality_mask(h["phase"], h["mag"], TE, erosions=(3, 0)))
    assert MASKING.get("magnitude")(magnitude_4d=h["mag"]).dtype == bool
    assert MASKING.get("robust")(magnitude_4d=h["mag"]).any()
    with pytest.raises(ValueError, match="needs phase"):
        MASKING.get("phase")(magnitude_4d=h["mag"])


def test_erode_mask_mm_is_a_physical_ball():
    from qsmprep.qsm.masking import erode_mask, erode_mask_mm

    m = np.zeros((24, 24, 24), bool)
    m[4:-4, 4:-4, 4:-4] = True
    # a ball of one voxel's radius is the 6-neighbour cross
    np.testing.assert_array_equal(erode_mask_mm(m, (2.0, 2.0, 2.0), 2.0), erode_mask(m, 1))
    np.testing.assert_array_equal(erode_mask_mm(m, (1.0, 1.0, 1.0), 2.0), erode_mask(m, 2))
    # anisotropic: 2 mm is 2 voxels in-plane and 1 through-plane (1 mm x 1 mm x 2 mm)
    e = erode_mask_mm(m, (1.0, 1.0, 2.0), 2.0)
    assert e[6:-6, 6:-6, 5:-5].all() and not e[5].any() and not e[:, :, 4].any()
    np.testing.assert_array_equal(erode_mask_mm(m, (1.0, 1.0, 1.0), 0.0), m)
    np.testing.assert_array_equal(erode_mask_mm(m, (1.0, 1.0, 1.0), 0.5), m)
    # the array border counts as outside
    assert not erode_mask_mm(np.ones((5, 5, 5), bool), (1, 1, 1), 1.0)[0].any()
    with pytest.raises(ValueError, match="radius_mm"):
        erode_mask_mm(m, (1, 1, 1), -1.0)
