"""Dipole kernel, B0 direction from affines and the forward model against analytic fields."""

import numpy as np
import pytest
from helpers import partial_volume_sphere

from qsmprep.qsm import fft as qfft
from qsmprep.qsm.geometry import (
    b0_direction_from_affine,
    dipole_kernel,
    forward_field_ppm,
    obliquity_deg,
    rotation_matrix,
    smv_kernel,
    voxel_size_from_affine,
)


@pytest.mark.parametrize(
    "b0_dir",
    [np.array([0.0, 0.0, 1.0]), rotation_matrix([1.0, 0.3, 0.0], 20.0) @ np.array([0.0, 0.0, 1.0])],
    ids=["axial", "oblique20"],
)
def test_sphere_field_matches_closed_form(b0_dir):
    """Outside a uniform sphere the field is that of a point dipole: a^3 dchi/3 (3cos^2 - 1)/r^3."""
    n, a, dchi = 80, 8.0, 0.5
    chi, (x, y, z) = partial_volume_sphere(n, a)
    field = forward_field_ppm(chi * dchi, (1.0, 1.0, 1.0), b0_dir, pad_voxels=40)
    r = np.sqrt(x**2 + y**2 + z**2)
    cos = (x * b0_dir[0] + y * b0_dir[1] + z * b0_dir[2]) / np.maximum(r, 1e-6)
    analytic = dchi * a**3 / 3.0 * (3 * cos**2 - 1) / np.maximum(r, 1e-6) ** 3
    outside = (r > 1.5 * a) & (r < n / 2 - 2)
    rel_err = np.linalg.norm(field[outside] - analytic[outside]) / np.linalg.norm(analytic[outside])
    assert rel_err < 0.05
    # Lorentz-corrected: the field inside a uniform sphere is zero.
    assert np.abs(field[r < a - 2]).max() < 0.05 * dchi


def test_anisotropic_voxels_use_physical_k():
    """A sphere sampled with 1x1x2 mm voxels gives the same far field as with isotropic voxels."""
    n = 64
    c = np.arange(n) - n // 2
    x, y, z = np.meshgrid(c * 1.0, c * 1.0, c * 2.0, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    chi = (r <= 9.0).astype(np.float32)
    field = forward_field_ppm(chi, (1.0, 1.0, 2.0), (0, 0, 1), pad_voxels=32)
    vol = chi.sum() * 2.0  # mm^3
    cos = z / np.maximum(r, 1e-6)
    analytic = vol / (4 * np.pi) * (3 * cos**2 - 1) / np.maximum(r, 1e-6) ** 3
    outside = (r > 15) & (r < 30)
    rel_err = np.linalg.norm(field[outside] - analytic[outside]) / np.linalg.norm(analytic[outside])
    assert rel_err < 0.08


def test_dipole_kernel_properties():
    d = dipole_kernel((16, 20, 24), (1.0, 1.0, 1.0), (0, 0, 1))
    assert d.dtype == np.float32 and d.shape == (16, 20, 13)
    assert d[0, 0, 0] == 0.0
    assert np.isclose(d[0, 0, 1], -2.0 / 3.0) and np.isclose(d[1, 0, 0], 1.0 / 3.0)
    assert d.min() >= -2.0 / 3.0 - 1e-6 and d.max() <= 1.0 / 3.0 + 1e-6
    full = dipole_kernel((16, 20, 24), (1.0, 1.0, 1.0), (0, 0, 1), real=False)
    assert full.shape == (16, 20, 24)
    np.testing.assert_allclose(full[:, :, :13], d)


def test_smv_kernel_is_normalised_sphere():
    s = smv_kernel((32, 32, 32), (1.0, 1.0, 1.0), 4.0)
    assert np.isclose(s[0, 0, 0], 1.0, atol=1e-5)
    assert s.shape == (32, 32, 17)
    with pytest.raises(ValueError, match="radius"):
        smv_kernel((8, 8, 8), (1, 1, 1), 0.0)


def test_b0_direction_from_oblique_affine():
    rot = rotation_matrix([1, 0, 0], 20.0)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.75, 0.75, 1.5])
    b = b0_direction_from_affine(affine)
    np.testing.assert_allclose(np.linalg.norm(b), 1.0)
    np.testing.assert_allclose(b, rot.T @ [0, 0, 1], atol=1e-12)
    assert np.isclose(obliquity_deg(b), 20.0)
    np.testing.assert_allclose(voxel_size_from_affine(affine), [0.75, 0.75, 1.5])
    assert obliquity_deg(b0_direction_from_affine(np.diag([2.0, 2.0, 2.0, 1.0]))) == 0.0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unit vector"):
        dipole_kernel((8, 8, 8), (1, 1, 1), (0, 0, 2))
    with pytest.raises(ValueError, match="voxel_size_mm"):
        dipole_kernel((8, 8, 8), (1, -1, 1), (0, 0, 1))
    chi = np.zeros((8, 8, 8), np.float32)
    chi[2, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        forward_field_ppm(chi)
    with pytest.raises(ValueError, match="3D"):
        forward_field_ppm(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="4x4"):
        b0_direction_from_affine(np.eye(3))


def test_fast_shape_and_padding_round_trip():
    shape = qfft.fast_shape((97, 101, 45), 10)
    assert all(s >= n + 20 for s, n in zip(shape, (97, 101, 45))) and shape[-1] % 2 == 0
    x = np.random.default_rng(0).standard_normal((97, 101, 45)).astype(np.float32)
    xp, crop = qfft.pad_volume(x, shape)
    np.testing.assert_array_equal(xp[crop], x)
    np.testing.assert_allclose(qfft.irfftn(qfft.rfftn(xp), shape)[crop], x, atol=1e-5)


@pytest.mark.parametrize("tilt_deg", [0.0, 20.0])
@pytest.mark.parametrize("voxel_size", [(1.0, 1.0, 1.0), (0.75, 0.75, 1.5)])
def test_forward_model_agrees_with_qsm_forward(tilt_deg, voxel_size):
    """Cross-check against the independent simulator of the qsm-forward package."""
    qsm_forward = pytest.importorskip("qsm_forward")
    rng = np.random.default_rng(0)
    n = 48
    c = np.arange(n) - n // 2
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    chi = np.zeros((n, n, n), np.float32)
    for _ in range(6):
        p, r = rng.uniform(-12, 12, 3), rng.uniform(2, 5)
        chi += rng.uniform(-0.2, 0.2) * (((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) < r * r)
    mask = (x**2 / 400 + y**2 / 400 + z**2 / 300) < 1
    b0_dir = rotation_matrix([1, 0, 0], tilt_deg) @ np.array([0.0, 0.0, 1.0])
    ours = forward_field_ppm(chi, voxel_size, b0_dir, pad_voxels=n // 2)[mask]
    theirs = qsm_forward.generate_field(chi.astype(float), voxel_size=list(voxel_size), B0_dir=list(b0_dir))[mask]
    ours, theirs = ours - ours.mean(), theirs - theirs.mean()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 0.02
