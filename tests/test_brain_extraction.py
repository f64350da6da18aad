"""BET-style brain extraction (qsmprep.qsm.brain_extraction) on synthetic heads: a bright brain inside a
dark skull shell inside a bright scalp shell, in air; and the ``bet``/``bet-phase`` masking entries."""

import nibabel as nib
import numpy as np
import pytest
from helpers import TWO_PI, dice, save_nifti

from qsmprep.qsm import brain_extraction as be
from qsmprep.qsm import masking as mk
from qsmprep.qsm.registry import MASKING

TE = (0.004, 0.008, 0.012)
BRAIN_AXES_MM = np.array([60.0, 72.0, 56.0])


def _synthetic_head(voxel_size_mm=(2.0, 2.0, 2.0), fov_mm=(176.0, 200.0, 168.0), snr=40.0, seed=0):
    """Brain ellipsoid (M0 0.8, a brighter 2 mm CSF rim, a dark 'vein'), 6 mm skull (no signal), 6 mm fat/scalp
    (M0 1.0), a neck block under the skull (M0 0.6), air; multi-echo magnitude and phase with noise.
    Geometry in millimetres, so anisotropic voxels sample the same head."""
    rng = np.random.default_rng(seed)
    vs = np.asarray(voxel_size_mm, float)
    shape = tuple(round(f / v) for f, v in zip(fov_mm, vs))
    x, y, z = (np.arange(n) * v - (n - 1) * v / 2 for n, v in zip(shape, vs))
    x, y, z = np.meshgrid(x, y, z + 10.0, indexing="ij", sparse=True)  # brain centre 10 mm above the FOV centre

    def ell(extra_mm):
        a = BRAIN_AXES_MM + extra_mm
        return (x / a[0]) ** 2 + (y / a[1]) ** 2 + (z / a[2]) ** 2 < 1.0

    brain = ell(0.0)
    skull = ell(7.0) & ~brain
    head = ell(13.0)
    neck = ((x / 40.0) ** 2 + ((y + 10.0) / 45.0) ** 2 < 1.0) & (z < -30.0)
    m0 = np.zeros(shape, np.float32)
    m0[head | neck] = 1.0
    m0[neck & ~head] = 0.6
    m0[skull] = 0.0
    m0[brain] = 0.8
    m0[brain & ~ell(-2.0)] = 0.95  # CSF rim
    # a foramen: a 8 mm tissue channel through the frontal skull links brain and scalp (as nerves and
    # vessels do in real heads), so that a threshold's largest component no longer stops at the skull
    m0[skull & (x**2 + (z + 15.0) ** 2 < 4.0**2) & (y > 0)] = 0.7
    vein = (x - 20.0) ** 2 + (y + 15.0) ** 2 + z**2 < 6.0**2
    m0[vein] = 0.2
    f_hz = 0.3 * x + 0.002 * y * z
    mag = np.empty(shape + (len(TE),), np.float32)
    ph = np.empty_like(mag)
    for e, t in enumerate(TE):
        s = m0 * np.exp(-20.0 * t) * np.exp(1j * (0.5 + TWO_PI * f_hz * t))
        s = s + (0.8 / snr) * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
        mag[..., e] = np.abs(s)
        ph[..., e] = np.angle(s)
    return dict(mag=mag, phase=ph, brain=brain, head=head | neck, vs=tuple(vs))


@pytest.fixture(scope="module")
def head2():
    return _synthetic_head()


def test_icosphere_is_a_closed_outward_unit_sphere():
    for k in (0, 1, 4):
        v, f = be.icosphere(k)
        assert v.shape == (10 * 4**k + 2, 3) and f.shape == (20 * 4**k, 3)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-12)
        edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
        _, counts = np.unique(edges, axis=0, return_counts=True)
        assert np.all(counts == 2)  # closed: every edge shared by two faces
        assert len(v) - len(counts) + len(f) == 2  # Euler characteristic of a sphere
        n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
        assert np.all(np.einsum("ij,ij->i", n, v[f].mean(axis=1)) > 0)  # counter-clockwise from outside
    with pytest.raises(ValueError, match="subdivisions"):
        be.icosphere(8)


@pytest.mark.parametrize("vs", [(1.0, 1.0, 1.0), (0.8, 1.0, 2.0)])
def test_mesh_to_mask_fills_a_sphere(vs):
    v, f = be.icosphere(4)
    shape = tuple(int(64 / s) for s in vs)
    centre = np.array([31.7, 32.2, 30.9])
    m = be.mesh_to_mask(centre + 20.0 * v, f, shape, vs)
    grid = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, vs)), indexing="ij", sparse=True)
    exact = sum((g - c) ** 2 for g, c in zip(grid, centre)) < 20.0**2
    assert dice(m, exact) > 0.99  # the polyhedron is inscribed: slightly smaller than the sphere
    assert m.sum() <= exact.sum()
    # a mesh partly outside the grid is cut at the border
    m2 = be.mesh_to_mask(np.array([10.0, 32.0, 32.0]) + 20.0 * v, f, (64, 64, 64))
    assert m2[0].any() and m2[:, :, 32].sum() > 0


def test_bet_keeps_the_brain_and_drops_skull_and_scalp(head2):
    h = head2
    m = be.bet_mask(h["mag"], h["vs"])
    assert m.dtype == bool and m.shape == h["brain"].shape
    assert dice(m, h["brain"]) >= 0.95
    assert np.count_nonzero(m & ~h["brain"]) < 0.05 * h["brain"].sum()  # no scalp, skull or neck
    assert np.array_equal(m, be.bet_mask(h["mag"], h["vs"]))  # deterministic
    # the magnitude threshold keeps the scalp, through the foramen
    assert dice(mk.magnitude_mask(h["mag"], erosions=0), h["brain"]) < 0.9


def test_bet_anisotropic_voxels():
    h = _synthetic_head(voxel_size_mm=(1.6, 2.0, 3.0))
    m = be.bet_mask(h["mag"], h["vs"])
    assert dice(m, h["brain"]) >= 0.95
    # the same head in 2 mm voxels gives the same volume (mm^3) within 3 %
    vol = m.sum() * np.prod(h["vs"])
    assert abs(vol - h["brain"].sum() * np.prod(h["vs"])) < 0.05 * vol


def test_bet_on_a_slab(head2):
    """A slab (partial coverage, as many QSM acquisitions): the mask reaches the first and last slices."""
    h = head2
    sl = np.s_[:, :, 40:64]
    m = be.bet_mask(h["mag"][sl], h["vs"])
    assert dice(m, h["brain"][sl]) >= 0.95
    assert dice(m[..., 0], h["brain"][sl][..., 0]) >= 0.9 and dice(m[..., -1], h["brain"][sl][..., -1]) >= 0.9


def test_bet_parameters_and_errors():
    h = _synthetic_head(voxel_size_mm=(3.0, 3.0, 3.0))
    loose = be.bet_mask(h["mag"], h["vs"], fractional_threshold=0.2, subdivisions=3)
    tight = be.bet_mask(h["mag"], h["vs"], fractional_threshold=0.8, subdivisions=3)
    assert loose.sum() >= tight.sum()
    eroded = be.bet_mask(h["mag"], h["vs"], erode_mm=6.0, subdivisions=3)
    assert eroded.sum() < tight.sum() and not (eroded & ~loose).any()
    first = be.bet_mask(h["mag"], h["vs"], combine="first")
    assert dice(first, h["brain"]) >= 0.93  # 3 mm voxels
    with pytest.raises(ValueError, match="fractional_threshold"):
        be.bet_mask(h["mag"], h["vs"], fractional_threshold=1.0)
    with pytest.raises(ValueError, match="echo combination"):
        be.bet_mask(h["mag"], h["vs"], combine="median")
    with pytest.raises(ValueError, match="non-negative"):
        be.bet_mask(-h["mag"], h["vs"])
    with pytest.raises(ValueError, match="contrast"):
        be.bet_mask(np.ones((20, 20, 20), np.float32))


def test_bet_registry_entries(head2):
    h = head2
    assert {"bet", "bet-phase"} <= set(MASKING.names())
    assert MASKING.canonical("bet+phase") == "bet-phase"
    m = MASKING.get("bet")(h["phase"], h["mag"], TE, h["vs"])
    np.testing.assert_array_equal(m, be.bet_mask(h["mag"], h["vs"]))
    mp = MASKING.get("bet-phase")(h["phase"], h["mag"], TE, h["vs"])
    assert dice(mp, h["brain"]) >= 0.95
    assert not (mp & ~m).any()  # phase quality only removes voxels
    assert not mk.fill_holes(mp).sum() > mp.sum()  # no holes (the dark 'vein' stays in)
    params = MASKING.method("bet-phase").parameters()
    assert {"quality_factor", "fractional_threshold", "iterations"} <= set(params)
    # the workflow's split: BET run on its own (the brain_extraction node), passed in as ``brain``
    assert "brain" in MASKING.method("bet-phase").data_args and "brain" not in params
    np.testing.assert_array_equal(MASKING.get("bet-phase")(h["phase"], h["mag"], TE, h["vs"], brain=m), mp)
    assert set(params) - mk.BET_PHASE_QUALITY_PARAMS == set(MASKING.method("bet").parameters())
    with pytest.raises(ValueError, match="brain"):
        MASKING.get("bet-phase")(h["phase"], h["mag"], TE, h["vs"], brain=m[:-1])
    with pytest.raises(ValueError, match="out of range"):
        MASKING.method("bet").check_params({"fractional_threshold": 1.5})
    with pytest.raises(ValueError, match="needs magnitude"):
        MASKING.get("bet")(h["phase"])
    with pytest.raises(ValueError, match="needs phase"):
        MASKING.get("bet-phase")(magnitude_4d=h["mag"])


def test_mask_interface_takes_a_precomputed_brain_extraction(head2, tmp_path):
    """The workflow's brain_extraction node (method ``bet``) feeds brain_mask (``bet-phase``): the same mask
    as bet-phase computing its own BET; a method without a ``brain`` argument refuses the input."""
    import os

    import nibabel as nib

    from qsmprep.interfaces.qsm import Mask

    h = head2
    aff = np.diag(list(h["vs"]) + [1.0])
    files = {}
    for key, arr in (("phase", h["phase"]), ("mag", h["mag"])):
        files[key] = str(tmp_path / f"{key}.nii")
        nib.save(nib.Nifti1Image(np.asarray(arr, np.float32), aff), files[key])
    common = dict(phase=files["phase"], magnitude=files["mag"], echo_times=list(TE), voxel_size=list(h["vs"]),
                  num_threads=1)
    cwd = os.getcwd()
    try:
        outs = {}
        for name, kw in (("bet", dict(method="bet")), ("both", dict(method="bet-phase"))):
            os.makedirs(tmp_path / name)
            os.chdir(tmp_path / name)
            outs[name] = Mask(**common, **kw).run().outputs
        os.makedirs(tmp_path / "split")
        os.chdir(tmp_path / "split")
        split = Mask(**common, method="bet-phase", brain_extraction=outs["bet"].mask_file).run().outputs
        want = np.asanyarray(nib.load(outs["both"].mask_file).dataobj)
        np.testing.assert_array_equal(np.asanyarray(nib.load(split.mask_file).dataobj), want)
        assert split.params["Parameters"] == outs["both"].params["Parameters"]
        with pytest.raises(ValueError, match="takes no precomputed brain extraction"):
            Mask(**common, method="phase", brain_extraction=outs["bet"].mask_file).run()
    finally:
        os.chdir(cwd)


# --------------------------------------------------------------------------------------------------
# accuracy on the simulated heads (integration: a few seconds per case)
# --------------------------------------------------------------------------------------------------

FIELD_TE = {3.0: (0.004, 0.008, 0.012, 0.016, 0.020, 0.024), 7.0: (0.004, 0.008, 0.012, 0.016)}


def _masks_vs_truth(phantom, b0, tilt):
    from qsmprep.simulate import simulate_gre

    sim = simulate_gre(phantom, echo_times_s=FIELD_TE[b0], b0_tesla=b0, tilt_deg=tilt, snr=50, seed=1)
    out = {}
    for name in ("bet", "bet-phase"):
        m = MASKING.get(name)(sim.phase_rad, sim.magnitude, sim.echo_times_s, sim.voxel_size_mm)
        out[name] = (dice(m, sim.brain_mask), np.count_nonzero(m & ~sim.brain_mask) / sim.brain_mask.sum())
    return out


@pytest.mark.integration
@pytest.mark.parametrize("b0, tilt", [(3.0, 0.0), (7.0, 22.0)])
def test_bet_on_mni_head_2mm(head_phantom_2mm, b0, tilt):
    """MNI head at 2 mm (benchmarks/results/brain_extraction.md: bet 0.983-0.985, bet-phase 0.97-0.99)."""
    res = _masks_vs_truth(head_phantom_2mm, b0, tilt)
    assert res["bet"][0] >= 0.975 and res["bet"][1] < 0.05  # scalp, skull and neck out
    assert res["bet-phase"][0] >= 0.96 and res["bet-phase"][1] < 0.01


@pytest.mark.integration
@pytest.mark.parametrize("b0, tilt", [(3.0, 0.0), (7.0, 22.0)])
def test_bet_on_zubal_head_2mm(zubal_phantom_2mm, b0, tilt):
    """Zubal head (an anatomy the simulator was not built on; skipped without its data) at 2 mm, lesions."""
    res = _masks_vs_truth(zubal_phantom_2mm, b0, tilt)
    assert res["bet"][0] >= 0.96 and res["bet"][1] < 0.06
    assert res["bet-phase"][0] >= 0.95 and res["bet-phase"][1] < 0.06


def test_mask_interface_runs_bet(tmp_path, monkeypatch):
    """The Mask interface passes the voxel size and the parameters to ``bet`` and records them."""
    from qsmprep.interfaces.qsm import Mask

    h = _synthetic_head(voxel_size_mm=(3.0, 3.0, 3.0))
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    mag = save_nifti(tmp_path / "mag.nii.gz", h["mag"], aff, np.float32)
    ph = save_nifti(tmp_path / "phase.nii.gz", h["phase"], aff, np.float32)
    monkeypatch.chdir(tmp_path)
    res = Mask(phase=ph, magnitude=mag, echo_times=list(TE), voxel_size=[3.0, 3.0, 3.0], method="bet",
               method_params={"fractional_threshold": 0.7, "subdivisions": 3}).run().outputs
    m = np.asarray(nib.load(res.mask_file).dataobj) > 0
    assert dice(m, h["brain"]) >= 0.93
    assert res.params["Method"] == "bet"
    assert res.params["Parameters"]["fractional_threshold"] == 0.7 and res.params["Parameters"]["d1_mm"] == 20.0


def test_magnitude_masking_needs_magnitude_data(tmp_path):
    """config.check_runs refuses a magnitude-based mask for a phase-only series before any work."""
    from types import SimpleNamespace

    from qsmprep.config import QsmprepConfig
    from qsmprep.utils.errors import EX_USAGE, InputError

    def run(has_mag):
        return SimpleNamespace(echo_times_s=TE, has_magnitude=has_mag, prefix=lambda: "sub-01_part-phase")

    cfg = QsmprepConfig(output_dir=tmp_path, masking="bet")
    cfg.check_runs([run(True)])
    with pytest.raises(InputError, match="needs magnitude") as exc:
        cfg.check_runs([run(False)])
    assert exc.value.code == EX_USAGE
    QsmprepConfig(output_dir=tmp_path, masking="phase").check_runs([run(False)])
    # the default (BET within phase quality) falls back to the phase-quality mask without magnitude
    default = QsmprepConfig(output_dir=tmp_path, masking="bet+phase")
    assert default.masking == "bet-phase" == QsmprepConfig().masking
    default.check_runs([run(False)])
    assert default.masking_for(run(False)) == "phase" and default.masking_for(run(True)) == "bet-phase"
    # ... unless its parameters were set on purpose
    tuned = QsmprepConfig(output_dir=tmp_path, method_params={"masking": {"fractional_threshold": 0.7}})
    with pytest.raises(InputError, match="needs magnitude"):
        tuned.check_runs([run(False)])
