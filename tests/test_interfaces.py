"""Nipype interfaces, derivative writers and boilerplate on tiny synthetic volumes.

Every interface must write float32 images (masks uint8) on the grid (shape + affine, qform/sform
codes) of its input, and report the method and all parameters it ran with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from helpers import save_nifti

from qsmprep.interfaces.bids import DerivativesDataSink, QsmSidecars
from qsmprep.interfaces.qsm import (
    BackgroundRemoval,
    DipoleInversion,
    FitB0,
    LoadEchoes,
    Mask,
    PhaseOffsetCorrection,
    R2Star,
    Reference,
    Unwrap,
)
from qsmprep.qsm.constants import ppm_to_hz
from qsmprep.qsm.geometry import b0_direction_from_affine

TES = (0.004, 0.008, 0.012)
B0_T = 3.0


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


def _save(path: Path, data, affine, dtype=np.float32) -> str:
    return save_nifti(path, data, affine, dtype, scanner_codes=True)


@pytest.fixture(scope="module")
def sim():
    """Oblique (15 deg) 3-echo GRE of a 32^3, 1.5 mm shapes phantom with noise.

    No echo-independent phase offset: on a 48 mm field of view the simulator's random offset varies
    faster than MCPC-3D-S's 7 mm smoothing can follow, which would hide the interfaces' own errors.
    """
    from qsmprep.simulate import make_shapes_phantom, simulate_gre

    ph = make_shapes_phantom(shape=(32, 32, 32), voxel_size_mm=(1.5, 1.5, 1.5), seed=0)
    return simulate_gre(ph, echo_times_s=TES, b0_tesla=B0_T, tilt_deg=15.0, snr=100, seed=0, phase_offset=False)


@pytest.fixture(scope="module")
def files(sim, tmp_path_factory):
    """Per-echo NIfTI files: magnitude float32, phase int16 in Siemens units (-4096..4095)."""
    d = tmp_path_factory.mktemp("raw")
    mags, phases, reals, imags = [], [], [], []
    for e in range(len(TES)):
        mags.append(_save(d / f"mag{e + 1}.nii.gz", sim.magnitude[..., e], sim.affine))
        ph_int = np.clip(np.round(sim.phase_rad[..., e] * 4096 / np.pi), -4096, 4095)
        phases.append(_save(d / f"phase{e + 1}.nii.gz", ph_int, sim.affine, np.int16))
        z = sim.magnitude[..., e] * np.exp(1j * sim.phase_rad[..., e])
        reals.append(_save(d / f"real{e + 1}.nii.gz", z.real, sim.affine))
        imags.append(_save(d / f"imag{e + 1}.nii.gz", z.imag, sim.affine))
    return SimpleNamespace(mag=mags, phase=phases, real=reals, imag=imags, dir=d)


@pytest.fixture(scope="module")
def chain(sim, files, tmp_path_factory):
    """Every QSM interface run once, in order, each in its own folder; returns their results."""
    base = tmp_path_factory.mktemp("chain")
    out = {}
    cwd = os.getcwd()

    def run(name, iface):
        wd = base / name
        wd.mkdir()
        os.chdir(wd)
        try:
            out[name] = iface.run().outputs
        finally:
            os.chdir(cwd)
        return out[name]

    load = run("load", LoadEchoes(magnitude_files=files.mag, phase_files=files.phase, echo_times=list(TES),
                                  field_strength=B0_T, phase_units="arbitrary"))
    off = run("offset", PhaseOffsetCorrection(phase=load.phase, magnitude=load.magnitude,
                                              echo_times=load.echo_times, voxel_size=load.voxel_size))
    msk = run("mask", Mask(phase=off.phase_corrected, magnitude=load.magnitude, echo_times=load.echo_times,
                           voxel_size=load.voxel_size, method="phase-quality", num_threads=1))
    unw = run("unwrap", Unwrap(phase=off.phase_corrected, magnitude=load.magnitude, mask=msk.mask_file,
                               echo_times=load.echo_times, voxel_size=load.voxel_size, method="romeo"))
    b0 = run("b0", FitB0(unwrapped=unw.unwrapped, magnitude=load.magnitude, mask=msk.mask_file,
                         echo_times=load.echo_times, field_strength=B0_T))
    bg = run("bgremove", BackgroundRemoval(total_field=b0.total_field_ppm, mask=msk.mask_file,
                                           voxel_size=load.voxel_size, b0_dir=load.b0_dir, method="vsharp"))
    inv = run("inversion", DipoleInversion(local_field=bg.local_field, mask=bg.mask_out, voxel_size=load.voxel_size,
                                           b0_dir=load.b0_dir, method="tkd", method_params={"delta": 0.2}))
    run("r2star", R2Star(magnitude=load.magnitude, echo_times=load.echo_times, mask=msk.mask_file,
                         method="loglinear"))
    run("reference", Reference(chi=inv.chi, mask=bg.mask_out, method="mean"))
    return SimpleNamespace(**out)


def _grid_ok(path, ref_affine, shape3, dtype):
    img = nib.load(path)
    assert img.shape[:3] == tuple(shape3), path
    assert np.allclose(img.affine, ref_affine, atol=1e-5), path
    assert img.get_data_dtype() == np.dtype(dtype), (path, img.get_data_dtype())
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1, path
    return img


# --------------------------------------------------------------------------------------------------
# LoadEchoes
# --------------------------------------------------------------------------------------------------


def test_load_echoes_scales_phase_and_reports_geometry(sim, chain):
    load = chain.load
    mag = _grid_ok(load.magnitude, sim.affine, sim.magnitude.shape[:3], np.float32)
    ph = _grid_ok(load.phase, sim.affine, sim.magnitude.shape[:3], np.float32)
    assert mag.shape == ph.shape == sim.magnitude.shape
    phase = ph.get_fdata()
    assert phase.min() >= -np.pi - 1e-6 and phase.max() < np.pi + 1e-6
    # int16 Siemens units -> rad: exact up to the quantisation (pi/4096), modulo 2 pi
    d = np.angle(np.exp(1j * (phase - sim.phase_rad)))
    assert np.max(np.abs(d)) < 1.1 * np.pi / 4096
    assert np.allclose(mag.get_fdata(), sim.magnitude, atol=1e-5)
    assert load.echo_times == list(TES)
    assert np.allclose(load.b0_dir, sim.b0_dir, atol=1e-6)
    assert np.allclose(load.b0_dir, b0_direction_from_affine(sim.affine))
    assert np.allclose(load.voxel_size, [1.5, 1.5, 1.5])
    assert load.n_echoes == 3 and load.field_strength == B0_T
    p = load.params
    assert p["B0DirectionSource"] == "NIfTI affine" and abs(p["ObliquityDeg"] - 15.0) < 0.01
    assert p["PhaseEncodingDetected"] == "integer" and p["ResampledToEcho1Grid"] == []
    json.dumps(p)


def test_load_echoes_real_imag_sorting_b0_override_and_resampling(sim, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # real/imag, given in reverse echo order with their echo times: sorted by TE on output
    res = LoadEchoes(real_files=files.real[::-1], imag_files=files.imag[::-1], echo_times=list(TES[::-1]),
                     field_strength=B0_T, b0_dir=[0.0, 0.0, 2.0]).run().outputs
    assert res.echo_times == list(TES)
    mag = nib.load(res.magnitude).get_fdata()
    phase = nib.load(res.phase).get_fdata()
    assert np.allclose(mag, sim.magnitude, atol=1e-4)
    inside = sim.magnitude > 0.05 * sim.magnitude.max()
    assert np.max(np.abs(np.angle(np.exp(1j * (phase - sim.phase_rad)))[inside])) < 1e-4
    assert res.b0_dir == [0.0, 0.0, 1.0]  # given direction, normalised
    assert res.params["B0DirectionSource"] == "sidecar B0_dir" and res.params["InputType"] == "real/imaginary"

    # echo 2 stored on a grid shifted by one voxel along i: resampled onto the echo-1 grid
    shift = sim.affine.copy()
    shift[:3, 3] += sim.affine[:3, 0]
    moved_mag = _save(tmp_path / "m2.nii.gz", np.roll(sim.magnitude[..., 1], -1, axis=0), shift)
    moved_ph = _save(tmp_path / "p2.nii.gz", np.roll(sim.phase_rad[..., 1], -1, axis=0), shift)
    ph_files = [_save(tmp_path / f"phase_e{e}.nii.gz", sim.phase_rad[..., e], sim.affine) for e in (0, 2)]
    res = LoadEchoes(magnitude_files=[files.mag[0], moved_mag, files.mag[2]],
                     phase_files=[ph_files[0], moved_ph, ph_files[1]], echo_times=list(TES),
                     field_strength=B0_T, phase_units="rad").run().outputs
    assert sorted(res.params["ResampledToEcho1Grid"]) == ["echo-2 magnitude", "echo-2 phase"]
    out = nib.load(res.phase)
    assert np.allclose(out.affine, sim.affine)
    core = (slice(2, -2),) * 3
    mag2 = nib.load(res.magnitude).get_fdata()[..., 1]
    assert np.allclose(mag2[core], sim.magnitude[..., 1][core], atol=1e-4)
    d = np.angle(np.exp(1j * (out.get_fdata()[..., 1] - sim.phase_rad[..., 1])))[core]
    assert np.max(np.abs(d[inside[..., 1][core]])) < 1e-3


def test_load_echoes_errors(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="echo times"):
        LoadEchoes(magnitude_files=files.mag, phase_files=files.phase, echo_times=[0.004, 0.008],
                   field_strength=B0_T).run()
    with pytest.raises(Exception, match="phase_files"):
        LoadEchoes(magnitude_files=files.mag, echo_times=list(TES), field_strength=B0_T).run()
    with pytest.raises(Exception, match="Units"):
        LoadEchoes(magnitude_files=files.mag, phase_files=files.phase, echo_times=list(TES), field_strength=B0_T,
                   phase_units="degrees").run()


# --------------------------------------------------------------------------------------------------
# processing interfaces
# --------------------------------------------------------------------------------------------------


def test_every_interface_keeps_grid_and_dtype(sim, chain):
    shape3 = sim.magnitude.shape[:3]
    floats = [
        chain.offset.phase_corrected, chain.offset.offset, chain.unwrap.unwrapped, chain.b0.fieldmap_hz,
        chain.b0.total_field_ppm, chain.bgremove.local_field, chain.inversion.chi, chain.r2star.r2star,
        chain.r2star.t2star, chain.r2star.s0, chain.reference.chi_referenced,
    ]
    for f in floats:
        _grid_ok(f, sim.affine, shape3, np.float32)
    for f in (chain.mask.mask_file, chain.bgremove.mask_out):
        img = _grid_ok(f, sim.affine, shape3, np.uint8)
        assert set(np.unique(np.asanyarray(img.dataobj))) <= {0, 1}
    assert nib.load(chain.unwrap.unwrapped).shape == sim.magnitude.shape


def test_interfaces_compute_sensible_maps(sim, chain):
    mask = nib.load(chain.mask.mask_file).get_fdata() > 0
    brain = sim.brain_mask.astype(bool)
    assert (mask & brain).sum() > 0.9 * brain.sum()  # the phase-quality mask covers the brain
    # B0 fit (Hz) against the true total field, up to a constant, inside the true brain
    hz = nib.load(chain.b0.fieldmap_hz).get_fdata()
    ppm = nib.load(chain.b0.total_field_ppm).get_fdata()
    truth = ppm_to_hz(sim.total_field_ppm, B0_T)
    d = (hz - truth)[brain]
    # Hz (the field spans about +-8 Hz here); measured 0.63 with the per-voxel offset of the B0 fit, whose
    # intercept about doubles the noise of a fit through the origin
    assert np.percentile(np.abs(d - np.median(d)), 95) < 0.8
    assert np.allclose(ppm[mask], hz[mask] / (42.57747892 * B0_T), rtol=1e-5, atol=1e-6)
    # R2* inside the brain within 10 % of the truth (median relative error)
    r2 = nib.load(chain.r2star.r2star).get_fdata()
    rel = np.abs(r2[brain] - sim.r2star_hz[brain]) / sim.r2star_hz[brain]
    assert np.median(rel) < 0.1
    t2 = nib.load(chain.r2star.t2star).get_fdata()
    assert np.allclose(t2[brain] * r2[brain], 1.0, rtol=1e-4)
    # mean referencing: zero mean inside the final mask, zero outside
    final = nib.load(chain.bgremove.mask_out).get_fdata() > 0
    chi = nib.load(chain.reference.chi_referenced).get_fdata()
    assert abs(chi[final].mean()) < 1e-5 and not np.any(chi[~final])
    assert final.sum() < mask.sum()  # V-SHARP erodes


def test_interfaces_report_methods_and_parameters(chain):
    assert chain.mask.params["Method"] == "phase"  # alias "phase-quality" resolved
    assert chain.mask.params["Parameters"]["factor"] == [1.5, 1.3]
    assert chain.offset.params["Method"] == "mcpc3ds" and chain.offset.params["Parameters"]["sigma_mm"] == 7.0
    assert chain.unwrap.params["Method"] == "romeo" and "template_echo" in chain.unwrap.params["Parameters"]
    assert chain.b0.params["Parameters"] == {"weighting": "phase_snr", "fit_offset": True}
    bg = chain.bgremove.params
    assert bg["Method"] == "vsharp" and bg["Parameters"]["radii_mm"][-1] == pytest.approx(3.0)  # 2 x 1.5 mm
    assert bg["MaskVoxelsOut"] < bg["MaskVoxelsIn"]
    assert chain.inversion.params == {"Method": "tkd", "Parameters": {"delta": 0.2, "pad_voxels": 8}}
    ref = chain.reference.params
    assert ref["Method"] == "mean" and ref["ReferenceRegion"].startswith("whole-brain")
    assert np.isfinite(ref["ReferenceOffsetPPM"])
    assert chain.r2star.params["Method"] == "loglinear" and "max_r2star_hz" in chain.r2star.params["Parameters"]
    for name in ("load", "offset", "mask", "unwrap", "b0", "bgremove", "inversion", "r2star", "reference"):
        json.dumps(getattr(chain, name).params, allow_nan=False)


def test_single_echo_offset_passthrough_and_unknown_method(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img = nib.load(chain.load.phase)
    one = _save(tmp_path / "one.nii", img.get_fdata()[..., :1], img.affine)
    res = PhaseOffsetCorrection(phase=one, echo_times=[0.004], voxel_size=[1.5, 1.5, 1.5]).run().outputs
    assert res.phase_corrected == one and res.params["Method"] == "none"
    with pytest.raises(Exception, match="unknown dipole inversion method 'nope'"):
        DipoleInversion(local_field=chain.bgremove.local_field, mask=chain.bgremove.mask_out,
                        voxel_size=[1.5] * 3, b0_dir=chain.load.b0_dir, method="nope").run()


def test_csf_reference_records_region_statistics(sim, chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    csf = sim.labels == 10  # the CSF sphere of the shapes phantom
    final = nib.load(chain.bgremove.mask_out).get_fdata() > 0
    assert (csf & final).sum() >= 10
    csf_file = _save(tmp_path / "csf.nii.gz", csf, sim.affine, np.uint8)
    res = Reference(chi=chain.inversion.chi, mask=chain.bgremove.mask_out, method="csf", csf_mask=csf_file,
                    voxel_size=[1.5] * 3).run().outputs
    chi = nib.load(res.chi_referenced).get_fdata()
    region = nib.load(res.reference_mask).get_fdata() > 0
    assert np.array_equal(region, csf & final)
    assert abs(chi[region].mean()) < 1e-5
    p = res.params
    assert p["ReferenceRegionVoxels"] == int(region.sum())
    raw = nib.load(chain.inversion.chi).get_fdata()
    whole = raw - raw[final].mean()
    assert p["ReferenceRegionMeanPPMWholeBrainReferenced"] == pytest.approx(whole[region].mean(), abs=1e-6)
    assert p["ReferenceRegionStdPPMWholeBrainReferenced"] == pytest.approx(whole[region].std(), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# derivatives
# --------------------------------------------------------------------------------------------------


def test_datasink_writes_atomically_with_sidecar(chain, sim, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "deriv" / "sub-1" / "anat" / "sub-1_desc-brain_mask.nii.gz"
    res = DerivativesDataSink(in_file=chain.bgremove.mask_out, out_file=str(out), data_dtype="uint8",
                              reference=chain.load.magnitude, meta_dict={"Type": "Brain", "Units": "x"},
                              metadata={"Units": "arbitrary", "Sources": ["bids:raw:a"]}).run().outputs
    img = nib.load(res.out_file)
    assert img.get_data_dtype() == np.uint8 and np.allclose(img.affine, sim.affine)
    meta = json.loads(Path(res.out_meta).read_text())
    assert meta == {"Type": "Brain", "Units": "arbitrary", "Sources": ["bids:raw:a"]}
    assert sorted(p.name for p in out.parent.iterdir()) == ["sub-1_desc-brain_mask.json", out.name]  # no temp files
    # a grid that differs from the reference is refused
    bad = _save(tmp_path / "bad.nii", np.zeros((8, 8, 8)), np.eye(4))
    with pytest.raises(Exception, match="shape"):
        DerivativesDataSink(in_file=bad, out_file=str(tmp_path / "x.nii.gz"), reference=chain.load.magnitude).run()
    assert not (tmp_path / "x.nii.gz").exists()
    with pytest.raises(Exception, match="absolute"):
        DerivativesDataSink(in_file=bad, out_file="rel.nii.gz").run()


def test_sidecars_interface_builds_bids_metadata(chain):
    res = QsmSidecars(sources=["bids:raw:sub-1/anat/sub-1_echo-1_part-phase_MEGRE.nii.gz"],
                      load=chain.load.params, offset=chain.offset.params, mask=chain.mask.params,
                      unwrap=chain.unwrap.params, b0=chain.b0.params, bgremove=chain.bgremove.params,
                      inversion=chain.inversion.params, reference=chain.reference.params).run().outputs
    chi = res.chimap
    assert chi["Units"] == "ppm" and chi["SkullStripped"] is True
    assert chi["Sources"][0].startswith("bids:raw:sub-1/")
    assert chi["MagneticFieldStrength"] == B0_T and chi["EchoTime"] == list(TES)
    assert "TKD dipole inversion" in chi["EstimationAlgorithm"] and "V-SHARP" in chi["EstimationAlgorithm"]
    assert any("10.1002/mrm.22135" in r for r in chi["EstimationReference"])  # Shmueli 2009 (TKD)
    assert any("10.1002/mrm.30006" in r for r in chi["EstimationReference"])  # consensus 2024
    assert chi["ProcessingSteps"]["DipoleInversion"]["Parameters"]["delta"] == 0.2
    assert {"qsmprep", "numpy", "scipy", "nipype", "nibabel"} <= set(chi["ProcessingSoftware"])
    assert chi["ReferenceRegion"].startswith("whole-brain") and "ReferenceOffsetPPM" in chi
    assert len(chi["B0Direction"]) == 3
    assert res.total_fieldmap["Units"] == "Hz" and res.local_fieldmap["Units"] == "ppm"
    assert "DipoleInversion" not in res.local_fieldmap["ProcessingSteps"]
    assert res.brain_mask["Type"] == "Brain" and "SkullStripped" not in res.brain_mask
    assert res.r2starmap["Units"] == "1/s" and res.t2starmap["Units"] == "s"
    json.dumps(chi, allow_nan=False)


def test_dataset_description_container_and_uris(tmp_path):
    from qsmprep.utils.derivatives import (
        bids_uri,
        container_info,
        run_sources,
        write_bidsignore,
        write_derivative_description,
    )

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "BIDSVersion": "1.10.0", "DatasetDOI": "10.1234/abc", "License": "CC0"}))
    out = raw / "derivatives" / "qsmprep"
    path = write_derivative_description(raw, out, environ={"QSMPREP_CONTAINER": "docker:qsmprep/qsmprep:1.0"})
    desc = json.loads(path.read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "qsmprep" and gen["Version"] and gen["CodeURL"].startswith("https://")
    assert gen["Container"] == {"Type": "docker", "Tag": "qsmprep/qsmprep:1.0"}
    assert desc["SourceDatasets"][0]["DOI"] == "doi:10.1234/abc" and desc["License"] == "CC0"
    assert desc["DatasetLinks"] == {"raw": "../.."}
    outside = write_derivative_description(raw, tmp_path / "elsewhere", environ={})
    assert json.loads(outside.read_text())["DatasetLinks"]["raw"] == raw.resolve().as_uri()
    assert sorted(p.name for p in out.iterdir()) == ["README", "dataset_description.json"]  # no temp files

    assert container_info({"APPTAINER_CONTAINER": "/img/q.sif", "QSMPREP_CONTAINER": "docker:x"}, "") == {
        "Type": "apptainer", "URI": "/img/q.sif"}
    assert container_info({}, dockerenv=str(tmp_path / "none")) is None
    assert container_info({}, dockerenv=str(path)) == {"Type": "docker"}

    run = SimpleNamespace(subject="01", session="2", acquisition="qsm", run=None,
                          magnitude_files=(raw / "sub-01/ses-2/anat/m1.nii.gz",),
                          phase_files=(raw / "sub-01/ses-2/anat/p1.nii.gz",), real_files=(), imag_files=())
    from qsmprep.outputs import output

    run.prefix = lambda: "sub-01_ses-2_acq-qsm"
    assert output("brain_mask").path(out, run) == out / "sub-01/ses-2/anat/sub-01_ses-2_acq-qsm_desc-brain_mask.nii.gz"
    assert output("reference_mask").path(out, run).name == "sub-01_ses-2_acq-qsm_label-CSF_mask.nii.gz"
    assert run_sources(run, raw) == ["bids:raw:sub-01/ses-2/anat/m1.nii.gz", "bids:raw:sub-01/ses-2/anat/p1.nii.gz"]
    assert bids_uri(tmp_path / "x.nii", raw).startswith("file://")
    ignore = write_bidsignore(out).read_text().splitlines()
    assert {"logs/", "sub-*/log", "*_desc-total_fieldmap.*"} <= set(ignore)


def test_boilerplate_names_the_methods_run_and_cites_them():
    from qsmprep.config import QsmprepConfig
    from qsmprep.methods import STAGES
    from qsmprep.utils.boilerplate import build_boilerplate

    text = build_boilerplate(QsmprepConfig(masking="phase-quality", bgremove="pdf", inversion="tv",
                                           reference="csf"))
    for needle in ("ROMEO", "MCPC-3D-S", "projection onto dipole fields", "ADMM", "10.1002/nbm.1670",
                   "10.1002/mrm.25029", "10.1002/mrm.28563", "10.1002/mrm.26963", "10.1002/mrm.30006",
                   "cerebrospinal fluid", "R2* map"):
        assert needle in text, needle
    assert "V-SHARP" not in text and "RTS" not in text
    classical = build_boilerplate(QsmprepConfig(bgremove="vsharp", inversion="rts"))
    assert "V-SHARP" in classical and "10.1002/mrm.23000" in classical and "rapid two-step" in classical
    default = build_boilerplate(QsmprepConfig())  # the default chain: PDF, MEDI-weighted TV-ADMM
    assert "projection onto dipole fields" in default and "morphology-enabled" in default
    assert "10.1002/nbm.1670" in default and "10.1002/mrm.25029" in default and "V-SHARP" not in default
    assert "10.1109/TMI.2011.2182523" in default  # MEDI
    assert "variational network" not in default
    learned = build_boilerplate(QsmprepConfig(bgremove="nextqsm", inversion="nextqsm"))
    assert "variational network" in learned and "10.1002/nbm.1670" in learned
    assert STAGES["masking"].canonical("Phase-Quality") == "phase" and STAGES["inversion"].canonical("rts") == "rts"
