"""The third head anatomy: seeded deformation of a head phantom (fast, on a small geometric head) and the
Zubal head with grafted nuclei, deformed (data not in the repository: those tests skip without it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qsmprep.simulate import make_shapes_phantom
from qsmprep.simulate.deform import (
    MIN_JACOBIAN,
    deform_phantom,
    head_displacement_mm,
    jacobian_determinant,
    make_deformed_zubal_phantom,
    widen_csf,
)
from qsmprep.simulate.phantom import _NUCLEI, HEAD_TISSUES, _rot_zx, similarity_fit

#: the seven deep grey-matter nuclei (labels 1-7 of the head phantoms) by name
NUCLEI = {k: HEAD_TISSUES[k][0] for k in range(1, 8)}


def _necked_head(shape=(56, 56, 56)):
    """The shapes phantom with a soft-tissue neck from the head down through the bottom face (extend_faces)
    and a CSF shell inside the brain's edge, on a 1 mm grid."""
    ph = make_shapes_phantom(shape, seed=0)
    lab = np.array(ph.labels)
    chi, m0, r2 = np.array(ph.chi_ppm), np.array(ph.m0), np.array(ph.r2star_hz)
    n = np.array(shape)
    x, y = np.ogrid[: n[0], : n[1]]
    neck = ((x - n[0] / 2) ** 2 + (y - n[1] / 2) ** 2) <= (n[0] / 8) ** 2
    col = neck[:, :, None] & (np.arange(n[2]) < n[2] // 2)[None, None, :] & (lab == 0)
    lab[col], chi[col], m0[col], r2[col] = 15, 0.0, 0.5, 30.0
    return dataclasses.replace(ph, labels=lab, chi_ppm=chi, m0=m0, r2star_hz=r2, extend_faces=((2, 0),))


def test_jacobian_of_a_linear_map_and_the_displacement_is_seeded_and_fold_free():
    shape, vs = (30, 34, 28), (2.0, 2.0, 2.0)
    x = [(np.arange(s) * v)[tuple(slice(None) if i == a else None for i in range(3))] for a, (s, v) in
         enumerate(zip(shape, vs))]
    u = np.stack([np.broadcast_to((f - 1.0) * xi, shape) for f, xi in zip((0.9, 1.1, 1.2), x)], axis=-1)
    np.testing.assert_allclose(jacobian_determinant(u.astype(np.float32), vs), 0.9 * 1.1 * 1.2, rtol=1e-5)

    centre = np.array(shape) / 2.0
    a, sa = head_displacement_mm(shape, vs, centre, seed=4)
    b, _ = head_displacement_mm(shape, vs, centre, seed=4)
    c, _ = head_displacement_mm(shape, vs, centre, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.dtype == np.float32 and a.shape == shape + (3,)
    assert np.all(np.abs(sa - 1.0) <= 0.08)
    for u in (a, c):
        assert float(jacobian_determinant(u, vs).min()) > MIN_JACOBIAN * 0.9  # checked on a 2x grid
    # a strong field is shrunk until it does not fold
    s, _ = head_displacement_mm(shape, vs, centre, seed=4, amplitude_mm=40.0, corr_mm=8.0)
    assert float(jacobian_determinant(s, vs).min()) > 0.0


def test_widen_csf_grows_csf_into_tissue_only():
    ph = _necked_head()
    w = widen_csf(ph, 1.5)
    csf0, csf1 = int((ph.labels == 10).sum()), int((w.labels == 10).sum())
    assert csf1 > csf0
    changed = w.labels != ph.labels
    assert set(np.unique(ph.labels[changed]).tolist()) <= {8, 9}  # only tissue became CSF
    assert np.all(w.brain_mask[changed]) and np.all(w.chi_ppm[changed] == 0.0)
    assert widen_csf(ph, 0.0) is ph


def test_deform_phantom_is_seeded_keeps_the_neck_and_the_brain():
    ph = _necked_head()
    a = deform_phantom(ph, seed=1)
    b = deform_phantom(ph, seed=1)
    c = deform_phantom(ph, seed=2)
    np.testing.assert_array_equal(a.chi_ppm, b.chi_ppm)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.shape != c.shape or not np.array_equal(a.labels, c.labels)
    for d in (a, c):
        assert d.chi_ppm.dtype == np.float32 and d.m0.dtype == np.float32 and d.labels.dtype == np.int16
        assert d.extend_faces == ((2, 0),)  # the neck still leaves through the bottom face, nothing else
        # label volumes change by the scaling (0.92-1.08 per axis) and the local field, not more
        for lab in (8, 15):
            ratio = (d.labels == lab).sum() / (ph.labels == lab).sum()
            assert 0.6 < ratio < 1.6, (lab, ratio)
        # the brain mask is still brain: its labels are brain tissue/CSF/sources inside it
        inside = np.unique(d.labels[d.brain_mask])
        assert set(inside.tolist()) <= set(np.unique(ph.labels[ph.brain_mask]).tolist())
        assert 0.7 < d.brain_mask.sum() / ph.brain_mask.sum() < 1.4
        # the air margin is kept around the head (8 mm) on the faces it does not leave through
        assert np.all(d.labels[0] == 0) and np.all(d.labels[-1] == 0) and np.all(d.labels[:, :, -1] == 0)
        assert np.all(d.chi_ppm[0] == np.float32(ph.chi_ambient_ppm))
    with pytest.raises(ValueError):
        bad = dataclasses.replace(ph, affine=np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
        deform_phantom(bad, seed=1)


def test_similarity_fit_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(scale=20.0, size=(8, 3))
    rot = _rot_zx(12.0, -7.0)
    dst = 0.9 * src @ rot.T + np.array([140.0, 150.0, 95.0])
    s, r, t = similarity_fit(src, dst)
    assert s == pytest.approx(0.9, abs=1e-9)
    np.testing.assert_allclose(r, rot, atol=1e-9)
    np.testing.assert_allclose(t, [140.0, 150.0, 95.0], atol=1e-8)


def _mni_nucleus_volume_mm3(lab: int) -> float:
    """Both hemispheres' ellipsoid volume (mm^3) of a nucleus of the MNI head."""
    return 2.0 * sum(4.0 / 3.0 * np.pi * float(np.prod(r)) for la, _, r, _, _ in _NUCLEI if la == lab)


@pytest.mark.integration
def test_zubal_grafted_nuclei_are_present_plausible_and_inside_the_brain(zubal_dir):
    from qsmprep.simulate import make_zubal_phantom

    plain = make_zubal_phantom(zubal_dir, downsample=1, texture=False, seed=0)
    ph = make_zubal_phantom(zubal_dir, downsample=1, texture=False, seed=0, graft_nuclei=True)
    assert not np.isin(plain.labels, (4, 5, 6)).any()  # default off: the Zubal head as drawn
    for lab in (1, 2, 3, 7):  # landmark nuclei untouched
        np.testing.assert_array_equal(ph.labels == lab, plain.labels == lab)
    mid = np.argwhere(ph.brain_mask)[:, 0].mean()
    for lab in (4, 5, 6):
        m = ph.labels == lab
        assert ph.label_names[lab] == NUCLEI[lab]
        assert np.all(ph.brain_mask[m])
        # the landmark similarity scales the MNI nuclei by about 0.9 (volume about 0.75); host tissue only
        ratio = m.sum() / _mni_nucleus_volume_mm3(lab)
        assert 0.4 < ratio < 1.1, (lab, ratio)
        pts = np.argwhere(m)
        assert (pts[:, 0] < mid).sum() > 0.3 * len(pts) and (pts[:, 0] >= mid).sum() > 0.3 * len(pts)
        assert float(ph.chi_ppm[m].mean()) == pytest.approx(ph.label_chi_ppm[lab], abs=0.02)
    # the dentate lies below the thalamus and behind it, the midbrain nuclei below it
    zc = {lab: np.argwhere(ph.labels == lab).mean(axis=0) for lab in (4, 5, 6, 7)}
    assert zc[5][2] < zc[4][2] < zc[7][2] and zc[6][2] < zc[7][2] and zc[5][1] < zc[7][1] - 20


@pytest.mark.integration
def test_deformed_zubal_at_2mm_reports_all_nuclei(zubal_dir):
    a = make_deformed_zubal_phantom(zubal_dir, seed=301, downsample=2, lesions=True)
    assert a.extend_faces == ((2, 0),) and a.voxel_size_mm == (2.0, 2.0, 2.0)
    for lab, name in NUCLEI.items():
        m = (a.labels == lab) & a.brain_mask
        assert m.sum() >= 5, name
    assert {16, 17, 18, 19, 20, 21} <= set(np.unique(a.labels).tolist())
    b = make_deformed_zubal_phantom(zubal_dir, seed=302, downsample=2, texture=False)
    assert a.shape != b.shape or not np.array_equal(a.labels, b.labels)
