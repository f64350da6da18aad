"""SWI/minIP (qsmprep.qsm.swi) and the automatic R2* method choice (ARLO vs log-linear).

Measured figures the bounds rest on (seeded, deterministic simulations, SNR 100):

- shapes phantom (40^3, 1.2 mm, TE 4-16 ms): +0.40 ppm cylinder along B0, contrast against the
  surrounding "brain" (C = (tissue - vessel) / tissue): RSS magnitude 0.350, SWI 0.975 (x 2.78);
  ARLO R2* median relative error 4.9 % (90th percentile 12.1 %) against the phantom's R2*.
- head phantom (2 mm, TE 4-20 ms, 5 echoes), vein label (+0.30..0.45 ppm, all orientations) against
  the WM/GM within 2 voxels: echo-1 magnitude 0.306, RSS 0.397, SWI 0.422 (x 1.38 echo 1, x 1.06
  RSS), 16 mm minIP of the SWI 0.849 (x 2.78 echo 1, x 1.73 the minIP of the RSS magnitude 0.491).
  Veins across B0 have a negative internal field (-chi/6), so the phase mask darkens them little: the
  whole-vein gain over RSS is small, that of veins along B0 large (shapes phantom).
  ARLO R2* median relative error 4.7 % (90th percentile 13.7 %) in the brain.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage as ndi

from qsmprep.config import QsmprepConfig
from qsmprep.qsm.multiecho import echoes_equally_spaced, fit_r2star, r2star_auto, r2star_method_for
from qsmprep.qsm.swi import (
    combine_magnitude_rss,
    highpass_field_hz,
    minimum_intensity_projection,
    phase_weights,
    slice_axis,
    swi,
)
from qsmprep.simulate import make_shapes_phantom, simulate_gre
from qsmprep.utils.errors import InputError

HEAD_TES = (0.004, 0.008, 0.012, 0.016, 0.020)


def contrast(image, vessel, tissue) -> float:
    """(mean tissue - mean vessel) / mean tissue."""
    t = float(np.mean(image[tissue]))
    return (t - float(np.mean(image[vessel]))) / t


def vessel_and_shell(labels, mask, vessel_label, tissue_labels, shell_voxels: int = 2):
    vessel = (labels == vessel_label) & mask
    shell = ndi.binary_dilation(vessel, iterations=shell_voxels) & ~vessel & np.isin(labels, tissue_labels) & mask
    return vessel, shell


# --------------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------------


def test_rss_combination():
    rng = np.random.default_rng(0)
    mag = rng.uniform(0, 2, (5, 6, 7, 3)).astype(np.float32)
    out = combine_magnitude_rss(mag)
    assert out.dtype == np.float32 and out.shape == (5, 6, 7)
    np.testing.assert_allclose(out, np.sqrt((mag.astype(np.float64) ** 2).sum(-1)), rtol=1e-6)
    np.testing.assert_array_equal(combine_magnitude_rss(mag[..., 0]), mag[..., 0])


def test_highpass_removes_smooth_in_plane_field_and_keeps_a_point_source():
    shape = (64, 64, 12)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    mask = np.ones(shape, bool)
    interior = (slice(17, 47), slice(17, 47), slice(None))  # beyond the kernel's reach (4 sigma) of the edge
    smooth = 0.5 * x - 0.3 * y + 2.0 * z  # linear in plane, any variation along the slice axis
    hp = highpass_field_hz(smooth, mask, 4.0, axis=2)
    assert hp.dtype == np.float32 and np.max(np.abs(hp[interior])) < 1e-3  # Hz, of a field spanning ~60 Hz
    spike = np.zeros(shape, np.float32)
    spike[32, 32, 6] = 10.0
    hp = highpass_field_hz(smooth + spike, mask, 4.0, axis=2)
    assert 9.8 < hp[32, 32, 6] < 10.0 and np.max(np.abs(hp[32, 32, [5, 7]])) < 1e-3  # no smoothing along z
    # the mask edge does not bias the low-pass (normalised smoothing), zero outside the mask
    mask[40:] = False
    hp = highpass_field_hz(np.full(shape, 7.0, np.float32), mask, 4.0)
    assert np.max(np.abs(hp)) < 1e-4
    with pytest.raises(ValueError, match="sigma_voxels"):
        highpass_field_hz(smooth, mask, 0.0)


def test_phase_weights_tanh_and_positive():
    mask = np.ones((10, 10, 10), bool)
    f = np.linspace(-5, 5, 1000, dtype=np.float32).reshape(10, 10, 10)
    w = phase_weights(f, mask)  # tanh, strength 4
    assert w.dtype == np.float32 and np.all((w >= 0) & (w <= 1))
    assert np.all(np.diff(w.ravel()) <= 1e-7)  # darker for more positive (paramagnetic) field
    g = np.ones((10, 10, 10), np.float32)  # median positive field 1 Hz -> m = 1 * 10/4 = 2.5 Hz
    g[0, 0, :4] = (0.0, 2.5, 5.0, -3.0)
    wg = phase_weights(g, mask)[0, 0, :4]
    np.testing.assert_allclose(wg, [(1 + np.tanh(1.0)) / 2, 0.5, (1 + np.tanh(-1.0)) / 2, (1 + np.tanh(2.2)) / 2],
                               atol=1e-6)  # 0.881, 0.5, 0.119, 0.988
    assert phase_weights(g, mask, strength=8.0)[0, 0, 1] < wg[1]  # a stronger mask is darker
    wp = phase_weights(f, mask, "positive", 4.0)
    assert np.all(wp[f <= 0] == 1.0)
    f_max = np.percentile(f[f > 0], 99.0)
    assert np.all(wp[f >= f_max] == 0.0)
    half = np.argmin(np.abs(f.ravel() - f_max / 2))
    assert wp.ravel()[half] == pytest.approx((1 - f.ravel()[half] / f_max) ** 4, rel=1e-4)  # Haacke: power 4
    assert np.all(phase_weights(-np.abs(f), mask) == 1.0)  # nothing positive: nothing darkened
    with pytest.raises(ValueError, match="unknown phase scaling"):
        phase_weights(f, mask, "negative")


def test_slice_axis_and_minimum_intensity_projection():
    unit = lambda v: np.asarray(v) / np.linalg.norm(v)  # noqa: E731
    assert slice_axis(unit((0.1, 0.2, 0.97))) == 2 and slice_axis(unit((0.95, 0.1, -0.3))) == 0
    img = np.ones((4, 5, 20), np.float32)
    img[2, 2, 10] = 0.2
    mip = minimum_intensity_projection(img, (1.0, 1.0, 2.0), axis=2, slab_mm=6.0)  # 3 slices
    assert mip.shape == img.shape and mip.dtype == np.float32
    assert np.all(mip[2, 2, 9:12] == np.float32(0.2)) and mip[2, 2, 8] == 1 and mip[2, 2, 12] == 1
    assert np.all(mip[1] == 1)
    mip = minimum_intensity_projection(img, (1.0, 1.0, 2.0), axis=2, slab_mm=16.0)  # 8 slices
    assert int((mip[2, 2] < 1).sum()) == 8
    np.testing.assert_array_equal(minimum_intensity_projection(img, (1, 1, 2), 2, 0.5), img)  # 1 slice
    with pytest.raises(ValueError, match="slab_mm"):
        minimum_intensity_projection(img, (1, 1, 2), 2, 0.0)


def test_swi_darkens_a_vessel_along_b0_of_the_shapes_phantom():
    """Sign check: the +0.40 ppm cylinder along B0 has a positive field in qsmprep's convention and turns
    dark (contrast x 2.78 measured, bound 2.5); the one across B0 has a negative field and is not darkened
    by the phase mask (the orientation dependence of SWI)."""
    ph = make_shapes_phantom(shape=(40, 40, 40), voxel_size_mm=(1.2, 1.2, 1.2), seed=1)
    sim = simulate_gre(ph, echo_times_s=(0.004, 0.008, 0.012, 0.016), b0_tesla=3.0, snr=100, seed=1)
    mask, labels = sim.brain_mask, sim.labels
    image, w = swi(sim.magnitude, sim.field_hz, mask, sim.b0_dir)
    rss = combine_magnitude_rss(sim.magnitude)
    along, shell = vessel_and_shell(labels, mask, 24, (8,))
    hp = highpass_field_hz(sim.field_hz, mask, 4.0, slice_axis(sim.b0_dir))
    assert np.mean(hp[along]) > 5.0  # Hz: paramagnetic along B0 -> positive field
    c_rss, c_swi = contrast(rss, along, shell), contrast(image, along, shell)
    assert c_rss > 0.3 and c_swi > 0.95 and c_swi >= 2.5 * c_rss
    across, _ = vessel_and_shell(labels, mask, 25, (8,))
    assert np.mean(hp[across]) < 0 and np.mean(w[across]) > 0.85
    assert np.all(image <= rss + 1e-6) and np.all(image >= 0)


# --------------------------------------------------------------------------------------------------
# R2*: the automatic choice and ARLO's accuracy
# --------------------------------------------------------------------------------------------------


def test_auto_rule_picks_arlo_for_equally_spaced_echoes_only():
    assert r2star_method_for("auto", (0.004, 0.008, 0.012, 0.016)) == "arlo"
    assert r2star_method_for("auto", (0.00492, 0.00984, 0.01477)) == "arlo"  # within 10 us rounding
    assert r2star_method_for("auto", (0.004, 0.008, 0.013, 0.016)) == "loglinear"  # 1 ms off
    assert r2star_method_for("auto", (0.004, 0.008)) == "loglinear"  # 2 echoes
    assert r2star_method_for("auto", (0.012, 0.008, 0.004)) == "loglinear"  # decreasing
    assert r2star_method_for("LogLinear", (0.004, 0.008, 0.012)) == "loglinear"  # explicit choices stay
    assert r2star_method_for("arlo", (0.004, 0.008, 0.013)) == "arlo"
    assert not echoes_equally_spaced((0.004, 0.008, 0.0121)) and echoes_equally_spaced((0.004, 0.008, 0.01203))
    assert QsmprepConfig().r2star_method == "auto"


def _shapes_sim(echo_times_s):
    ph = make_shapes_phantom(shape=(40, 40, 40), voxel_size_mm=(1.2, 1.2, 1.2), seed=1)
    return simulate_gre(ph, echo_times_s=echo_times_s, b0_tesla=3.0, snr=100, seed=1)


def test_arlo_r2star_against_the_simulator_truth():
    """ARLO on the shapes phantom (TE 4-16 ms, SNR 100): median relative error 4.9 % measured (bound 6 %),
    90th percentile 12.1 % (bound 15 %), median bias < 1 %; ``auto`` runs ARLO here and the log-linear fit
    for unequal spacing."""
    sim = _shapes_sim((0.004, 0.008, 0.012, 0.016))
    brain = sim.brain_mask & (sim.r2star_hz > 0)
    est, _ = fit_r2star(sim.magnitude, sim.echo_times_s, sim.brain_mask, "arlo")
    rel = (est[brain] - sim.r2star_hz[brain]) / sim.r2star_hz[brain]
    assert np.median(np.abs(rel)) < 0.06 and np.percentile(np.abs(rel), 90) < 0.15 and abs(np.median(rel)) < 0.01
    auto, _ = r2star_auto(sim.magnitude, sim.echo_times_s, sim.brain_mask)
    np.testing.assert_array_equal(auto, est)
    unequal = _shapes_sim((0.004, 0.008, 0.013, 0.016))
    auto, _ = r2star_auto(unequal.magnitude, unequal.echo_times_s, unequal.brain_mask)
    loglin, _ = fit_r2star(unequal.magnitude, unequal.echo_times_s, unequal.brain_mask, "loglinear")
    np.testing.assert_array_equal(auto, loglin)


def test_r2star_interface_records_the_method_used(tmp_path, monkeypatch):
    import nibabel as nib

    from qsmprep.interfaces.qsm import R2Star

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    r2 = rng.uniform(10, 40, (6, 6, 6)).astype(np.float32)
    for name, tes in (("equal", (0.004, 0.008, 0.012)), ("unequal", (0.004, 0.008, 0.013))):
        mag = np.exp(-r2[..., None] * np.asarray(tes, np.float32)).astype(np.float32)
        path = tmp_path / f"{name}.nii"
        nib.save(nib.Nifti1Image(mag, np.eye(4)), path)
        res = R2Star(magnitude=str(path), echo_times=list(tes), method="auto",
                     method_params={"reweight": True}).run()
        params = res.outputs.params
        if name == "equal":
            assert params["Method"] == "arlo" and params["MethodRequested"] == "auto"
            assert params["Parameters"] == {"max_r2star_hz": 1000.0}  # reweight applies to log-linear only
        else:
            assert params["Method"] == "loglinear" and params["Parameters"]["reweight"] is True
        np.testing.assert_allclose(nib.load(res.outputs.r2star).get_fdata(), r2, rtol=0.02)


def test_boilerplate_states_the_r2star_method_and_swi():
    from qsmprep.utils.boilerplate import build_boilerplate

    def run(subject, tes):
        return SimpleNamespace(subject=subject, echo_times_s=tes, field_strength_t=3.0)

    cfg = QsmprepConfig(r2star=True).validate()
    text = build_boilerplate(cfg, [run("01", (0.004, 0.008, 0.012))])
    assert "auto-regression on linear operations (ARLO)" in text and "log-linear" not in text
    text = build_boilerplate(cfg, [run("01", (0.004, 0.008, 0.013))])
    assert "weighted log-linear least-squares fit" in text and "ARLO" not in text
    text = build_boilerplate(cfg, [run("01", (0.004, 0.008, 0.012)), run("02", (0.004, 0.009, 0.012))])
    assert "(ARLO) [" in text and "for series with at least 3 equally spaced echoes, and a weighted log-linear" in text
    assert "Pei M" in text
    text = build_boilerplate(QsmprepConfig(swi=True, swi_minip_slab_mm=12.0).validate())
    assert "CLEAR-SWI [" in text and "12 mm slabs" in text and "Haacke EM" in text and "Eckstein K, Bachrata B" in text


def test_swi_options_are_checked():
    from qsmprep.cli.parser import parse_config

    cfg = parse_config(["/b", "/o", "participant", "--swi", "--swi-minip-slab-mm", "8", "--swi-phase-scaling",
                        "positive", "--swi-phase-strength", "3"])
    assert (cfg.swi, cfg.swi_minip_slab_mm, cfg.swi_phase_scaling, cfg.swi_phase_strength) == (True, 8.0, "positive", 3.0)
    d = QsmprepConfig()
    assert (d.swi, d.swi_minip_slab_mm, d.swi_phase_scaling, d.swi_phase_strength) == (False, 16.0, "tanh", 4.0)
    with pytest.raises(InputError, match="--swi-phase-scaling"):
        QsmprepConfig(swi_phase_scaling="negative").validate()
    with pytest.raises(InputError, match="--swi-minip-slab-mm"):
        QsmprepConfig(swi_minip_slab_mm=0.0).validate()
    with pytest.raises(SystemExit):
        parse_config(["/b", "/o", "participant", "--swi-minip-slab-mm", "-1"])


def test_swi_nodes_and_sinks_are_built_only_with_swi(tiny_runs, tmp_path):
    from qsmprep.workflows.qsm import init_qsm_wf

    for swi_on in (False, True):
        cfg = QsmprepConfig(output_dir=tmp_path / "out", swi=swi_on)
        wf = init_qsm_wf(tiny_runs["multi"], cfg)
        names = set(wf.list_node_names())
        assert ("swi" in names) == swi_on
        assert ("ds_qsm_wf.ds_swi" in names) == swi_on and ("ds_qsm_wf.ds_minip" in names) == swi_on
    node = init_qsm_wf(tiny_runs["complex"], QsmprepConfig(swi=True, swi_minip_slab_mm=8.0)).get_node("swi")
    assert node.inputs.minip_slab_mm == 8.0 and node.inputs.phase_scaling == "tanh"


# --------------------------------------------------------------------------------------------------
# head phantom and the whole App (integration)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_sim(head_phantom_2mm):
    return simulate_gre(head_phantom_2mm, echo_times_s=HEAD_TES, b0_tesla=3.0, snr=100, seed=0)


@pytest.mark.integration
def test_swi_and_minip_vein_contrast_on_the_head_phantom(head_sim):
    """Veins against the WM/GM around them (measured: SWI x 1.38 echo 1 and x 1.06 RSS; minIP x 2.78 echo 1
    and x 1.73 the minIP of the RSS magnitude; bounds 1.3, 1.03, 2.5, 1.6)."""
    sim = head_sim
    vein, shell = vessel_and_shell(sim.labels, sim.brain_mask, 11, (8, 9))
    assert vein.sum() > 500 and shell.sum() > 1000
    axis = slice_axis(sim.b0_dir)
    rss = combine_magnitude_rss(sim.magnitude)
    image, _ = swi(sim.magnitude, sim.field_hz, sim.brain_mask, sim.b0_dir)
    minip = minimum_intensity_projection(image, sim.voxel_size_mm, axis, 16.0)
    rss_minip = minimum_intensity_projection(rss, sim.voxel_size_mm, axis, 16.0)
    c_e1, c_rss = contrast(sim.magnitude[..., 0], vein, shell), contrast(rss, vein, shell)
    c_swi, c_minip = contrast(image, vein, shell), contrast(minip, vein, shell)
    assert c_e1 > 0.25 and c_swi > 0  # veins darker than tissue in all
    assert c_swi >= 1.3 * c_e1 and c_swi >= 1.03 * c_rss
    assert c_minip >= 2.5 * c_e1 and c_minip >= 1.6 * contrast(rss_minip, vein, shell)


@pytest.mark.integration
def test_arlo_r2star_on_the_head_phantom(head_sim):
    """Measured: median relative error 4.7 %, 90th percentile 13.7 % (bounds 6 %, 16 %)."""
    sim = head_sim
    assert r2star_method_for("auto", sim.echo_times_s) == "arlo"
    brain = sim.brain_mask & (sim.r2star_hz > 0)
    est, _ = r2star_auto(sim.magnitude, sim.echo_times_s, sim.brain_mask)
    rel = np.abs(est[brain] - sim.r2star_hz[brain]) / sim.r2star_hz[brain]
    assert np.median(rel) < 0.06 and np.percentile(rel, 90) < 0.16


@pytest.mark.integration
def test_swi_outputs_of_the_app_pass_the_bids_validator(shapes_bids, tmp_path):
    from qsmprep.cli.run import main

    bids, _, sim = shapes_bids()
    out = tmp_path / "out"
    rc = main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"), "--nprocs", "1",
               "--bgremove", "vsharp", "--inversion", "tkd", "--swi", "--r2star", "--skip-bids-validation"])
    assert rc == 0
    anat = next(out.rglob("anat"))
    swi_file, minip_file = next(anat.glob("*_desc-swi_T2starw.nii.gz")), next(anat.glob("*_desc-minIP_T2starw.nii.gz"))
    import nibabel as nib

    image, minip = nib.load(swi_file).get_fdata(), nib.load(minip_file).get_fdata()
    assert image.shape == sim.magnitude.shape[:3] and np.all(minip <= image + 1e-4)
    along, shell = vessel_and_shell(sim.labels, sim.brain_mask, 24, (8,))
    assert contrast(image, along, shell) > 0.9  # the cylinder along B0 is dark in the App's SWI too
    for f in (swi_file, minip_file):
        meta = json.loads(f.with_name(f.name.replace(".nii.gz", ".json")).read_text())
        assert meta["SkullStripped"] is False and meta["Units"] == "arbitrary"
        step = meta["ProcessingSteps"]["SWI"]
        assert step["Parameters"]["phase_scaling"] == "tanh" and step["Parameters"]["minip_slab_mm"] == 16.0
        assert step["Parameters"]["minip_slices"] == 13 and step["Parameters"]["highpass_sigma_voxels"] == 4.0
        assert any("CLEAR-SWI" in r for r in meta["EstimationReference"])
    r2 = json.loads(next(anat.glob("*_R2starmap.json")).read_text())
    assert r2["ProcessingSteps"]["R2starFit"]["Method"] == "arlo" and r2["EstimationAlgorithm"].startswith("ARLO")
    assert "CLEAR-SWI" in (out / "logs" / "CITATION.md").read_text()
    validator = shutil.which("bids-validator-deno")
    if validator:
        proc = subprocess.run([validator, str(out), "--json"], capture_output=True, text=True, timeout=300)
        issues = json.loads(proc.stdout)["issues"]["issues"]
        errors = sorted({(i["code"], i.get("location", "")) for i in issues if i["severity"] == "error"})
        assert not errors, errors
