"""The Zubal head phantom (data not in the repository: tests skip without it) and the tissue texture."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from qsmprep.simulate import make_shapes_phantom, make_zubal_phantom, simulate_gre, texture_phantom
from qsmprep.simulate.phantom import AIR_PPM, HEAD_TISSUES, TEXTURE_CHI_SD_PPM, smooth_noise, zubal_data_dir

DGM = ("caudate", "putamen", "globus_pallidus", "thalamus")


# --------------------------------------------------------------------------------------------------
# texture (fast: the 48^3 shapes phantom)


def test_smooth_noise_is_seeded_unit_and_smooth():
    a = smooth_noise((40, 44, 36), (1.0, 1.0, 1.0), 4.0, np.random.default_rng(3))
    b = smooth_noise((40, 44, 36), (1.0, 1.0, 1.0), 4.0, np.random.default_rng(3))
    assert a.dtype == np.float32 and a.shape == (40, 44, 36)
    np.testing.assert_array_equal(a, b)
    assert abs(float(a.mean())) < 1e-5 and abs(float(a.std()) - 1.0) < 1e-4
    # neighbours 1 mm apart are strongly correlated (correlation length 4 mm), 20 mm apart hardly
    r1 = np.corrcoef(a[:-1].ravel(), a[1:].ravel())[0, 1]
    r20 = np.corrcoef(a[:-20].ravel(), a[20:].ravel())[0, 1]
    assert r1 > 0.9 and abs(r20) < 0.3


def test_texture_keeps_label_means_and_is_deterministic():
    ph = make_shapes_phantom((48, 48, 48), seed=0)
    tx = texture_phantom(ph, seed=5, chi_sd_ppm={8: 0.01, 15: 0.01, 10: 0.0})
    again = texture_phantom(ph, seed=5, chi_sd_ppm={8: 0.01, 15: 0.01, 10: 0.0})
    other = texture_phantom(ph, seed=6, chi_sd_ppm={8: 0.01, 15: 0.01, 10: 0.0})
    np.testing.assert_array_equal(tx.chi_ppm, again.chi_ppm)
    np.testing.assert_array_equal(tx.r2star_hz, again.r2star_hz)
    assert not np.array_equal(tx.chi_ppm, other.chi_ppm)
    assert tx.chi_ppm.dtype == np.float32 and tx.r2star_hz.dtype == np.float32 and tx.m0.dtype == np.float32
    np.testing.assert_array_equal(tx.labels, ph.labels)
    for lab in np.unique(ph.labels):
        m = ph.labels == lab
        for name in ("chi_ppm", "r2star_hz", "m0"):
            assert float(getattr(tx, name)[m].mean()) == pytest.approx(float(getattr(ph, name)[m].mean()), abs=2e-5)
    brain = ph.labels == 8
    sd = float((tx.chi_ppm - ph.chi_ppm)[brain].std())
    assert 0.006 < sd < 0.014  # about the requested 0.01 ppm
    # labels without an amplitude (CSF: 0, spheres: not listed) and air are untouched in chi
    for lab in (0, 10, 21, 14):
        m = ph.labels == lab
        np.testing.assert_array_equal(tx.chi_ppm[m], ph.chi_ppm[m])
    r2_rel = float(((tx.r2star_hz - ph.r2star_hz)[brain] / ph.r2star_hz[brain]).std())
    assert 0.03 < r2_rel < 0.07
    with pytest.raises(ValueError):
        texture_phantom(ph, corr_mm=0.0)


def test_texture_table_covers_the_head_tissues():
    assert set(HEAD_TISSUES) <= set(TEXTURE_CHI_SD_PPM) | {0}
    assert TEXTURE_CHI_SD_PPM[10] == 0.0  # CSF: the reference region stays uniform


def test_zubal_data_dir_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("QSMPREP_ZUBAL_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="QSMPREP_ZUBAL_DIR"):
        zubal_data_dir(None)
    with pytest.raises(FileNotFoundError, match="zubal_labels_1mm"):
        zubal_data_dir(tmp_path)
    monkeypatch.setenv("QSMPREP_ZUBAL_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        make_zubal_phantom()


# --------------------------------------------------------------------------------------------------
# Zubal head (needs the data; a few seconds per build)


def _centroid_mm(ph, mask):
    idx = np.argwhere(mask).mean(axis=0)
    return ph.affine[:3, :3] @ idx + ph.affine[:3, 3]


@pytest.mark.integration
def test_zubal_labels_values_and_orientation(zubal_phantom_2mm):
    ph = zubal_phantom_2mm
    assert ph.voxel_size_mm == (2.0, 2.0, 2.0)
    assert ph.chi_ppm.dtype == np.float32 and ph.labels.dtype == np.int16 and ph.brain_mask.dtype == bool
    assert ph.chi_ambient_ppm == AIR_PPM
    assert nib.aff2axcodes(ph.affine) == ("R", "A", "S")
    # same ids and names as the MNI head where the tissue exists; no RN, SN, dentate in the Zubal head
    for lab, name in ph.label_names.items():
        if lab in HEAD_TISSUES:
            assert HEAD_TISSUES[lab][0] == name
    names = set(ph.label_names.values())
    assert set(DGM) | {"grey_matter", "white_matter", "csf", "venous_blood", "bone", "fat", "muscle_skin",
                       "air_cavity", "eye", "bone_marrow"} <= names
    assert not names & {"red_nucleus", "substantia_nigra", "dentate_nucleus"}
    for lab in ph.label_names:
        assert (ph.labels == lab).any(), ph.label_names[lab]
    # DGM chi: nominal (the texture keeps label means; partial volume at 2 mm pulls towards WM/GM)
    for name in DGM:
        m = ph.label_mask(name)
        core = m & ph.brain_mask
        nominal = ph.label_chi_ppm[[k for k, v in ph.label_names.items() if v == name][0]]
        assert abs(float(np.median(ph.chi_ppm[core])) - nominal) < 0.35 * nominal + 0.01, name
        assert float(ph.chi_ppm[core].std()) > 0.003  # textured
    # brain mask: intracranial space + spinal canal; the Zubal head is large at 1 mm (~3.2 l)
    vol_ml = ph.brain_mask.sum() * 8.0 / 1000.0
    assert 2500 < vol_ml < 3600
    assert not (ph.brain_mask & np.isin(ph.labels, [0, 13, 14, 12])).any()
    # orientation: eyes anterior of the brain, spine/jaw below it, the head touches the bottom face only
    brain_c = _centroid_mm(ph, ph.brain_mask)
    assert _centroid_mm(ph, ph.label_mask("eye"))[1] > brain_c[1] + 50
    assert _centroid_mm(ph, ph.label_mask("bone_marrow"))[2] < brain_c[2] - 50
    assert ph.extend_faces == ((2, 0),)
    assert (ph.labels[:, :, 0] != 0).sum() > 2000
    # air and bone values
    assert np.median(ph.chi_ppm[ph.labels == 0]) == np.float32(AIR_PPM) and ph.chi_ppm[0, 0, -1] == np.float32(AIR_PPM)
    assert (ph.label_mask("air_cavity").sum() * 8.0 / 1000.0) > 50


@pytest.mark.integration
def test_zubal_1mm_native_values_and_determinism(zubal_dir):
    a = make_zubal_phantom(zubal_dir, seed=1, texture=False, n_random_veins=0)
    # untextured, no veins: every voxel of a label carries the nominal value of the tissue table
    for lab, (name, chi, m0, r2) in HEAD_TISSUES.items():
        m = a.labels == lab
        if m.any():
            np.testing.assert_allclose(a.chi_ppm[m], chi, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(a.r2star_hz[m], r2, atol=1e-5, err_msg=name)
    b = make_zubal_phantom(zubal_dir, seed=1, downsample=2, fov_mm=(200, 240, 200))
    c = make_zubal_phantom(zubal_dir, seed=1, downsample=2, fov_mm=(200, 240, 200))
    assert b.shape == (100, 120, 100)
    np.testing.assert_array_equal(b.chi_ppm, c.chi_ppm)
    np.testing.assert_array_equal(b.labels, c.labels)
    assert (2, 0) in b.extend_faces  # the neck continues below the field of view
    with pytest.raises(ValueError):
        make_zubal_phantom(zubal_dir, downsample=0)
    with pytest.raises(ValueError):
        make_zubal_phantom(zubal_dir, fov_mm=(64, 64, 64))


@pytest.mark.integration
def test_zubal_forward_field_is_finite_and_plausible(zubal_phantom_2mm):
    sim = simulate_gre(zubal_phantom_2mm, echo_times_s=(0.004, 0.012), snr=None, seed=0)
    m = sim.brain_mask
    assert np.all(np.isfinite(sim.total_field_ppm)) and np.all(np.isfinite(sim.phase_rad))
    local = sim.local_field_ppm[m]
    # local field of brain sources: a few 0.01 ppm; background (air/bone, after a 2nd-order shim): < a few ppm
    assert 0.005 < float(local.std()) < 0.1
    assert float(np.abs(local).max()) < 1.0
    bg = sim.background_field_ppm[m]
    assert 0.05 < float(np.percentile(np.abs(bg), 99)) < 5.0


# --------------------------------------------------------------------------------------------------
# qsmprep-simulate --anatomy zubal


def test_cli_zubal_without_data_and_bad_combinations(tmp_path, monkeypatch, capsys):
    from qsmprep.simulate.cli import main as cli_main

    monkeypatch.delenv("QSMPREP_ZUBAL_DIR", raising=False)
    assert cli_main([str(tmp_path / "a"), "--small", "--anatomy", "zubal", "--zubal-dir", str(tmp_path)]) == 66
    assert "zubal_labels_1mm" in capsys.readouterr().err
    assert cli_main([str(tmp_path / "b"), "--phantom", "shapes", "--anatomy", "zubal"]) == 64
    assert cli_main([str(tmp_path / "c"), "--phantom", "shapes", "--texture"]) == 64


@pytest.mark.integration
def test_cli_zubal_oblique_7t_dataset(zubal_dir, tmp_path, capsys):
    from qsmprep.simulate.cli import main as cli_main
    from qsmprep.qsm.geometry import b0_direction_from_affine, obliquity_deg

    out = tmp_path / "bids"
    rc = cli_main([str(out), "--anatomy", "zubal", "--zubal-dir", str(zubal_dir), "--voxel-size", "3",
                   "--echo-times", "4", "8", "--field-strength", "7", "--tilt-deg", "12", "--no-texture"])
    assert rc == 0
    assert "zubal" in capsys.readouterr().out
    anat = out / "sub-1" / "anat"
    img = nib.load(anat / "sub-1_echo-1_part-phase_MEGRE.nii.gz")
    assert obliquity_deg(b0_direction_from_affine(img.affine)) == pytest.approx(12.0, abs=1e-3)
    truth = out / "derivatives/qsmprep-simulate/sub-1/anat"
    names = (truth / "sub-1_dseg.tsv").read_text()
    assert "\tglobus_pallidus\t" in names and "red_nucleus" not in names
    chi = np.asarray(nib.load(truth / "sub-1_Chimap.nii.gz").dataobj)
    assert chi.shape == img.shape and np.isfinite(chi).all()


@pytest.mark.integration
def test_mni_head_texture_is_optional_and_keeps_nucleus_means(head_phantom_2mm):
    from qsmprep.simulate import make_head_phantom

    tx = make_head_phantom(downsample=2, seed=0, texture=True)
    plain = head_phantom_2mm
    np.testing.assert_array_equal(tx.labels, plain.labels)
    assert not np.array_equal(tx.chi_ppm, plain.chi_ppm)
    for name in DGM + ("red_nucleus", "substantia_nigra", "dentate_nucleus", "white_matter", "grey_matter"):
        m = plain.label_mask(name)
        # texture on the final grid: the label means are kept
        assert float(tx.chi_ppm[m].mean()) == pytest.approx(float(plain.chi_ppm[m].mean()), abs=1e-5), name
        assert float((tx.chi_ppm - plain.chi_ppm)[m].std()) > 0.002, name
