"""Background field removal (V-SHARP, SHARP, PDF, iSMV, LBV) on a synthetic brain with known local field.

Test case (64^3, 1 mm): an ellipsoidal "brain" mask (semi-axes 22, 18, 16 mm) holding five spheres of
+-0.1 ppm; outside it an air sphere (+9.4 ppm) and an air slab over the bottom 5 slices. The total
field is ``forward_field_ppm`` of everything, the true local field that of the inside spheres only
(both with 32 voxels of zero padding). Inside the mask the background is about 11x the local field.

Measured NRMSE (demeaned, on each method's own output mask; on the mask eroded by 6 mm) when the
bounds were set: vsharp 0.39 / 0.21, sharp 0.19 / 0.19, pdf 0.45 / 0.085, ismv 0.125 / 0.059,
lbv 0.23 / 0.056; PDF with B0 tilted 30 deg: 0.445. Bounds below leave about 15-40 % margin. The
error on the own mask is 1.4-4.5 % of the input's deviation from the truth (background/local ~ 9-11).
"""

import numpy as np
import pytest
from helpers import centred_grid_mm
from scipy import ndimage as ndi

from qsmprep.qsm import bgremove as bg
from qsmprep.qsm import fft as qfft
from qsmprep.qsm import metrics
from qsmprep.qsm.geometry import forward_field_ppm, rotation_matrix, smv_kernel
from qsmprep.qsm.registry import BGREMOVE

N = 64
METHODS = ["vsharp", "sharp", "pdf", "ismv", "lbv"]
OBLIQUE_B0 = rotation_matrix([1.0, 0.5, 0.0], 30.0) @ np.array([0.0, 0.0, 1.0])


def _grid(n=N, vs=(1.0, 1.0, 1.0), nz=None):
    return centred_grid_mm((n, n, n if nz is None else nz), vs)


def _make_case(b0_dir=(0.0, 0.0, 1.0), vs=(1.0, 1.0, 1.0), nz=None):
    """(total_ppm, local_ppm, background_ppm, mask) of the synthetic brain described above."""
    x, y, z = _grid(vs=vs, nz=nz)
    mask = (x / 22) ** 2 + (y / 18) ** 2 + (z / 16) ** 2 <= 1
    chi_in = np.zeros(mask.shape, np.float32)
    for cx, cy, cz, r, v in [
        (-8, -5, 0, 4, 0.1),
        (8, 4, -3, 5, -0.1),
        (0, 8, 6, 3, 0.1),
        (-3, -8, -7, 3, -0.1),
        (12, -4, 5, 3, 0.1),
    ]:
        chi_in[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r * r] = v
    chi_in *= mask
    chi_out = np.zeros_like(chi_in)
    chi_out[x**2 + (y - 25) ** 2 + (z + 20) ** 2 <= 7**2] = 9.4  # air sphere below-front
    chi_out[:, :, : int(round(5 / vs[2]))] = 9.4  # air slab
    chi_out[mask] = 0.0
    pad = [int(32 / v) for v in vs]
    total = forward_field_ppm(chi_in + chi_out, vs, b0_dir, pad_voxels=pad)
    local = forward_field_ppm(chi_in, vs, b0_dir, pad_voxels=pad)
    return total, local, total - local, mask


def _demeaned(a, m):
    v = a[m].astype(np.float64)
    return v - v.mean()


def nrmse(est, truth, m):
    """Demeaned NRMSE of ``est`` against ``truth`` inside ``m``, as a fraction (not %)."""
    return metrics.nrmse(est, truth, m) / 100.0


@pytest.fixture(scope="module")
def case():
    return _make_case()


@pytest.fixture(scope="module")
def results(case):
    total, _, _, mask = case
    return {name: BGREMOVE.get(name)(total, mask) for name in METHODS}


@pytest.fixture(scope="module")
def deep_mask(case):
    """The brain mask eroded by a 6 mm ball: a region where every method should do well."""
    mask = case[3]
    x, y, z = _grid(13)
    ball = x**2 + y**2 + z**2 <= 36
    return ndi.binary_erosion(mask, ball)


# measured: own mask / deep mask -> bounds
BOUNDS = {
    "vsharp": (0.45, 0.26),
    "sharp": (0.25, 0.25),
    "pdf": (0.52, 0.12),
    "ismv": (0.18, 0.09),
    "lbv": (0.30, 0.08),
}


def test_registry_lists_all_methods():
    for name in METHODS:
        assert name in BGREMOVE
        assert BGREMOVE.get(name) is getattr(bg, name)


@pytest.mark.parametrize("name", METHODS)
def test_local_field_accuracy(name, case, results, deep_mask):
    total, local, _, mask = case
    fl, mo = results[name]
    assert fl.dtype == np.float32 and fl.shape == mask.shape
    assert mo.dtype == bool and mo.shape == mask.shape
    assert not np.any(mo & ~mask), "output mask must lie inside the input mask"
    assert np.all(fl[~mo] == 0), "field outside the output mask must be 0"
    own, deep = BOUNDS[name]
    assert nrmse(fl, local, mo) < own
    assert nrmse(fl, local, mo & deep_mask) < deep
    # the input is dominated by the background; the output error is far below it
    assert nrmse(total, local, mo) > 4.0
    assert nrmse(fl, local, mo) < 0.1 * nrmse(total, local, mo)


@pytest.mark.parametrize(
    "name,max_leak", [("vsharp", 2e-3), ("sharp", 3e-3), ("pdf", 0.03), ("ismv", 1e-3), ("lbv", 2e-3)]
)
def test_background_only_is_removed(name, case, max_leak):
    """A field from outside sources only is suppressed by a large factor (measured leak: vsharp 2e-4,
    sharp 6e-4, pdf 0.019 (30 CGLS iterations at most), ismv < 1e-4, lbv 3e-4)."""
    _, _, background, mask = case
    fl, mo = BGREMOVE.get(name)(background, mask)
    leak = np.linalg.norm(_demeaned(fl, mo)) / np.linalg.norm(_demeaned(background, mo))
    assert leak < max_leak


@pytest.mark.parametrize("name", ["vsharp", "sharp", "ismv", "lbv"])
def test_harmonic_polynomial_removed_exactly(name, case):
    """Linear and quadratic harmonic fields obey the mean-value property and the discrete Laplace
    equation exactly on an isotropic grid, so SMV and LBV methods remove them to rounding error."""
    mask = case[3]
    x, y, z = _grid()
    f = (0.3 + 0.02 * x - 0.01 * y + 0.015 * z + 1e-3 * (x**2 - y**2) + 2e-3 * x * z).astype(np.float32)
    fl, mo = BGREMOVE.get(name)(f, mask)
    assert np.abs(fl[mo]).max() < 1e-5 * np.abs(f[mask]).max()  # measured <= 4e-7


def test_output_masks(case, results):
    mask = case[3]

    def ball(r):
        x, y, z = _grid(2 * int(r) + 3)
        return x**2 + y**2 + z**2 <= r * r

    assert np.array_equal(results["vsharp"][1], ndi.binary_erosion(mask, ball(2.0)))  # smallest radius 2 mm
    assert np.array_equal(results["sharp"][1], ndi.binary_erosion(mask, ball(6.0)))
    assert np.array_equal(results["ismv"][1], ndi.binary_erosion(mask, ball(2.0)))
    assert np.array_equal(results["pdf"][1], mask)
    assert np.array_equal(results["lbv"][1], ndi.binary_erosion(mask, iterations=2))  # peel = 2
    _, m0 = bg.lbv(case[0], mask, peel=0)
    assert np.array_equal(m0, mask)


@pytest.mark.parametrize("vs,r", [((1.0, 1.0, 1.0), 3.0), ((1.0, 1.0, 2.0), 4.0), ((0.8, 1.0, 1.3), 3.3)])
def test_smv_erosion_matches_binary_erosion(vs, r):
    """Mask erosion by the SMV threshold equals binary erosion with the same ball (in mm)."""
    rng = np.random.default_rng(1)
    mask = ndi.binary_opening(rng.random((40, 36, 30)) < 0.8, iterations=1)
    mask = ndi.binary_closing(mask, iterations=2)
    mask[[0, -1]] = mask[:, [0, -1]] = mask[:, :, [0, -1]] = False
    half = np.ceil(r / np.asarray(vs)).astype(int)
    axes = [np.arange(-h, h + 1) * v for h, v in zip(half, vs)]
    gx, gy, gz = np.meshgrid(*axes, indexing="ij")
    ball = (gx**2 + gy**2 + gz**2).astype(np.float32) <= np.float32(r) ** 2
    shape = tuple(n + 2 * h + 2 for n, h in zip(mask.shape, half))
    mp, crop = qfft.pad_volume(mask, shape)
    eroded = bg._erode(qfft.rfftn(mp.astype(np.float32)), smv_kernel(shape, vs, r), shape, np.asarray(vs), r)
    assert np.array_equal(eroded[crop], ndi.binary_erosion(mask, ball))


def test_sharp_equals_single_radius_vsharp(case):
    total, _, _, mask = case
    a, ma = bg.sharp(total, mask, radius_mm=4.0)
    b, mb = bg.vsharp(total, mask, radii_mm=[4.0])
    assert np.array_equal(ma, mb)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_vsharp_radii_order_and_defaults(case):
    total, _, _, mask = case
    a, _ = bg.vsharp(total, mask, radii_mm=[2, 6, 4])
    b, _ = bg.vsharp(total, mask, radii_mm=[6, 4, 2])
    np.testing.assert_array_equal(a, b)
    assert bg.default_vsharp_radii_mm((1, 1, 1)) == [float(r) for r in range(12, 1, -1)]
    assert bg.default_vsharp_radii_mm((1, 1, 2)) == [12.0, 10.0, 8.0, 6.0, 4.0]
    assert bg.default_vsharp_radii_mm((7, 7, 7)) == [14.0]


@pytest.mark.parametrize("name", METHODS)
def test_linear_in_the_field(name, case, results):
    total, _, _, mask = case
    fl2, mo2 = BGREMOVE.get(name)(2.0 * total, mask)
    fl, mo = results[name]
    assert np.array_equal(mo, mo2)
    scale = np.abs(fl).max()
    np.testing.assert_allclose(fl2, 2.0 * fl, atol=2e-3 * scale)


def test_pdf_oblique_b0():
    """PDF with B0 tilted 30 deg off the z axis, kernel in the voxel frame (measured NRMSE 0.445)."""
    total, local, _, mask = _make_case(b0_dir=OBLIQUE_B0)
    fl, mo = bg.pdf(total, mask, b0_dir=OBLIQUE_B0)
    assert nrmse(fl, local, mo) < 0.52
    fl_axial, _ = bg.pdf(total, mask, b0_dir=(0.0, 0.0, 1.0))
    assert not np.allclose(fl, fl_axial, atol=1e-4), "b0_dir must enter the dipole kernel"


def test_anisotropic_voxels():
    """1 x 1 x 2 mm voxels: same geometry, radii in mm (measured NRMSE vsharp 0.36, ismv 0.165)."""
    total, local, _, mask = _make_case(vs=(1.0, 1.0, 2.0), nz=32)
    fl, mo = bg.vsharp(total, mask, (1.0, 1.0, 2.0))
    assert nrmse(fl, local, mo) < 0.42
    fl, mo = bg.ismv(total, mask, (1.0, 1.0, 2.0))
    assert nrmse(fl, local, mo) < 0.21


def test_pdf_weights(case, results):
    total, local, _, mask = case
    # weights are normalised: a constant weight gives the default result
    fl5, _ = bg.pdf(total, mask, weight=np.full(mask.shape, 5.0, np.float32))
    np.testing.assert_allclose(fl5, results["pdf"][0], atol=1e-4)
    # a magnitude-like weight still gives a sensible local field
    x, _, _ = _grid()
    w = (1.0 + 0.5 * np.tanh(x / 10.0)).astype(np.float32)
    flw, mo = bg.pdf(total, mask, weight=w)
    assert nrmse(flw, local, mo) < 0.6  # measured 0.50
    with pytest.raises(ValueError, match="non-negative"):
        bg.pdf(total, mask, weight=-np.ones(mask.shape))
    with pytest.raises(ValueError, match="weight has shape"):
        bg.pdf(total, mask, weight=np.ones((4, 4, 4)))
    with pytest.raises(ValueError, match="zero everywhere"):
        bg.pdf(total, mask, weight=np.zeros(mask.shape))


# --------------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_common_validation(name, case):
    total, _, _, mask = case
    func = BGREMOVE.get(name)
    with pytest.raises(ValueError, match="shape"):
        func(total, mask[:-1])
    with pytest.raises(ValueError, match="empty"):
        func(total, np.zeros_like(mask))
    bad = total.copy()
    bad[10, 10, 10] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        func(bad, mask)
    with pytest.raises(ValueError, match="unit vector"):
        func(total, mask, b0_dir=(0.0, 0.0, 2.0))
    with pytest.raises(ValueError, match="voxel_size_mm"):
        func(total, mask, voxel_size_mm=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="3D"):
        func(total[..., None], mask)


def test_bad_radii_and_parameters(case):
    total, _, _, mask = case
    for kwargs in ({"radii_mm": [6, -2]}, {"radii_mm": [0.5]}, {"radii_mm": []}, {"radii_mm": [np.nan]}):
        with pytest.raises(ValueError, match="radii_mm"):
            bg.vsharp(total, mask, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        bg.vsharp(total, mask, radii_mm=[40.0])  # fits nowhere in the mask
    with pytest.raises(ValueError, match="radius_mm"):
        bg.sharp(total, mask, radius_mm=0.0)
    with pytest.raises(ValueError, match="smaller than the largest voxel size"):
        bg.sharp(total, mask, voxel_size_mm=(1.0, 1.0, 2.0), radius_mm=1.5)
    with pytest.raises(ValueError, match="empty"):
        bg.sharp(total, mask, radius_mm=30.0)
    with pytest.raises(ValueError, match="radius_mm"):
        bg.ismv(total, mask, radius_mm=-3)
    with pytest.raises(ValueError, match="empty"):
        bg.ismv(total, mask, radius_mm=30.0)
    with pytest.raises(ValueError, match="threshold"):
        bg.vsharp(total, mask, threshold=1.5)
    with pytest.raises(ValueError, match="tol"):
        bg.pdf(total, mask, tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        bg.pdf(total, mask, max_iter=2.5)
    with pytest.raises(ValueError, match="pad_voxels"):
        bg.pdf(total, mask, pad_voxels=-1)
    with pytest.raises(ValueError, match="peel"):
        bg.lbv(total, mask, peel=-1)
    with pytest.raises(ValueError, match="interior"):
        bg.lbv(total, mask, peel=30)


# --------------------------------------------------------------------------------------------------
# PDF with the harmonic part of the local field restored by a susceptibility prior
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trend_case():
    """The synthetic brain plus a linear chi trend across the mask (0.1 ppm from side to side): its field
    is harmonic inside the mask, so PDF cannot tell it from the background and removes it."""
    x, y, z = _grid()
    mask = (x / 22) ** 2 + (y / 18) ** 2 + (z / 16) ** 2 <= 1
    total, local, bg_field, _ = _make_case()
    trend = np.where(mask, 0.05 * (x + 0.6 * z) / 22, 0).astype(np.float32)
    chi_in = np.zeros(mask.shape, np.float32)  # the blobs of _make_case, recovered from its local field
    for cx, cy, cz, r, v in [(-8, -5, 0, 4, 0.1), (8, 4, -3, 5, -0.1), (0, 8, 6, 3, 0.1), (-3, -8, -7, 3, -0.1),
                             (12, -4, 5, 3, 0.1)]:
        chi_in[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r * r] = v
    chi = (chi_in * mask + trend).astype(np.float32)
    local = forward_field_ppm(chi, pad_voxels=32)
    return bg_field + local, local, chi, mask


@pytest.mark.integration
def test_pdf_harmonic_restored_recovers_what_pdf_loses(trend_case):
    total, local, chi, mask = trend_case
    plain, m0 = bg.pdf(total, mask)
    zero, m1 = bg.pdf_harmonic_restored(total, mask, n_outer=0)
    np.testing.assert_array_equal(zero, plain)
    assert np.array_equal(m0, mask) and np.array_equal(m1, mask)
    calls = []

    def oracle(field, m):
        calls.append(field.dtype)
        return chi

    converged = {"max_iter": 100, "tol": 1e-6}
    restored, m2 = bg.pdf_harmonic_restored(total, mask, invert=oracle, n_outer=2, **converged)
    assert calls == [np.float32, np.float32] and restored.dtype == np.float32 and np.array_equal(m2, mask)
    assert np.all(restored[~mask] == 0)
    e_pdf, e_rest = nrmse(plain, local, mask), nrmse(restored, local, mask)
    # measured: PDF 0.66 (the trend's field is lost); restored with the true chi 0.026, what remains being
    # PDF's leak of the background and the field of the FFT box's periodic copies of chi (0.025 from the
    # local field alone)
    assert e_pdf > 0.5 and e_rest < 0.05, (e_pdf, e_rest)
    only_local = bg.pdf_harmonic_restored(local, mask, invert=oracle, n_outer=1, **converged)[0]
    assert nrmse(only_local, local, mask) < 0.04


def test_pdf_harmonic_restored_is_linear_with_a_linear_prior(trend_case):
    from qsmprep.qsm.inversion import tkd

    total, _, _, mask = trend_case

    def invert(field, m):
        return tkd(field, m)

    one = bg.pdf_harmonic_restored(total, mask, invert=invert, n_outer=2)[0]
    two = bg.pdf_harmonic_restored(2 * total, mask, invert=invert, n_outer=2)[0]
    np.testing.assert_allclose(two, 2 * one, rtol=1e-3, atol=1e-4 * np.abs(one).max())
    with pytest.raises(ValueError, match="invert"):
        bg.pdf_harmonic_restored(total, mask, n_outer=1)
    with pytest.raises(ValueError, match="n_outer"):
        bg.pdf_harmonic_restored(total, mask, invert=invert, n_outer=-1)


def test_pdf_harmonic_restored_drops_the_rim(trend_case):
    from qsmprep.qsm.masking import erode_mask_mm

    total, _, _, mask = trend_case
    local, m = bg.pdf_harmonic_restored(total, mask, n_outer=0, rim_mm=2.0)
    np.testing.assert_array_equal(m, erode_mask_mm(mask, (1, 1, 1), 2.0))
    assert np.all(local[~m] == 0) and m.sum() < mask.sum()
    with pytest.raises(ValueError, match="rim_mm"):
        bg.pdf_harmonic_restored(total, mask, n_outer=0, rim_mm=-1.0)
    with pytest.raises(ValueError, match="erodes the whole mask"):
        bg.pdf_harmonic_restored(total, mask, n_outer=0, rim_mm=40.0)
