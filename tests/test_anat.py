"""Anatomical and template spaces, the fast set: ANTs <-> nibabel geometry, rigid registration on a small
head, transform inversion, offline TemplateFlow lookup (and its one-line error), output spaces and atlases,
T1w / sMRIPrep / FreeSurfer discovery, label erosion, the simulated anatomy and the output names.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from anat_helpers import no_network

pytest.importorskip("ants")



@pytest.fixture()
def tf_env(tf_home, monkeypatch):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tf_home))
    return tf_home


def _rot(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def test_ants_geometry_round_trip_keeps_world_coordinates():
    from qsmprep.anat.registration import to_ants, to_nibabel

    aff = np.eye(4)
    aff[:3, :3] = _rot((1, 0.3, 0.2), 17) @ np.diag([1.5, 2.0, 2.5])
    aff[:3, 3] = (-40.0, 12.0, 7.0)
    data = np.random.default_rng(0).random((7, 8, 9)).astype(np.float32)
    a = to_ants(nib.Nifti1Image(data, aff))
    back = to_nibabel(a)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)
    # ANTs physical points are LPS: voxel (2, 3, 4) -> RAS world of the affine with x, y negated
    pt = np.asarray(a.origin) + np.asarray(a.direction) @ (np.asarray(a.spacing) * np.array([2, 3, 4]))
    ras = aff @ np.array([2, 3, 4, 1.0])
    np.testing.assert_allclose(pt, ras[:3] * np.array([-1, -1, 1]), atol=1e-4)


@pytest.fixture(scope="module")
def small_head():
    """The head phantom at 3 mm and a T1w-like image of it (a rigid-registration test object)."""
    from qsmprep.simulate import make_head_phantom
    from qsmprep.simulate.anatomy import t1w_from_phantom

    ph = make_head_phantom(downsample=3, seed=0)
    return ph, t1w_from_phantom(ph, seed=0, noise=0.01)


def test_rigid_recovers_a_known_rotation_and_its_inverse(small_head, tmp_path):
    """GRE-like magnitude (M0 decay) on a grid rotated by 9 deg and shifted 6 mm against the T1w: the rigid
    transform maps T1w points to GRE points within 1 mm over the brain, and labels round-trip."""
    from qsmprep.anat import registration as reg

    ph, t1w = small_head
    fixed = nib.Nifti1Image(t1w, ph.affine)
    rot = np.eye(4)
    rot[:3, :3] = _rot((1, 0.4, 0.1), 9.0)
    centre = ph.affine @ np.r_[(np.array(ph.shape) - 1) / 2.0, 1]
    shift = np.eye(4)
    shift[:3, 3] = centre[:3]
    move = np.eye(4)
    move[:3, 3] = (3.0, -4.0, 3.5)
    gre_affine = move @ shift @ rot @ np.linalg.inv(shift) @ ph.affine
    mag = (np.asarray(ph.m0) * np.exp(-np.asarray(ph.r2star_hz) * 0.01)).astype(np.float32)
    moving = nib.Nifti1Image(mag, gre_affine)
    r = reg.rigid(fixed, moving, tmp_path / "from-GRE_to-T1w_mode-image_xfm.txt", num_threads=2)
    assert Path(r.forward[0]).read_text().startswith("#Insight Transform File")
    # the true map of T1w world points to GRE world points: p_gre = gre_affine @ inv(ph.affine) @ p_t1w
    import ants

    tx = ants.read_transform(r.forward[0])
    truth = gre_affine @ np.linalg.inv(ph.affine)
    brain = np.argwhere(np.asarray(ph.brain_mask))[::50]
    errs = []
    for v in brain:
        p = ph.affine @ np.r_[v, 1.0]
        lps = p[:3] * np.array([-1, -1, 1])
        q = np.asarray(tx.apply_to_point(tuple(lps))) * np.array([-1, -1, 1])
        errs.append(np.linalg.norm(q - (truth @ p)[:3]))
    assert np.max(errs) < 1.0, f"rigid error up to {np.max(errs):.2f} mm"
    # labels on the GRE grid -> T1w grid through the transform: the phantom's own labels (nearest)
    labels = nib.Nifti1Image(np.asarray(ph.labels, np.int16), gre_affine)
    back = np.asarray(reg.apply(labels, fixed, r.forward, interpolation="genericLabel").dataobj)
    agree = (back == np.asarray(ph.labels))[np.asarray(ph.brain_mask)].mean()
    assert agree > 0.9, agree
    # the inverse (text transform inverted for ANTs) brings T1w-grid labels onto the GRE grid
    fwd = np.asarray(reg.apply(nib.Nifti1Image(np.asarray(ph.labels, np.int16), ph.affine), moving, r.forward,
                               invert=[True], interpolation="genericLabel").dataobj)
    assert (fwd == np.asarray(ph.labels))[np.asarray(ph.brain_mask)].mean() > 0.9


def test_spaces_and_atlases_parse_like_fmriprep():
    from qsmprep.anat.templates import Space, parse_atlas, parse_space, parse_spaces

    assert parse_space("T1w") == Space("T1w")
    assert parse_space("MNI152NLin6Asym:res-2") == Space("MNI152NLin6Asym", 2)
    assert parse_space("MNI152NLin2009cAsym").entities == "space-MNI152NLin2009cAsym_res-1"
    assert parse_spaces(["GRE", "T1w", "T1w", "MNI152NLin6Asym:res-2"]) == [Space("T1w"), Space("MNI152NLin6Asym", 2)]
    for bad in ("MNI152", "T1w:res-2", "MNI152NLin6Asym:res-3", "fsaverage"):
        with pytest.raises(ValueError):
            parse_space(bad)
    assert parse_atlas("MNI152NLin6Asym:HOCPA:desc-th25:res-2") == ("MNI152NLin6Asym", "HOCPA", "th25", 2)
    with pytest.raises(ValueError):
        parse_atlas("MNI152NLin6Asym:HOCPA:thr25")


def test_templates_are_found_offline_through_templateflow(tf_env):
    from qsmprep.anat.templates import Space, atlas_files, template_files

    with no_network():
        files = template_files(Space("MNI152NLin6Asym", 2))
        img, tsv = atlas_files("MNI152NLin6Asym", 2, "HOCPA", "th25")
    assert files["T1w"].name == "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz" and files["T1w"].stat().st_size > 1e6
    assert files["mask"].name == "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz"
    assert nib.load(files["T1w"]).shape == (91, 109, 91)
    assert img.name.endswith("_atlas-HOCPA_desc-th25_dseg.nii.gz") and tsv is None
    with no_network(), pytest.raises(RuntimeError, match="network access"):
        import socket

        socket.create_connection(("example.org", 80), timeout=1)


@pytest.mark.parametrize("argv", [
    ["--output-spaces", "MNI152NLin2009cAsym"],
    ["--output-spaces", "T1w", "MNI152NLin2009cAsym:res-2"],
    ["--atlas", "MNI152NLin2009cAsym:HOCPA:desc-th25:res-2"],
])
def test_missing_template_stops_before_any_work_with_one_line(argv, tf_env, tmp_path, capsys, shapes_bids):
    """MNI152NLin2009cAsym (fMRIPrep's default) is not in the offline folder (and nothing else is filed under its
    name): exit 66, one line naming the template and the ``templateflow.api.get`` command that fetches it,
    nothing written (no output, no work directory), no network."""
    from qsmprep.cli.run import main

    bids, _, _ = shapes_bids()
    out, work = tmp_path / "out", tmp_path / "work"
    assert not (tf_env / "tpl-MNI152NLin2009cAsym").exists()
    with no_network():
        rc = main([str(bids), str(out), "participant", "-w", str(work), "--skip-bids-validation", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 66
    assert len(err) == 1 and "MNI152NLin2009cAsym" in err[0], err
    assert 'python -c "from templateflow.api import get; get(\'MNI152NLin2009cAsym\'' in err[0], err
    assert not out.exists() and not work.exists()


def test_atlas_needs_its_template_files_before_any_work(tf_home, tmp_path, capsys, shapes_bids, monkeypatch):
    """An atlas whose template is in no output space is still registered to that template: a missing template
    T1w stops the run at the checks (exit 66, one line with the fetch command), not when the workflow is built."""
    import shutil

    from qsmprep.cli.run import main

    home = tmp_path / "tf"
    shutil.copytree(tf_home, home)
    (home / "tpl-MNI152NLin6Asym" / "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz").unlink()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    bids, _, _ = shapes_bids()
    out = tmp_path / "out"
    with no_network():
        rc = main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"), "--skip-bids-validation",
                   "--output-spaces", "T1w", "--atlas", "MNI152NLin6Asym:HOCPA:desc-th25:res-2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 66 and len(err) == 1, err
    assert "--atlas: template MNI152NLin6Asym (res-2" in err[0] and "get('MNI152NLin6Asym', resolution=2" in err[0], err
    assert not out.exists()


def test_unknown_output_space_is_a_usage_error(tmp_path, shapes_bids):
    from qsmprep.cli.run import main

    out = tmp_path / "out"
    rc = main([str(shapes_bids()[0]), str(out), "participant", "--skip-bids-validation", "--output-spaces", "MNI152"])
    assert rc == 64 and not out.exists()


def _run(**kw):
    base = dict(subject="01", session=None, acquisition=None, run=None)
    base.update(kw)
    return SimpleNamespace(**base)


def _touch(path: Path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_t1w_discovery_prefers_session_and_matching_entities(tmp_path):
    from qsmprep.anat.inputs import find_t1w

    a = tmp_path / "sub-01" / "anat"
    _touch(a / "sub-01_acq-mprage_T1w.nii.gz")
    _touch(a / "sub-01_acq-qsm_run-2_T1w.nii.gz")
    _touch(a / "sub-01_acq-qsm_run-1_T1w.nii.gz")
    _touch(a / "sub-01_acq-qsm_run-1_T2w.nii.gz")
    path, why = find_t1w(tmp_path, _run(acquisition="qsm", run="1"))
    assert path.name == "sub-01_acq-qsm_run-1_T1w.nii.gz" and "3 candidates" in why
    path, _ = find_t1w(tmp_path, _run())
    assert path.name == "sub-01_acq-mprage_T1w.nii.gz"
    s = tmp_path / "sub-01" / "ses-2" / "anat"
    _touch(s / "sub-01_ses-2_T1w.nii.gz")
    assert find_t1w(tmp_path, _run(session="2", acquisition="qsm", run="1"))[0].name == "sub-01_ses-2_T1w.nii.gz"
    assert find_t1w(tmp_path, _run(subject="02"))[0] is None


def test_smriprep_and_freesurfer_layouts_are_recognised(tmp_path):
    from qsmprep.anat.inputs import FREESURFER_ASEG_LUT, collect_anat, find_freesurfer, read_freesurfer_lut

    d = tmp_path / "smriprep" / "sub-01" / "anat"
    for n in ("sub-01_desc-preproc_T1w.nii.gz", "sub-01_desc-brain_mask.nii.gz", "sub-01_desc-aseg_dseg.nii.gz",
              "sub-01_dseg.nii.gz", "sub-01_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.h5",
              "sub-01_from-MNI152NLin6Asym_to-T1w_mode-image_xfm.h5",
              "sub-01_space-MNI152NLin6Asym_res-2_desc-preproc_T1w.nii.gz"):
        _touch(d / n)
    anat = collect_anat(None, [tmp_path / "smriprep"], _run())
    assert anat.t1w.name == "sub-01_desc-preproc_T1w.nii.gz" and anat.t1w_mask.name == "sub-01_desc-brain_mask.nii.gz"
    fwd, inv = anat.xfms["MNI152NLin6Asym"]
    assert fwd.name.startswith("sub-01_from-T1w_to-MNI") and inv.name.startswith("sub-01_from-MNI152NLin6Asym_to-T1w")
    assert set(anat.segmentations) == {"aseg", "dseg"}
    assert anat.segmentations["aseg"][1][11] == "Left-Caudate" and anat.segmentations["dseg"][1][2] == "WM"
    # FreeSurfer SUBJECTS_DIR with a colour table: names from the table
    fs = tmp_path / "fs"
    _touch(fs / "sub-01" / "mri" / "aseg.mgz")
    (fs / "FreeSurferColorLUT.txt").write_text("# comment\n0   Unknown  0 0 0 0\n12  Left-Putamen  236 13 176 0\n")
    aseg, names, prov = find_freesurfer(fs, "01")
    assert aseg.name == "aseg.mgz" and names == {0: "Unknown", 12: "Left-Putamen"} and "FreeSurferColorLUT" in prov
    assert read_freesurfer_lut(fs / "FreeSurferColorLUT.txt")[12] == "Left-Putamen"
    assert FREESURFER_ASEG_LUT[49] == "Right-Thalamus" and FREESURFER_ASEG_LUT[52] == "Right-Pallidum"


def test_erode_labels_drops_region_borders():
    from qsmprep.qsm.roi import erode_labels

    lab = np.zeros((12, 12, 12), np.int16)
    lab[2:10, 2:10, 2:10] = 3
    lab[2:10, 2:10, 6:10] = 5
    e = erode_labels(lab, 1)
    # 8 x 8 x 4 blocks: one voxel off every face (the shared face too) -> 6 x 6 x 2
    assert (e == 3).sum() == 6 * 6 * 2 and (e == 5).sum() == 6 * 6 * 2
    assert np.array_equal(erode_labels(lab, 0), lab)
    assert not erode_labels(lab, 2).any()  # 4 voxels thick: nothing survives two steps


def test_deformation_is_smooth_known_and_keeps_labels():
    from qsmprep.simulate.anatomy import smooth_displacement

    u = smooth_displacement((40, 44, 38), (2.0, 2.0, 2.0), seed=3, amplitude_mm=4.0, scale=1.0)
    assert 3.5 < np.abs(u).max() <= 4.0 + 1e-5
    # smooth: neighbouring voxels differ by far less than a voxel (Jacobian close to identity)
    assert np.abs(np.diff(u, axis=0)).max() < 0.5
    np.testing.assert_array_equal(u, smooth_displacement((40, 44, 38), (2.0, 2.0, 2.0), seed=3, amplitude_mm=4.0,
                                                         scale=1.0))


def test_output_names_of_spaces_and_transforms():
    from qsmprep.outputs import bidsignore_text, output

    run = SimpleNamespace(subject="1", session=None, prefix=lambda: "sub-1_run-2")
    assert output("chimap_space").path("/o", run, space="space-MNI152NLin6Asym_res-2").name == \
        "sub-1_run-2_space-MNI152NLin6Asym_res-2_Chimap.nii.gz"
    assert output("xfm_t1w_template").path("/o", run, template="MNI152NLin6Asym").name == \
        "sub-1_run-2_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.h5"
    assert output("xfm_gre_t1w").path("/o", run).name == "sub-1_run-2_from-GRE_to-T1w_mode-image_xfm.txt"
    assert output("roi_stats_seg").path("/o", run, seg="aseg").name == "sub-1_run-2_seg-aseg_desc-roi_stats.tsv"
    text = bidsignore_text()
    assert "*_from-T1w_to-*_mode-image_xfm.*" in text and "space-" not in text
    assert os.sep not in output("chimap_space").doc_stem


def test_group_maps_in_template_space(tmp_path):
    """Three series with space-<template> Chimaps and masks: group/<space>_desc-{mean,sd}_Chimap and desc-n_mask
    hold the voxel-wise mean, sample SD and count; group.html shows the template-space section; the ROI table
    is long over segmentations (seg-<name> tables)."""
    from qsmprep.reports.group import run_group

    rng = np.random.default_rng(0)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    chis, masks = [], []
    for i, sub in enumerate(("01", "02", "03")):
        anat = tmp_path / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), np.eye(4)), anat / f"sub-{sub}_Chimap.nii.gz")
        chi = rng.normal(0.02 * i, 0.05, (10, 12, 9)).astype(np.float32)
        mask = np.zeros((10, 12, 9), np.uint8)
        mask[1 + i:9, 2:11, 1:8] = 1
        chis.append(chi * mask)
        masks.append(mask)
        nib.save(nib.Nifti1Image(chi * mask, aff), anat / f"sub-{sub}_space-MNI152NLin6Asym_res-2_Chimap.nii.gz")
        nib.save(nib.Nifti1Image(mask, aff), anat / f"sub-{sub}_space-MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz")
        (anat / f"sub-{sub}_seg-aseg_desc-roi_stats.tsv").write_text(
            "label\tname\tn_voxels\tmean_ppm\tmedian_ppm\tstd_ppm\n11\tLeft-Caudate\t50\t0.05\t0.05\t0.01\n")
    paths = run_group(tmp_path)
    g = tmp_path / "group"
    mean = np.asarray(nib.load(g / "space-MNI152NLin6Asym_res-2_desc-mean_Chimap.nii.gz").dataobj)
    sd = np.asarray(nib.load(g / "space-MNI152NLin6Asym_res-2_desc-sd_Chimap.nii.gz").dataobj)
    n = np.asarray(nib.load(g / "space-MNI152NLin6Asym_res-2_desc-n_mask.nii.gz").dataobj)
    m = np.stack(masks).astype(bool)
    c = np.stack(chis)
    np.testing.assert_array_equal(n, m.sum(0))
    all3 = m.all(0)
    np.testing.assert_allclose(mean[all3], c[:, all3].mean(0), atol=1e-6)
    np.testing.assert_allclose(sd[all3], c[:, all3].std(0, ddof=1), atol=1e-6)
    one = m.sum(0) == 1
    assert one.any() and np.all(sd[one] == 0) and np.allclose(mean[one], c.sum(0)[one], atol=1e-6)
    assert np.all(mean[n == 0] == 0)
    html = (tmp_path / "group.html").read_text()
    assert 'id="maps"' in html and "space-MNI152NLin6Asym_res-2" in html
    assert paths["mean_space-MNI152NLin6Asym_res-2"].is_file()
    roi = (tmp_path / "group_roi.tsv").read_text().splitlines()
    assert roi[0].split("\t")[4] == "segmentation" and all("\taseg\t11\tLeft-Caudate" in r for r in roi[1:])
    assert len(roi) == 4


def _dataset_with_t1w(shapes_bids, tmp_path, with_aseg=False):
    import shutil

    from qsmprep.simulate.anatomy import write_t1w
    from qsmprep.utils.bids import collect_runs

    src, _, sim = shapes_bids()
    bids = tmp_path / "bids"
    shutil.copytree(src, bids)
    write_t1w(bids, "01", np.asarray(sim.magnitude[..., 0]), sim.affine)
    deriv = None
    if with_aseg:
        deriv = tmp_path / "fs"
        (deriv / "sub-01" / "mri").mkdir(parents=True)
        nib.save(nib.MGHImage(np.asarray(sim.labels, np.int32), sim.affine), deriv / "sub-01" / "mri" / "aseg.mgz")
    return bids, list(collect_runs(bids)), deriv


def _nodes(wf):
    return {n.fullname.split(".")[-1] for n in wf._get_all_nodes()}


def test_output_spaces_without_a_template_skip_the_nonlinear_step(shapes_bids, tmp_path, tf_env):
    """T1w only: rigid + resampling, no SyN node and no template transform sinks; with a template the SyN node
    and its transform sinks appear; an aseg in --derivatives adds its region table. Building writes nothing."""
    from qsmprep.config import QsmprepConfig
    from qsmprep.workflows.base import init_single_subject_wf

    bids, runs, deriv = _dataset_with_t1w(shapes_bids, tmp_path, with_aseg=True)
    out = tmp_path / "out"
    cfg = QsmprepConfig(bids_dir=bids, output_dir=out, output_spaces=["T1w"])
    names = _nodes(init_single_subject_wf("01", runs, cfg))
    assert {"gre_to_t1w", "chi_to_T1w", "mask_to_T1w", "ds_xfm_gre_t1w", "ds_chimap_space_T1w"} <= names
    assert not any(n.startswith("t1w_to_") or n == "t1w_brain" for n in names), sorted(names)
    cfg = QsmprepConfig(bids_dir=bids, output_dir=out, output_spaces=["T1w", "MNI152NLin6Asym:res-2"],
                        derivatives=[deriv], atlas=["MNI152NLin6Asym:HOCPA:desc-th25:res-2"]).validate()
    names = _nodes(init_single_subject_wf("01", runs, cfg))
    assert {"t1w_brain", "t1w_to_MNI152NLin6Asym", "ds_xfm_t1w_template_MNI152NLin6Asym",
            "ds_xfm_template_t1w_MNI152NLin6Asym", "chi_to_MNI152NLin6Asymres2", "roi_aseg", "roi_HOCPAth25",
            "ds_roi_aseg", "ds_roi_HOCPAth25"} <= names, sorted(names)
    assert not out.exists()
    # no T1w for the subject: a warning and the native outputs only
    cfg = QsmprepConfig(bids_dir=shapes_bids()[0], output_dir=out, output_spaces=["T1w"])
    assert not any("t1w" in n for n in _nodes(init_single_subject_wf("01", list(collect_runs_of(shapes_bids)), cfg)))


def collect_runs_of(shapes_bids):
    from qsmprep.utils.bids import collect_runs

    return collect_runs(shapes_bids()[0])
