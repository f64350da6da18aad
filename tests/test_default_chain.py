"""The default chain against the classical reference on heads of two anatomies (2 mm, full chain).

The issue "Accuracy on heads we did not make" asks that the default chain's deep grey-matter NRMSE be no
worse than V-SHARP + RTS's on every anatomy and that its per-nucleus mean bias stay within 0.015 ppm on
anatomies it was not built on. ``benchmarks/bench_anatomies.py`` measures this at 1 mm through the BIDS
App; this is the fast version on 2 mm grids through the same registered functions the workflow calls
(bet-phase mask, MCPC-3D-S, ROMEO, weighted B0 fit, background removal, inversion), scored as the
benchmark does: in the true brain mask, both maps demeaned there, zeros outside the output mask counted
as errors. The Zubal head needs the data of ``$QSMPREP_ZUBAL_DIR`` (or ../shared/data/zubal), not
shipped: without them that case skips.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmprep.config import QsmprepConfig
from qsmprep.methods import STAGES
from qsmprep.qsm import metrics
from qsmprep.qsm.constants import hz_to_ppm
from qsmprep.qsm.multiecho import fit_b0_hz, mcpc3ds
from qsmprep.qsm.unwrap import romeo_unwrap_multiecho
from qsmprep.simulate import simulate_gre, texture_phantom

pytestmark = pytest.mark.integration

NUCLEI = {1: "caudate", 2: "pallidum", 3: "putamen", 4: "red nucleus", 5: "dentate", 6: "SN", 7: "thalamus"}
#: per-nucleus |mean bias| bound (ppm) of the default chain: the issue's (measured: see
#: test_default_chain_beats_vsharp_rts)
BIAS_BOUND_PPM = 0.015


def _run_chain(sim, mask, bgremove: str, inversion: str) -> tuple[np.ndarray, np.ndarray]:
    te, vs, b0 = sim.echo_times_s, sim.voxel_size_mm, sim.b0_dir
    corrected, _ = mcpc3ds(sim.phase_rad, sim.magnitude, te, vs, mask=mask)
    unwrapped = romeo_unwrap_multiecho(corrected, te, sim.magnitude, mask=mask)
    total_ppm = hz_to_ppm(fit_b0_hz(unwrapped, te, sim.magnitude, mask=mask), sim.b0_tesla)
    local, out_mask = STAGES["bgremove"].method(bgremove).function(np.where(mask, total_ppm, 0).astype(np.float32),
                                                                     mask, vs, b0)
    method = STAGES["inversion"].method(inversion)
    data = {"magnitude": sim.magnitude} if "magnitude" in method.data_args else {}  # MEDI's edge weighting
    chi = method.function(local, out_mask, vs, b0, **data)
    return np.asarray(chi, np.float32), np.asarray(out_mask, bool)


def _score(chi, sim) -> dict[str, float]:
    brain = sim.brain_mask.astype(bool)
    x = np.where(brain, chi, 0.0) - chi[brain].mean()
    t = np.where(brain, sim.chi_ppm, 0.0) - sim.chi_ppm[brain].mean()
    dgm = np.isin(sim.labels, list(NUCLEI)) & brain
    out = {"NRMSE": metrics.nrmse(x, t, brain), "DGM NRMSE": metrics.nrmse(x, t, dgm)}
    for lab, name in NUCLEI.items():
        m = (sim.labels == lab) & brain
        if m.sum() >= 5:
            out[name] = float(x[m].mean() - t[m].mean())
    return out


@pytest.fixture(scope="module", params=["mni", "zubal", "zubal-deformed"])
def head_sim(request):
    if request.param == "mni":
        ph = texture_phantom(request.getfixturevalue("head_phantom_2mm"), seed=301)
        return "mni", simulate_gre(ph, b0_tesla=3.0, snr=50.0, seed=301)
    if request.param == "zubal-deformed":  # red nucleus, SN and dentate grafted in; axial B0, where they were worst
        from qsmprep.simulate.deform import make_deformed_zubal_phantom

        ph = make_deformed_zubal_phantom(request.getfixturevalue("zubal_dir"), seed=301, downsample=2, texture=True)
        return "zubal-deformed", simulate_gre(ph, b0_tesla=3.0, snr=50.0, seed=301)
    ph = request.getfixturevalue("zubal_phantom_2mm")
    return "zubal", simulate_gre(ph, b0_tesla=7.0, echo_times_s=(0.003, 0.006, 0.009, 0.012), tilt_deg=20.0,
                                 snr=50.0, seed=301)


def test_default_chain_beats_vsharp_rts(head_sim):
    """Default (PDF + MEDI-TV) vs V-SHARP + RTS from the same mask and B0 map. Measured at 2 mm (NRMSE / DGM
    NRMSE %, worst per-nucleus |bias|): MNI (textured, 3 T, axial; mask Dice 0.991) 64.5 / 25.1, 0.005 ppm (SN)
    vs 82.0 / 38.6, 0.029 ppm (pallidum); Zubal (textured, lesions, 7 T, 20 deg oblique; Dice 0.966) 74.9 /
    31.9, 0.006 ppm (thalamus) vs 80.2 / 60.2, 0.035 ppm (pallidum); deformed Zubal (textured, 3 T, axial;
    Dice 0.974) 83.3 / 28.0, 0.010 ppm (SN) vs 90.6 / 44.7, 0.042 ppm (SN). (MEDI-TV with the unweighted
    data term, the default before: 67.2 / 25.5, 0.003; 75.4 / 34.6, 0.005; red nucleus -0.017 on the
    deformed head.)"""
    name, sim = head_sim
    cfg = QsmprepConfig()
    assert (cfg.bgremove, cfg.inversion) == ("pdf", "medi-tv")
    mask = np.asarray(STAGES["masking"].method(cfg.masking).function(
        phase_rad_4d=sim.phase_rad, magnitude_4d=sim.magnitude, echo_times_s=sim.echo_times_s,
        voxel_size_mm=sim.voxel_size_mm), bool)
    dice = 2.0 * np.count_nonzero(mask & sim.brain_mask) / (mask.sum() + sim.brain_mask.sum())
    assert dice >= 0.95, f"{name}: brain-mask Dice {dice:.3f}"
    default, _ = _run_chain(sim, mask, cfg.bgremove, cfg.inversion)
    reference, _ = _run_chain(sim, mask, "vsharp", "rts")
    d, r = _score(default, sim), _score(reference, sim)
    assert d["DGM NRMSE"] <= r["DGM NRMSE"], f"{name}: default {d}, V-SHARP + RTS {r}"
    assert d["NRMSE"] <= r["NRMSE"], f"{name}: default {d}, V-SHARP + RTS {r}"
    biases = {k: v for k, v in d.items() if k in NUCLEI.values()}
    assert biases and max(abs(v) for v in biases.values()) <= BIAS_BOUND_PPM, f"{name}: {biases}"
