"""Accuracy of the SHIPPED neural QSM models (qsmprep/data/models) on a held-out simulated head.

Case: ``make_head_phantom(downsample=2, seed=101)`` (2 mm; the networks were trained on seed 0 at
1 mm), noise-free ``simulate_gre`` at 3 T with axial B0, cropped to a 96 x 80 x 64 mm box around the
left basal ganglia that reaches the lateral brain surface. The fields are those of the cropped
problem: the local field is the field of ``chi * mask`` of the crop alone (computed like the
simulator's, 48 mm zero padding) and the background is everything else (the rest of the brain, skull,
air, shim), i.e. ``total_field_crop - local``. DeepQSM and the background U-Net resample the 2 mm data
to their 1 mm B0-aligned grid and back, the VarNet runs on the 2 mm grid with its true dipole kernel; the
learned background removal (PDF alternated with the VarNet as its chi prior) also runs on the 2 mm grid.
Errors are demeaned NRMSE (%) in the crop's brain mask (:func:`qsmprep.qsm.metrics.nrmse`).

The tests skip (only) when the shipped model files are absent. ``QSMPREP_TEST_MODEL_DIR`` points
them at another model directory (to re-measure the bounds for new weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import qsmprep.nn.models as nn_models
from qsmprep.nn.inference import NEXTQSM_BG_RIM_MM, deepqsm, nextqsm_bgremove, nextqsm_inversion
from qsmprep.qsm import metrics
from qsmprep.qsm.geometry import forward_field_ppm
from qsmprep.qsm.inversion import tkd
from qsmprep.qsm.masking import erode_mask_mm
from qsmprep.simulate import make_head_phantom, simulate_gre

pytestmark = pytest.mark.integration

SHIPPED_DIR = Path(nn_models.__file__).resolve().parent.parent / "data" / "models"
MODEL_DIR = Path(os.environ.get("QSMPREP_TEST_MODEL_DIR") or SHIPPED_DIR)
MODELS = ("deepqsm", "nextqsm-varnet")

#: crop (2 mm voxels) of the downsample-2 head: left basal ganglia to the left lateral brain surface
CROP = (slice(8, 56), slice(44, 84), slice(30, 62))
#: the same region of the full-size (1 mm) head: the networks' training resolution
CROP_1MM = tuple(slice(2 * c.start, 2 * c.stop) for c in CROP)

# Bounds (NRMSE %, noise-free crop), measured with the shipped weights (`python tests/test_nn_accuracy.py`):
# 2 mm crop: TKD 43.2, DeepQSM (TKD-primed U-Net, 4500 steps, + data-consistency step) 38.5, VarNet (the
# GPU-trained v2 weights of 2026-12-04: width 10, 6 steps, exact data consistency) 48.0 (the previous width-8,
# 5-step VarNet: 51.8). 1 mm crop (the networks' training resolution): TKD 45.1, DeepQSM 33.8, VarNet 43.5
# (previous: 47.1, worse than TKD on this crop, whose brain is cut by the box). Deep-GM slopes on the 1 mm crop:
# DeepQSM 1.03, VarNet 1.07 (previous 1.03). The learned background removal restores the smooth, brain-wide
# part of the local field that PDF loses, so its accuracy is measured on the whole held-out head at 2 mm (BGNET_MARGIN_PP below); on the
# crop, whose brain is cut by the box, only its plumbing (dtype, mask, linearity, determinism) is tested.
DEEPQSM_MARGIN_PP = 2.0  # DeepQSM must beat TKD (default threshold) by at least this many points
VARNET_MAX_NRMSE = 53.0  # measured 48.0 x 1.1 (previous VarNet: 51.8, bound 57.0)
BGNET_MAX_NRMSE = 60.0  # learned removal on the crop (default 2 mm rim): measured 47.2 (previous VarNet 51.2)
#: whole held-out head (seed 101, 2 mm, noise-free, true brain mask, rim kept): the learned background
#: removal must beat PDF, its classical starting point, by this many points. Measured 34.0 % against PDF's
#: 52.8 % (with the previous VarNet as its prior: 34.5 %). (The PDF-guided background U-Net trained here, not
#: shipped, failed it: 53.5 %.)
BGNET_MARGIN_PP = 10.0
#: 1 mm crop: DeepQSM must beat TKD by this many points (measured 11.3); the VarNet must stay within its
#: regression bound (measured 43.5 x 1.1; previous VarNet 47.1, bound 52.0)
DEEPQSM_MARGIN_1MM_PP = 5.0
VARNET_MAX_NRMSE_1MM = 48.0
DGM_SLOPE_RANGE = (0.9, 1.1)
#: test key -> model name
KEYS = {"deepqsm": "deepqsm", "varnet": "nextqsm-varnet", "bg": "nextqsm-varnet"}


def _missing() -> list[str]:
    return [m for m in MODELS if not ((MODEL_DIR / f"{m}.pt").is_file() and (MODEL_DIR / f"{m}.json").is_file())]


def _need(key: str) -> None:
    if KEYS[key] in _missing():
        pytest.skip(f"model {KEYS[key]} not shipped in {MODEL_DIR}")


@pytest.fixture(scope="module")
def models_dir() -> str:
    if len(_missing()) == len(MODELS):
        pytest.skip(f"no model files in {MODEL_DIR}")
    return str(MODEL_DIR)


def _make_case(downsample: int = 2) -> dict:
    ph = make_head_phantom(downsample=downsample, seed=101)
    sim = simulate_gre(ph, echo_times_s=(0.004, 0.02), b0_tesla=3.0, snr=None, seed=1101)
    crop = CROP if downsample == 2 else CROP_1MM
    chi = np.ascontiguousarray(sim.chi_ppm[crop])
    mask = np.ascontiguousarray(sim.brain_mask[crop])
    vs, b0 = tuple(sim.voxel_size_mm), tuple(sim.b0_dir)
    pad = [int(np.ceil(48.0 / v)) for v in vs]
    local = (forward_field_ppm(np.where(mask, chi, np.float32(0.0)), vs, b0, pad) * mask).astype(np.float32)
    total = np.ascontiguousarray(sim.total_field_ppm[crop])
    labels = np.ascontiguousarray(ph.labels[crop])
    return {"chi": chi, "mask": mask, "local": local, "total": total, "vs": vs, "b0": b0, "labels": labels}


def _run_networks(c: dict, models_dir: str) -> dict:
    absent, out = set(_missing()), {}
    if "deepqsm" not in absent:
        out["deepqsm"] = deepqsm(c["local"], c["mask"], c["vs"], c["b0"], device="cpu", model_dir=models_dir)
    if "nextqsm-varnet" not in absent:
        out["varnet"] = nextqsm_inversion(c["local"], c["mask"], c["vs"], c["b0"], device="cpu", model_dir=models_dir)
    if "nextqsm-varnet" not in absent:  # the learned background removal uses the VarNet as its prior
        out["bg"], out["bg_mask"] = nextqsm_bgremove(c["total"], c["mask"], c["vs"], c["b0"], device="cpu",
                                                     model_dir=models_dir)
    return out


@pytest.fixture(scope="module")
def case():
    return _make_case()


@pytest.fixture(scope="module")
def outputs(case, models_dir):
    return _run_networks(case, models_dir)


def _errors(case, out) -> dict[str, float]:
    m = case["mask"]
    chi_t = tkd(case["local"], m, case["vs"], case["b0"])
    err = {"tkd": metrics.nrmse(chi_t, case["chi"], m)}
    for key in ("deepqsm", "varnet"):
        if key in out:
            err[key] = metrics.nrmse(out[key], case["chi"], m)
    if "bg" in out:
        err["bg"] = metrics.nrmse(out["bg"], case["local"], out["bg_mask"])
    return err


@pytest.fixture(scope="module")
def case_1mm():
    return _make_case(downsample=1)


@pytest.fixture(scope="module")
def outputs_1mm(case_1mm, models_dir):
    return _run_networks(case_1mm, models_dir)


def test_case_is_meaningful(case, models_dir):
    m = case["mask"]
    assert 0.5 * m.size < m.sum() < m.size  # the crop holds brain and the brain surface
    assert np.linalg.norm((case["total"] - case["local"])[m]) > 3 * np.linalg.norm(case["local"][m])


def test_deepqsm_beats_tkd(case, outputs):
    _need("deepqsm")
    err = _errors(case, outputs)
    deep, ref = err["deepqsm"], err["tkd"]
    assert deep < ref - DEEPQSM_MARGIN_PP, f"DeepQSM {deep:.1f} % vs TKD {ref:.1f} %"


def test_networks_at_their_training_resolution(case_1mm, outputs_1mm):
    """1 mm crop (the resolution the networks were trained at): DeepQSM beats TKD, the VarNet stays within its
    bound, and both get the deep grey-matter contrast right (slope of nucleus means in [0.9, 1.1])."""
    present = [k for k in ("deepqsm", "varnet") if k in outputs_1mm]
    if not present:
        pytest.skip("no learned inversion shipped")
    c, m = case_1mm, case_1mm["mask"]
    err = _errors(c, outputs_1mm)
    if "deepqsm" in present:
        assert err["deepqsm"] < err["tkd"] - DEEPQSM_MARGIN_1MM_PP, f"DeepQSM {err['deepqsm']:.1f} vs TKD {err['tkd']:.1f} %"
    if "varnet" in present:
        assert err["varnet"] < VARNET_MAX_NRMSE_1MM, f"VarNet {err['varnet']:.1f} %"
    for key in present:
        slope = metrics.dgm_slope(outputs_1mm[key], c["chi"], m, c["labels"], label_values=range(1, 8), min_voxels=50)
        assert DGM_SLOPE_RANGE[0] <= slope <= DGM_SLOPE_RANGE[1], f"{key} deep-GM slope {slope:.2f}"


def test_varnet_accuracy(case, outputs):
    _need("varnet")
    err = _errors(case, outputs)["varnet"]
    assert err < VARNET_MAX_NRMSE, f"VarNet NRMSE {err:.1f} %"


def _head_bg_errors(models_dir: str) -> dict[str, float]:
    """Local-field NRMSE (%) of the learned background removal and of PDF, its classical starting point,
    on the whole held-out head (seed 101, 2 mm grid, noise-free) in the true brain mask; the mask is the
    true one, so its rim is kept (``rim_mm=0``: the default drops it for estimated masks)."""
    from qsmprep.qsm.registry import BGREMOVE

    sim = simulate_gre(make_head_phantom(downsample=2, seed=101), echo_times_s=(0.004, 0.02), b0_tesla=3.0,
                       snr=None, seed=1101)
    m, vs, b0 = sim.brain_mask, tuple(sim.voxel_size_mm), tuple(sim.b0_dir)
    local_p, _ = BGREMOVE.get("pdf")(sim.total_field_ppm, m, vs, b0)
    local_n, m_n = nextqsm_bgremove(sim.total_field_ppm, m, vs, b0, device="cpu", model_dir=models_dir, rim_mm=0)
    np.testing.assert_array_equal(m_n, m)
    return {"prior": metrics.nrmse(local_p, sim.local_field_ppm, m), "bg": metrics.nrmse(local_n, sim.local_field_ppm, m)}


def test_background_net_accuracy(case, outputs, models_dir):
    """The learned background removal beats PDF, its classical starting point, on a whole held-out head."""
    _need("bg")
    err = _errors(case, outputs)
    assert err["bg"] < BGNET_MAX_NRMSE, f"learned background removal: local-field NRMSE on the crop {err['bg']:.1f} %"
    np.testing.assert_array_equal(outputs["bg_mask"], erode_mask_mm(case["mask"], case["vs"], NEXTQSM_BG_RIM_MM))
    head = _head_bg_errors(models_dir)
    assert head["bg"] < head["prior"] - BGNET_MARGIN_PP, (
        f"learned background removal {head['bg']:.1f} % vs PDF {head['prior']:.1f} % on the whole held-out head")


@pytest.mark.parametrize("key", ["deepqsm", "varnet", "bg"])
def test_outputs_float32_same_shape_zero_outside_mask(case, outputs, key):
    _need(key)
    y = outputs[key]
    assert y.dtype == np.float32 and y.shape == case["mask"].shape
    assert np.all(np.isfinite(y))
    assert not np.any(y[~case["mask"]])
    assert np.any(y[case["mask"]])


#: ``y(2 f) / y(f)`` (RMS in the mask, demeaned) must lie in this range: dipole inversion and background
#: removal are linear in the field. A network that normalises its input away (e.g. bias-free convolutions
#: with GroupNorm and no rescaling wrapper) gives 1.0 and fails.
SCALE_RATIO_RANGE = (1.7, 2.3)
#: the VarNet's learned regulariser is not homogeneous: measured 2.11 with the shipped weights (previous VarNet 2.18) (a
#: regression guard; the linearity acceptance is measured on lesions in benchmarks/bench_neural.py)
VARNET_SCALE_RATIO_RANGE = (1.5, 3.0)


@pytest.mark.parametrize("key", ["deepqsm", "varnet", "bg"])
def test_outputs_scale_with_the_field(case, outputs, models_dir, key):
    _need(key)
    c, m = case, case["mask"]
    if key == "deepqsm":
        y2 = deepqsm(2 * c["local"], m, c["vs"], c["b0"], device="cpu", model_dir=models_dir)
    elif key == "varnet":
        y2 = nextqsm_inversion(2 * c["local"], m, c["vs"], c["b0"], device="cpu", model_dir=models_dir)
    else:
        y2 = nextqsm_bgremove(2 * c["total"], m, c["vs"], c["b0"], device="cpu", model_dir=models_dir)[0]
    y1 = outputs[key]
    ratio = float(np.std(y2[m]) / np.std(y1[m]))
    lo, hi = VARNET_SCALE_RATIO_RANGE if key == "varnet" else SCALE_RATIO_RANGE
    assert lo < ratio < hi, f"{key}: output RMS ratio {ratio:.3f} for 2x the input"


def test_deterministic_on_cpu(case, outputs, models_dir):
    c = case
    again = _run_networks(c, models_dir)
    for key, y in again.items():
        np.testing.assert_array_equal(y, outputs[key], err_msg=key)


if __name__ == "__main__":  # print the measured values (to set the bounds above)
    import time

    if len(_missing()) == len(MODELS):
        raise SystemExit(f"no model files in {MODEL_DIR}")
    t0 = time.perf_counter()
    c = _make_case()
    t1 = time.perf_counter()
    o = _run_networks(c, str(MODEL_DIR))
    t2 = time.perf_counter()
    print(f"model dir {MODEL_DIR}; case {t1 - t0:.1f} s, networks {t2 - t1:.1f} s")
    for k, v in _errors(c, o).items():
        print(f"{k:8s} NRMSE {v:6.1f} %")
    if "bg" in o:
        for k, v in _head_bg_errors(str(MODEL_DIR)).items():
            print(f"whole head, background: {k:14s} NRMSE {v:6.1f} %")
    m, d = c["mask"], str(MODEL_DIR)
    twice = _run_networks({**c, "local": 2 * c["local"], "total": 2 * c["total"]}, d)
    twice.pop("bg_mask", None)
    for k, y in twice.items():
        print(f"{k:8s} output RMS ratio for 2x the input {np.std(y[m]) / np.std(o[k][m]):.3f}")


#: uQSM test-time refinement of the VarNet on this case (20 Adam steps, lr 1e-3): measured NRMSE 48.0 -> 42.1 %,
#: field residual 0.232 -> 0.126 (x 0.54; the test asks < x 0.6) (TKD: 43.2 %; previous VarNet 51.8 -> 42.7 %).
SELF_SUPERVISED_STEPS = 20
SELF_SUPERVISED_MAX_NRMSE = 45.5  # 42.1 x 1.08 (previous VarNet: 42.7 x 1.08 = 46.0)


def test_self_supervised_refinement_fits_the_field_and_improves_accuracy(case, outputs, models_dir):
    _need("varnet")
    from qsmprep.qsm.geometry import forward_field_ppm

    c, m = case, case["mask"]

    def residual(chi):
        r = (forward_field_ppm(chi * m, c["vs"], c["b0"], 16) - c["local"])[m]
        return np.linalg.norm(r - r.mean()) / np.linalg.norm(c["local"][m])

    tuned = nextqsm_inversion(c["local"], m, c["vs"], c["b0"], device="cpu", model_dir=models_dir,
                              self_supervised_steps=SELF_SUPERVISED_STEPS)
    assert residual(tuned) < 0.6 * residual(outputs["varnet"])
    err = metrics.nrmse(tuned, c["chi"], m)
    assert err < SELF_SUPERVISED_MAX_NRMSE, f"refined VarNet NRMSE {err:.1f} %"
    # deterministic on the CPU: two short refinements (the same code path, 2 Adam steps) agree bit for bit
    short = [nextqsm_inversion(c["local"], m, c["vs"], c["b0"], device="cpu", model_dir=models_dir,
                               self_supervised_steps=2) for _ in range(2)]
    np.testing.assert_array_equal(short[0], short[1])
    assert not np.array_equal(short[0], outputs["varnet"])  # the refinement changed the output
    with pytest.raises(ValueError, match="self_supervised_steps"):
        nextqsm_inversion(c["local"], m, c["vs"], c["b0"], device="cpu", model_dir=models_dir, self_supervised_steps=-1)
