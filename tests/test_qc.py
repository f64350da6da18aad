"""QC metrics and their flags (good vs deliberately broken runs), ROI statistics, segmentation discovery,
and the QC JSON / ROI TSV written by the workflow."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import save_nifti

import qsmprep.qsm  # noqa: F401  (fills the registries)
from qsmprep.qsm.constants import hz_to_ppm
from qsmprep.qsm.geometry import forward_field_ppm
from qsmprep.qsm.masking import erode_mask
from qsmprep.qsm.multiecho import fit_b0_hz, mcpc3ds
from qsmprep.qsm.qc import (
    EXPECTED_RANGES,
    b0_fit_residual,
    data_consistency_residual,
    effective_echo_times,
    flag_metrics,
    qc_metrics,
    residual_background_fraction,
    solid_harmonics,
)
from qsmprep.qsm.registry import BGREMOVE, INVERSION, MASKING, REFERENCE, UNWRAP
from qsmprep.qsm.roi import roi_statistics

TES = np.array([0.004, 0.008, 0.012, 0.016])
B0_T = 3.0


# --------------------------------------------------------------------------------------------------
# the physics chain on the head phantom (same calls as the workflow's interfaces)
# --------------------------------------------------------------------------------------------------


def _chain(mag, phase, te, vs, b0_dir, erode_vox: int = 0) -> dict:
    corrected, _ = mcpc3ds(phase, mag, te, vs)
    mask = MASKING.get("phase")(phase_rad_4d=corrected, magnitude_4d=mag, echo_times_s=te, voxel_size_mm=vs)
    mask = np.asarray(mask[0] if isinstance(mask, tuple) else mask, bool)
    if erode_vox:
        mask = erode_mask(mask, erode_vox)
    unwrapped = UNWRAP.get("romeo")(corrected, magnitude=mag, mask=mask, echo_times_s=te, voxel_size_mm=vs)
    hz = fit_b0_hz(unwrapped, te, magnitude_4d=mag, mask=mask)
    local, mask_out = BGREMOVE.get("vsharp")(hz_to_ppm(hz, B0_T), mask, vs, b0_dir)
    mask_out = np.asarray(mask_out, bool)
    chi = np.where(mask_out, INVERSION.get("rts")(local, mask_out, vs, b0_dir), 0).astype(np.float32)
    chi = REFERENCE.get("mean")(chi, mask_out)
    metrics = qc_metrics(chi, mask_out, vs, b0_dir, local_field_ppm=local, unwrapped_phase_4d=unwrapped,
                         fieldmap_hz=hz, magnitude_4d=mag, echo_times_s=te, field_strength_t=B0_T,
                         quality_mask=mask, extra={"inversion_method": "rts"})
    metrics["Flags"] = flag_metrics(metrics)
    return metrics


@pytest.fixture(scope="module")
def head_1mm(head_phantom_1mm):
    return head_phantom_1mm


@pytest.fixture(scope="module")
def runs(head_1mm):
    """QC metrics of a good 2 mm head run and of four deliberately broken ones."""
    from qsmprep.simulate import downsample_phantom, simulate_gre

    sim = simulate_gre(downsample_phantom(head_1mm, 2), echo_times_s=TES, b0_tesla=B0_T, snr=50, seed=0)
    mag, phase, vs, b = sim.magnitude, sim.phase_rad, sim.voxel_size_mm, sim.b0_dir
    return {
        "good": _chain(mag, phase, TES, vs, b),
        "te_x2": _chain(mag, phase, TES * 2, vs, b),  # every EchoTime doubled
        "te3_wrong": _chain(mag, phase, np.array([0.004, 0.008, 0.016, 0.020]), vs, b),  # TE3 12 -> 16 ms
        "flipped": _chain(mag, -phase, TES, vs, b),  # phase sign flipped
        "eroded": _chain(mag, phase, TES, vs, b, erode_vox=8),  # mask eroded by 16 mm
    }


def _flagged(metrics) -> set[str]:
    return {f["metric"] for f in metrics["Flags"]}


@pytest.mark.integration
def test_good_run_is_not_flagged_and_metrics_are_plausible(runs):
    m = runs["good"]
    assert m["Flags"] == []
    # measured: 1371 mL, 0.0009, 5.42 /s/T, +0.33, 0.019 (order 3: 0.030), 0.51, 0.022
    assert 1200 < m["mask_volume_ml"] < 1600
    assert m["echo_time_error"] < 0.01
    assert 4.5 < m["r2star_per_tesla"] < 6.5  # phantom brain R2* about 15-20 /s at 3 T
    assert m["chi_tail_asymmetry"] > 0.15
    assert m["residual_background_fraction"] < 0.1
    assert m["data_consistency_residual"] < 0.7
    assert m["low_quality_fraction"] < 0.1
    assert abs(m["chi_mean_ppm"]) < 1e-4  # mean referencing
    assert m["chi_p1_ppm"] < m["chi_median_ppm"] < m["chi_p99_ppm"]
    assert m["n_echoes"] == 4 and m["echo_times_ms"] == "4, 8, 12, 16" and m["field_strength_t"] == 3.0
    assert m["b0_direction"] == "0, 0, 1" and m["obliquity_deg"] == 0.0 and m["inversion_method"] == "rts"
    eff = [float(v) for v in m["echo_times_effective_ms"].split(",")]
    assert np.allclose(eff, TES * 1e3, rtol=0.01)
    json.dumps(m, allow_nan=False)  # JSON-ready: numbers and strings only


@pytest.mark.integration
def test_all_echo_times_doubled_is_flagged_by_r2star(runs):
    m, good = runs["te_x2"], runs["good"]
    assert _flagged(m) == {"r2star_per_tesla"}  # measured 2.71 /s/T
    assert m["r2star_per_tesla"] == pytest.approx(good["r2star_per_tesla"] / 2, rel=0.05)
    # the phase stays linear in TE: the field (and chi) are halved without any misfit
    assert m["echo_time_error"] < 0.01
    assert m["chi_std_ppm"] == pytest.approx(good["chi_std_ppm"] / 2, rel=0.1)


@pytest.mark.integration
def test_one_wrong_echo_time_is_flagged_by_the_effective_echo_times(runs):
    m, good = runs["te3_wrong"], runs["good"]
    assert "echo_time_error" in _flagged(m) and m["echo_time_error"] > 0.1  # measured 0.196
    assert _flagged(m) <= {"echo_time_error", "b0_fit_relative_residual", "r2star_per_tesla"}
    assert m["b0_fit_relative_residual"] > 5 * good["b0_fit_relative_residual"]
    assert m["b0_fit_residual_rad"] > 1.5 * good["b0_fit_residual_rad"]
    flag = next(f for f in m["Flags"] if f["metric"] == "echo_time_error")
    assert flag["expected"] == "[-inf, 0.03]" and "EchoTime" in flag["reason"]


@pytest.mark.integration
def test_flipped_phase_sign_is_flagged_by_the_tail_asymmetry(runs):
    m, good = runs["flipped"], runs["good"]
    assert _flagged(m) == {"chi_tail_asymmetry"}
    assert m["chi_tail_asymmetry"] == pytest.approx(-good["chi_tail_asymmetry"], abs=0.02)  # measured -0.33
    assert m["chi_p99_ppm"] == pytest.approx(-good["chi_p1_ppm"], abs=2e-3)


@pytest.mark.integration
def test_eroded_mask_is_flagged_by_its_volume(runs):
    m = runs["eroded"]
    assert _flagged(m) == {"mask_volume_ml"}  # measured 624 mL
    assert m["mask_volume_ml"] < 0.6 * runs["good"]["mask_volume_ml"]
    flag = m["Flags"][0]
    assert flag["value"] == m["mask_volume_ml"] and flag["expected"] == "[800, 2500]"


# --------------------------------------------------------------------------------------------------
# building blocks on small synthetic volumes
# --------------------------------------------------------------------------------------------------


def _ball(n=32, r=11.0):
    g = np.indices((n, n, n)).astype(np.float32) - (n - 1) / 2
    return (g**2).sum(0) <= r * r, g


def test_residual_background_fraction_separates_harmonic_from_local_fields():
    mask, g = _ball()
    rng = np.random.default_rng(0)
    harmonic = sum(c * t for c, t in zip(rng.normal(size=15), solid_harmonics(g, 3))).astype(np.float32)
    for t in solid_harmonics(g, 3):  # every term is harmonic: zero discrete Laplacian (exact for cubics)
        lap = sum(np.gradient(np.gradient(t, axis=a), axis=a) for a in range(3))
        assert np.abs(lap[4:-4, 4:-4, 4:-4]).max() < 1e-6 * np.abs(t).max()
    assert residual_background_fraction(harmonic, mask) == pytest.approx(1.0, abs=1e-6)
    chi = np.zeros(mask.shape, np.float32)
    chi[12:16, 10:20, 14:18] = 0.2
    chi[18:21, 15:18, 10:22] = -0.1
    local = np.where(mask, forward_field_ppm(chi, pad_voxels=16), 0).astype(np.float32)
    frac = residual_background_fraction(local, mask)
    assert frac < 0.2
    background = harmonic * (local[mask].std() / harmonic[mask].std())  # as much energy as the local field
    assert 0.4 < residual_background_fraction(local + background, mask) < 0.6
    # data consistency: the exact chi explains its own field (up to the discretisation of the padding)
    assert data_consistency_residual(chi, local, mask, pad_voxels=16) < 0.02
    assert data_consistency_residual(chi + 0.05 * mask, local, mask, pad_voxels=16) < 0.02  # offset-invariant
    assert 0.95 < data_consistency_residual(np.zeros_like(chi), local, mask) <= 1.0  # only the offset fitted
    assert data_consistency_residual(-chi, local, mask, pad_voxels=16) > 1.9
    with pytest.raises(ValueError, match="harmonic order"):
        solid_harmonics(g, 4)
    with pytest.raises(ValueError, match="zero everywhere in the mask"):
        data_consistency_residual(chi, np.zeros_like(local), mask)
    with pytest.raises(ValueError, match="local_field_ppm has shape"):
        data_consistency_residual(chi, local[:-1], mask)
    with pytest.raises(ValueError, match="unit vector"):
        data_consistency_residual(chi, local, mask, b0_dir=(1, 1, 0))
    with pytest.raises(ValueError, match="voxel_size_mm"):
        residual_background_fraction(local, mask, voxel_size_mm=(1, 0, 1))


def test_b0_residual_and_effective_echo_times_on_synthetic_phase():
    mask, g = _ball(16, 6.0)
    rng = np.random.default_rng(1)
    hz = (20 * g[0] / 8 + 5).astype(np.float32)
    phase = (2 * np.pi * hz[..., None] * TES).astype(np.float32)
    mag = np.ones(phase.shape, np.float32)
    med, rel = b0_fit_residual(phase, hz, TES, mask, mag)
    assert med < 1e-5 and rel < 1e-10
    assert np.allclose(effective_echo_times(phase, hz, mask), TES, rtol=1e-5)
    noisy = phase + rng.normal(0, 0.05, phase.shape).astype(np.float32)
    med, rel = b0_fit_residual(noisy, hz, TES, mask)
    assert med == pytest.approx(0.05, rel=0.2)
    with pytest.raises(ValueError, match="field map is zero"):
        effective_echo_times(phase, np.zeros_like(hz), mask)
    with pytest.raises(ValueError, match="fieldmap_hz"):
        b0_fit_residual(phase, hz[:-1], TES, mask)
    with pytest.raises(ValueError, match="3 echo times for 4 echoes"):
        b0_fit_residual(phase, hz, TES[:3], mask)
    te_bad = TES.copy()
    te_bad[2] = 0.015
    assert abs(effective_echo_times(phase, hz, mask)[2] / te_bad[2] - 1) > 0.15


def test_echo_fit_metrics_match_their_formulas():
    """The one-pass numba kernel against the formulas written out in NumPy (weighted, in both memory orders)."""
    mask, g = _ball(14, 5.0)
    rng = np.random.default_rng(3)
    hz = (15 * g[1] / 7 - 4).astype(np.float32)
    phase = (2 * np.pi * hz[..., None] * TES + rng.normal(0, 0.1, hz.shape + (TES.size,))).astype(np.float32)
    mag = rng.uniform(0.5, 2.0, phase.shape).astype(np.float32)
    w = np.square(mag[mask].astype(np.float64))
    p = phase[mask].astype(np.float64)
    gv = 2 * np.pi * hz[mask].astype(np.float64)[:, None]
    r = p - gv * TES
    want_med = np.median(np.sqrt((w * r * r).sum(1) / w.sum(1)))
    want_rel = (w * r * r).sum() / (w * p * p).sum()
    want_te = (w * p * gv).sum(0) / (w * gv * gv).sum(0)
    for ph, mg in ((phase, mag), (np.asfortranarray(phase), np.asfortranarray(mag))):
        med, rel = b0_fit_residual(ph, hz, TES, mask, mg)
        assert med == pytest.approx(want_med, rel=1e-9) and rel == pytest.approx(want_rel, rel=1e-9)
        np.testing.assert_allclose(effective_echo_times(ph, hz, mask, mg), want_te, rtol=1e-9)
    # without magnitude every weight is 1
    med, _ = b0_fit_residual(phase, hz, TES, mask)
    assert med == pytest.approx(np.median(np.sqrt((r * r).mean(1))), rel=1e-9)


def test_flag_metrics_and_range_table():
    for name, (lo, hi, reason) in EXPECTED_RANGES.items():
        assert lo is not None or hi is not None, name
        assert lo is None or hi is None or lo < hi, name
        assert len(reason) > 20, name
    flags = flag_metrics({"mask_volume_ml": 100.0, "chi_tail_asymmetry": 0.3, "echo_time_error": "n/a",
                          "r2star_per_tesla": float("nan"), "obliquity_deg": 41.0})
    assert [f["metric"] for f in flags] == ["mask_volume_ml", "obliquity_deg"]
    assert flags[0] == {"metric": "mask_volume_ml", "value": 100.0, "expected": "[800, 2500]",
                        "reason": EXPECTED_RANGES["mask_volume_ml"][2]}
    assert flags[1]["expected"] == "[-inf, 40]"
    assert flag_metrics({"x": 5.0}, {"x": (None, 1.0, "too big")})[0]["reason"] == "too big"


def test_qc_metrics_minimal_inputs_passthrough_and_validation():
    mask, g = _ball(16, 6.0)
    chi = np.where(mask, 0.01 * g[0], 0).astype(np.float32)
    m = qc_metrics(chi, mask, (1, 1, 2), (0, 0, 1), extra={"model_name": "net", "model_checksum": "abc",
                                                          "iterations": 3, "skip": None})
    assert m["mask_volume_ml"] == pytest.approx(mask.sum() * 2 / 1000)
    assert m["model_name"] == "net" and m["model_checksum"] == "abc" and m["iterations"] == 3 and "skip" not in m
    assert "b0_fit_residual_rad" not in m and "r2star_median_hz" not in m  # inputs not given: left out
    one_echo = qc_metrics(chi, mask, 1, (0, 0, 1), unwrapped_phase_4d=chi[..., None] * 10, fieldmap_hz=chi * 100,
                          magnitude_4d=mask[..., None].astype(np.float32), echo_times_s=[0.01])
    assert 0 <= one_echo["low_quality_fraction"] <= 1 and one_echo["n_echoes"] == 1
    assert not {"b0_fit_residual_rad", "echo_time_error", "r2star_median_hz"} & set(one_echo)
    b = np.array([0.0, np.sin(0.3), np.cos(0.3)])
    assert qc_metrics(chi, mask, 1, b)["obliquity_deg"] == pytest.approx(np.degrees(0.3), abs=1e-3)
    with pytest.raises(ValueError, match="mask has shape"):
        qc_metrics(chi, mask[:-1], 1, (0, 0, 1))
    with pytest.raises(ValueError, match="empty"):
        qc_metrics(chi, np.zeros_like(mask), 1, (0, 0, 1))
    with pytest.raises(ValueError, match="NaN"):
        qc_metrics(np.where(mask, np.nan, 0), mask, 1, (0, 0, 1))
    with pytest.raises(ValueError, match="unit vector"):
        qc_metrics(chi, mask, 1, (0, 0, 2))
    with pytest.raises(ValueError, match="local_field_ppm has shape"):
        qc_metrics(chi, mask, 1, (0, 0, 1), local_field_ppm=chi[:-1])
    with pytest.raises(ValueError, match="3 echo times"):
        qc_metrics(chi, mask, 1, (0, 0, 1), unwrapped_phase_4d=np.zeros(chi.shape + (4,)), echo_times_s=TES[:3])
    with pytest.raises(ValueError, match="seconds"):
        qc_metrics(chi, mask, 1, (0, 0, 1), echo_times_s=[4, 8])
    with pytest.raises(ValueError, match="quality_threshold"):
        qc_metrics(chi, mask, 1, (0, 0, 1), quality_threshold=1.5)
    with pytest.raises(ValueError, match="field_strength_t"):
        qc_metrics(chi, mask, 1, (0, 0, 1), field_strength_t=0)



def test_field_metrics_computed_apart_give_the_same_qc():
    """The workflow computes the chi-independent metrics next to the inversion (FieldQCMetrics) and
    passes them to qc_metrics: the result equals qc_metrics computing everything itself."""
    from scipy.ndimage import gaussian_filter

    from qsmprep.qsm.qc import field_qc_metrics

    mask, g = _ball(20, 8.0)
    rng = np.random.default_rng(3)
    chi = np.where(mask, gaussian_filter(rng.standard_normal(mask.shape), 1.5) * 0.1, 0).astype(np.float32)
    local = np.where(mask, gaussian_filter(rng.standard_normal(mask.shape), 2) * 0.05 + 0.01 * g[0], 0)
    hz = (local * 127.7).astype(np.float32)
    te = np.array(TES)
    unwrapped = np.stack([2 * np.pi * hz * t for t in te], -1).astype(np.float32)
    mag = np.stack([np.exp(-25 * t) * mask for t in te], -1).astype(np.float32)
    inputs = dict(unwrapped_phase_4d=unwrapped, fieldmap_hz=hz, magnitude_4d=mag, echo_times_s=te,
                  field_strength_t=3.0)
    whole = qc_metrics(chi, mask, (1, 1, 2), (0, 0, 1), local_field_ppm=local.astype(np.float32), **inputs)
    apart = field_qc_metrics(mask, (1, 1, 2), local_field_ppm=local.astype(np.float32), **inputs)
    assert {"low_quality_fraction", "b0_fit_residual_rad", "r2star_median_hz", "residual_background_fraction",
            "echo_time_error"} <= set(apart)
    assert not {"data_consistency_residual", "chi_mean_ppm", "mask_volume_ml"} & set(apart)  # need chi / not field
    merged = qc_metrics(chi, mask, (1, 1, 2), (0, 0, 1), local_field_ppm=local.astype(np.float32),
                        echo_times_s=te, field_strength_t=3.0, field_metrics=apart)
    assert merged == whole and list(merged) == list(whole)


# --------------------------------------------------------------------------------------------------
# ROI statistics
# --------------------------------------------------------------------------------------------------


def test_roi_statistics_equal_brute_force():
    rng = np.random.default_rng(3)
    chi = rng.normal(0, 0.1, (20, 21, 22)).astype(np.float32)
    labels = rng.integers(-1, 9, chi.shape).astype(np.int16)
    labels[labels == 5] = 0  # a label listed in the names but absent
    mask = rng.random(chi.shape) > 0.3
    labels[~mask & (labels == 7)] = 0
    labels[3, 3, 3], mask[3, 3, 3] = 12, True  # a single-voxel label
    names = {1: "one", 2: "two", 5: "five", 12: "twelve"}
    rows = roi_statistics(chi, labels, mask=mask, label_names=names)
    assert [r["label"] for r in rows] == sorted({int(v) for v in labels[mask & (labels > 0)]})
    for r in rows:
        v = chi[(labels == r["label"]) & mask].astype(np.float64)
        assert r["n_voxels"] == v.size and r["name"] == names.get(r["label"])
        assert r["mean"] == pytest.approx(v.mean(), abs=1e-9)
        assert r["median"] == pytest.approx(np.median(v), abs=1e-9)
        assert r["std"] == pytest.approx(v.std(), abs=1e-9)
    assert rows[-1] == {"label": 12, "name": "twelve", "n_voxels": 1, "mean": pytest.approx(float(chi[3, 3, 3])),
                        "median": pytest.approx(float(chi[3, 3, 3])), "std": 0.0}
    # no mask: every voxel; float labels with integer values are accepted
    full = roi_statistics(chi, labels.astype(np.float32))
    assert sum(r["n_voxels"] for r in full) == int((labels > 0).sum())
    assert roi_statistics(chi, np.zeros(chi.shape, int)) == []
    with pytest.raises(ValueError, match="labels has shape"):
        roi_statistics(chi, labels[:-1])
    with pytest.raises(ValueError, match="integer"):
        roi_statistics(chi, labels + 0.5)
    with pytest.raises(ValueError, match="mask is empty"):
        roi_statistics(chi, labels, mask=np.zeros(chi.shape, bool))


@pytest.mark.integration
def test_roi_medians_on_the_truth_equal_the_declared_nucleus_values(head_1mm):
    ph = head_1mm
    rows = {r["label"]: r for r in roi_statistics(ph.chi_ppm, ph.labels, mask=ph.brain_mask,
                                                  label_names=ph.label_names)}
    for label in (1, 2, 3, 4, 5, 6, 7, 10):  # deep grey-matter nuclei and CSF reach their values in the core
        r = rows[label]
        assert r["name"] == ph.label_names[label]
        assert r["median"] == pytest.approx(ph.label_chi_ppm[label], abs=1e-3), r
        assert r["mean"] == pytest.approx(ph.label_chi_ppm[label], abs=0.2 * abs(ph.label_chi_ppm[label]) + 0.003)
    assert set(rows) <= set(ph.label_names) and all(k > 0 for k in rows)


# --------------------------------------------------------------------------------------------------
# segmentation discovery and the workflow outputs
# --------------------------------------------------------------------------------------------------


def _touch_nifti(path: Path, shape=(4, 4, 4), affine=None) -> Path:
    return Path(save_nifti(path, np.zeros(shape, np.int16), affine))


def test_find_segmentation_matches_entities_and_checks_the_grid(tmp_path):
    from types import SimpleNamespace

    from qsmprep.interfaces.reports import check_segmentation_grid, find_segmentation, read_label_table

    root = tmp_path / "seg"
    anat = root / "sub-01" / "ses-1" / "anat"
    run = SimpleNamespace(subject="01", session="1", acquisition="qsm", run=None, prefix=lambda: "sub-01_ses-1_acq-qsm")
    assert find_segmentation(root.parent, run) is None  # no sub-01 folder
    generic = _touch_nifti(root / "sub-01" / "anat" / "sub-01_desc-aseg_dseg.nii.gz")
    (root / "desc-aseg_dseg.tsv").write_text("index\tname\n1\tcaudate\n2\tn/a\n")
    assert find_segmentation(root, run) == (generic, root / "desc-aseg_dseg.tsv")  # session-less applies
    _touch_nifti(anat / "sub-01_ses-1_space-T1w_dseg.nii.gz")  # another space: ignored
    _touch_nifti(anat / "sub-01_ses-2_dseg.nii.gz")  # another session
    _touch_nifti(anat / "sub-01_ses-1_acq-other_dseg.nii.gz")  # another acquisition
    best = _touch_nifti(anat / "sub-01_ses-1_acq-qsm_dseg.nii.gz")
    (anat / "sub-01_ses-1_acq-qsm_dseg.tsv").write_text("index\tname\tcolor\n3\tputamen\t#ff0000\n")
    assert find_segmentation(root, run) == (best, anat / "sub-01_ses-1_acq-qsm_dseg.tsv")
    assert read_label_table(anat / "sub-01_ses-1_acq-qsm_dseg.tsv") == {3: "putamen"}
    assert read_label_table(root / "desc-aseg_dseg.tsv") == {1: "caudate"}
    _touch_nifti(anat / "sub-01_ses-1_acq-qsm_desc-x_dseg.nii.gz")
    with pytest.raises(ValueError, match="several segmentations"):
        find_segmentation(root, run)
    with pytest.raises(ValueError, match="does not exist"):
        find_segmentation(tmp_path / "missing", run)
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\tlabel\n1\tx\n")
    with pytest.raises(ValueError, match="'index' and 'name'"):
        read_label_table(bad)
    ref = _touch_nifti(tmp_path / "ref.nii.gz")
    check_segmentation_grid(best, ref)
    with pytest.raises(ValueError, match="Registration of segmentations .* is not implemented yet"):
        check_segmentation_grid(_touch_nifti(tmp_path / "other.nii.gz", (5, 4, 4)), ref)
    with pytest.raises(ValueError, match="not implemented yet"):
        check_segmentation_grid(_touch_nifti(tmp_path / "shifted.nii.gz", affine=np.diag([2, 1, 1, 1])), ref)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shapes_bids):
    """Raw BIDS (sub-01, ses-1, acq-qsm; 4 echoes) of a 40^3 shapes phantom + ground truth incl. _dseg
    (shared, read-only: see conftest.py), and a folder for this module's outputs."""
    bids, (run,), sim = shapes_bids(sessions=["1"], acq="qsm")
    return tmp_path_factory.mktemp("qcwf"), bids, run, sim


def test_workflow_writes_qc_json_and_roi_tsv(dataset):
    import pandas as pd

    from qsmprep.config import QsmprepConfig
    from qsmprep.workflows.base import init_qsmprep_wf

    root, bids, run, sim = dataset
    truth = bids / "derivatives" / "qsmprep-simulate"
    # the classical chain: a 48 mm shapes phantom is no brain for the learned default
    cfg = QsmprepConfig(bids_dir=bids, output_dir=root / "out", work_dir=root / "work",
                        omp_nthreads=1, nprocs=1, segmentation_dir=truth, bgremove="vsharp", inversion="rts")
    init_qsmprep_wf(cfg, [run]).run(plugin="Linear")
    anat = cfg.output_dir / "sub-01" / "ses-1" / "anat"
    stem = "sub-01_ses-1_acq-qsm_"

    qc = json.loads((anat / f"{stem}desc-qc_metrics.json").read_text())
    assert isinstance(qc["Flags"], list)
    for key, value in qc.items():
        assert key == "Flags" or isinstance(value, (int, float, str)), key
    mask = nib.load(anat / f"{stem}desc-brain_mask.nii.gz").get_fdata() > 0
    assert qc["mask_volume_ml"] == pytest.approx(mask.sum() * 1.2**3 / 1000, rel=1e-6)
    assert qc["series"] == "sub-01_ses-1_acq-qsm" and qc["inversion_method"] == "rts"
    assert qc["n_echoes"] == 4 and qc["chi_tail_asymmetry"] > 0 and qc["data_consistency_residual"] < 0.8
    # a 48 mm phantom is no adult brain; its field (+-4 Hz, +-0.1 rad at TE1) is small against the phase
    # offset MCPC-3D-S leaves (+-0.4 rad): the B0 fit is biased and flagged (effective TE 7.4/8.9/10.5/12.0 ms)
    assert {"mask_volume_ml", "echo_time_error"} <= {f["metric"] for f in qc["Flags"]}

    table = pd.read_csv(anat / f"{stem}desc-roi_stats.tsv", sep="\t")
    assert list(table.columns) == ["label", "name", "n_voxels", "mean_ppm", "median_ppm", "std_ppm"]
    assert table["label"].dtype.kind == "i" and table["n_voxels"].dtype.kind == "i"
    assert all(table[c].dtype.kind == "f" for c in ("mean_ppm", "median_ppm", "std_ppm"))
    assert table["n_voxels"].sum() == int((mask & (sim.labels > 0)).sum())
    assert list(table["name"]) == [sim.label_names[k] for k in table["label"]]
    chi = nib.load(anat / f"{stem}Chimap.nii.gz").get_fdata()
    first = table.iloc[0]
    assert first["mean_ppm"] == pytest.approx(chi[mask & (sim.labels == first["label"])].mean(), abs=1e-5)
    from qsmprep.outputs import bidsignore_text

    assert {"*_desc-qc_metrics.json", "*_desc-roi_stats.tsv"} <= set(bidsignore_text().splitlines())

    # a segmentation on another grid is refused when the workflow is built; none found -> no ROI node
    from qsmprep.workflows.qsm import init_qsm_wf

    other = root / "seg_other" / "sub-01" / "anat" / "sub-01_dseg.nii.gz"
    _touch_nifti(other, (8, 8, 8))
    with pytest.raises(ValueError, match="not implemented yet"):
        init_qsm_wf(run, dataclasses.replace(cfg, segmentation_dir=root / "seg_other"))
    wf = init_qsm_wf(run, dataclasses.replace(cfg, segmentation_dir=root / "seg_other" / "sub-01"))
    names = {n.name for n in wf._graph.nodes()}
    assert "qc" in names and "ds_qc_metrics" in names and "roi_stats" not in names
