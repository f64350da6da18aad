"""Shared, session-scoped test data: simulated phantoms, small simulated BIDS datasets, tiny runs.

Every fixture here is built at most once per test session (once per xdist worker) and shared by all
the modules that ask for it, so nothing may change it:

* phantoms come with read-only arrays (an in-place change raises ``ValueError``);
* datasets live in the session's temporary folder; tests read them and write their outputs (and work
  folders) into their own ``tmp_path`` / module folders, never next to the raw data.

Plain helper functions (grids, shapes, NIfTI writing) are in ``helpers.py``. Markers and the default
options (``-m 'not integration'``, two xdist workers) are in pyproject.toml ``[tool.pytest.ini_options]``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
from anat_helpers import WHEEL_HINT, build_templateflow_home, find_template_wheel
from helpers import save_nifti

from qsmprep.simulate import make_head_phantom, make_shapes_phantom, simulate_gre, write_bids_dataset
from qsmprep.utils.bids import QsmRun, collect_runs
from qsmprep.utils.allocation import tune_allocation

# as the App does (qsmprep.cli.run.main): no NumPy huge-page advice where the kernel would stall on it,
# freed volumes reused by malloc; the subprocesses that tests start inherit the settings
tune_allocation()

#: echo times (s) of the small shapes datasets
SHAPES_TES = (0.004, 0.008, 0.012, 0.016)


def pytest_addoption(parser, pluginmanager):
    """Accept (and ignore) pyproject's ``--numprocesses=2 --dist=loadscope`` when xdist is disabled
    (``-p no:xdist``) or not installed."""
    if not pluginmanager.has_plugin("xdist"):
        parser.addoption("--numprocesses", dest="numprocesses", default=None, help="ignored: xdist is not active")
        parser.addoption("--dist", dest="dist", default="no", help="ignored: xdist is not active")


def _read_only(obj):
    """``obj`` with every ndarray attribute (of a dataclass) made read-only; returns ``obj``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return obj


# --------------------------------------------------------------------------------------------------
# head phantoms (integration tests: building one takes seconds)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def head_phantom_1mm():
    """``make_head_phantom(downsample=1, seed=0)`` (197 x 233 x 189 at 1 mm), read-only arrays."""
    return _read_only(make_head_phantom(downsample=1, seed=0))


def _zubal_dir() -> Path | None:
    """The Zubal data folder: ``$QSMPREP_ZUBAL_DIR``, else ``shared/data/zubal`` next to the repository
    (the data are not shipped and not committed); None when absent."""
    import os

    from qsmprep.simulate.phantom import ZUBAL_BRAINMASK_FILE, ZUBAL_DIR_ENV, ZUBAL_LABELS_FILE

    env = os.environ.get(ZUBAL_DIR_ENV)
    root = Path(__file__).resolve().parent.parent
    for d in ([Path(env)] if env else []) + [root.parent / "shared" / "data" / "zubal"]:
        if (d / ZUBAL_LABELS_FILE).is_file() and (d / ZUBAL_BRAINMASK_FILE).is_file():
            return d
    return None


@pytest.fixture(scope="session")
def zubal_dir():
    """Folder of the Zubal head files; skips when the data are absent (they are not in the repository)."""
    d = _zubal_dir()
    if d is None:
        pytest.skip("Zubal head data absent: set QSMPREP_ZUBAL_DIR (or place it in ../shared/data/zubal)")
    return d


@pytest.fixture(scope="session")
def zubal_phantom_2mm(zubal_dir):
    """``make_zubal_phantom(zubal_dir, downsample=2, lesions=True, seed=0)`` (textured), read-only arrays."""
    from qsmprep.simulate import make_zubal_phantom

    return _read_only(make_zubal_phantom(zubal_dir, downsample=2, lesions=True, seed=0))


@pytest.fixture(scope="session")
def head_phantom_2mm():
    """``make_head_phantom(downsample=2, seed=0)`` (99 x 117 x 95 at 2 mm), read-only arrays."""
    return _read_only(make_head_phantom(downsample=2, seed=0))


# --------------------------------------------------------------------------------------------------
# small simulated BIDS datasets (the 40^3 shapes phantom)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shapes_bids(tmp_path_factory):
    """Factory of raw BIDS datasets of the 40^3, 1.2 mm shapes phantom (seed 1), 4 echoes (4-16 ms), 3 T.

    ``shapes_bids(simulate_kwargs=None, **write_kwargs) -> (bids_dir, runs, sim)``: ``simulate_gre``
    runs with ``echo_times_s=SHAPES_TES, b0_tesla=3.0, snr=100, seed=1`` updated by ``simulate_kwargs``;
    ``write_bids_dataset(bids_dir, sim, subjects=["01"], **write_kwargs)`` writes it (the simulator's
    ground truth goes to ``bids_dir/derivatives/qsmprep-simulate``); ``runs`` is
    ``tuple(collect_runs(bids_dir))``. Each distinct set of arguments is simulated and written once per
    session; the returned folder is shared: read it, write nothing into it.
    """
    cache: dict[str, tuple[Path, list[QsmRun], object]] = {}

    def make(simulate_kwargs: dict | None = None, **write_kwargs):
        sim_kw = {"echo_times_s": SHAPES_TES, "b0_tesla": 3.0, "snr": 100, "seed": 1, **(simulate_kwargs or {})}
        write_kw = {"subjects": ["01"], **write_kwargs}
        key = repr((sorted(sim_kw.items()), sorted(write_kw.items())))
        if key not in cache:
            phantom = make_shapes_phantom(shape=(40, 40, 40), voxel_size_mm=(1.2, 1.2, 1.2), seed=1)
            sim = _read_only(simulate_gre(phantom, **sim_kw))
            bids = tmp_path_factory.mktemp("shapes_bids") / "bids"
            write_bids_dataset(bids, sim, **write_kw)
            cache[key] = (bids, tuple(collect_runs(bids)), sim)
        return cache[key]

    return make


# --------------------------------------------------------------------------------------------------
# tiny runs for building (not running) workflows
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> MappingProxyType:
    """Read-only mapping of (frozen) :class:`QsmRun` s of 4^3 NIfTI files, enough to build (not run) the
    QSM workflow:

    ``"multi"`` (4 echoes, magnitude + phase, session 1), ``"single"`` (its first echo only) and
    ``"complex"`` (4 echoes as real/imaginary pairs, run 2).
    """
    root = tmp_path_factory.mktemp("tiny_runs")
    anat = root / "sub-01" / "ses-1" / "anat"
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.ones((4, 4, 4), np.float32)

    def write(part: str, echo: int, run: str | None = None) -> Path:
        entity = f"_run-{run}" if run else ""
        path = anat / f"sub-01_ses-1{entity}_echo-{echo}_part-{part}_MEGRE.nii.gz"
        save_nifti(path, data, affine)
        return path

    echoes = range(1, len(SHAPES_TES) + 1)
    common = dict(subject="01", session="1", acquisition=None, suffix="MEGRE", field_strength_t=3.0)
    multi = QsmRun(run=None, magnitude_files=tuple(write("mag", e) for e in echoes),
                   phase_files=tuple(write("phase", e) for e in echoes), real_files=(), imag_files=(),
                   echo_times_s=SHAPES_TES, phase_units="rad", **common)
    single = dataclasses.replace(multi, magnitude_files=multi.magnitude_files[:1],
                                 phase_files=multi.phase_files[:1], echo_times_s=SHAPES_TES[:1])
    complex_ = QsmRun(run="2", magnitude_files=(), phase_files=(),
                      real_files=tuple(write("real", e, "2") for e in echoes),
                      imag_files=tuple(write("imag", e, "2") for e in echoes),
                      echo_times_s=SHAPES_TES, phase_units=None, **common)
    return MappingProxyType({"multi": multi, "single": single, "complex": complex_})


@pytest.fixture(scope="session")
def tf_home(tmp_path_factory):
    """An offline TEMPLATEFLOW_HOME built from the genuine TemplateFlow files of NiMARE's wheel
    (tests/anat_helpers.py); the tests that need it skip, saying how to get the wheel, without it."""
    wheel = find_template_wheel()
    if wheel is None:
        pytest.skip(f"no NiMARE wheel with TemplateFlow files: {WHEEL_HINT}")
    return build_templateflow_home(tmp_path_factory.mktemp("templateflow"), wheel)
