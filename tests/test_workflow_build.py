"""Build-only tests of the per-series QSM workflow for the method combinations (fMRIPrep style).

``init_qsm_wf(run, config)`` is built (never run) on tiny 4^3 runs (``tiny_runs`` in conftest.py) for a
set of combinations of every CLI choice of every stage (masking x unwrapping x bgremove x inversion x
reference), R2* on/off, the kind of run (multi-echo, single-echo, real/imaginary) and outputs on/off.
The full product is 5292 builds (~13 ms each: over a minute), so the cases form a pairwise covering
array: every value of every factor meets every value of every other factor in at least one build
(``test_cases_cover_every_pair`` checks it); the impossible pair single echo x CSF reference is the
expected error of ``test_csf_reference_needs_two_echoes`` (``QsmprepConfig.check_runs``). About 60 builds, a second or two in all.

Each build is checked for: the node set (R2* node iff R2* was asked for on a multi-echo run or the
reference is CSF; sinks iff there is an output folder), the method of every stage's node, the chain of
connections load -> offset -> mask -> unwrap -> B0 -> background -> inversion -> reference -> outputs,
every node reachable from ``load_echoes``, the derivative sinks and their paths, and that building
writes nothing. ``test_build_every_method_combination`` (integration) builds the full product of the
five method stages.
"""

from __future__ import annotations

import itertools

import networkx as nx
import pytest

from qsmprep.config import QsmprepConfig
from qsmprep.methods import STAGES as REGISTRIES
from qsmprep.methods import names as method_choices
from qsmprep.utils.errors import InputError
from qsmprep.workflows.qsm import init_qsm_wf

STAGES = ("masking", "unwrapping", "bgremove", "inversion", "reference")
#: factor -> values; the method stages take every CLI choice
FACTORS: dict[str, tuple] = {
    **{stage: tuple(method_choices(stage)) for stage in STAGES},
    "r2star": (False, True),
    "run": ("multi", "single", "complex"),
    "outputs": (True, False),
}
#: stage -> (registry, name of the workflow node that runs it)
NODES = {"masking": (REGISTRIES["masking"], "brain_mask"), "unwrapping": (REGISTRIES["unwrapping"], "unwrap"),
         "bgremove": (REGISTRIES["bgremove"], "bgremove"), "inversion": (REGISTRIES["inversion"], "inversion"),
         "reference": (REGISTRIES["reference"], "reference")}
CORE = {"load_echoes", "phase_offset", "brain_mask", "unwrap", "fit_b0", "bgremove", "inversion", "reference",
        "sidecars", "qc_field", "qc", "outputnode"}
#: (source, destination, (output, input)) connections every build has
CHAIN = [
    ("load_echoes", "phase_offset", ("phase", "phase")),
    ("phase_offset", "brain_mask", ("phase_corrected", "phase")),
    ("phase_offset", "unwrap", ("phase_corrected", "phase")),
    ("brain_mask", "unwrap", ("mask_file", "mask")),
    ("unwrap", "fit_b0", ("unwrapped", "unwrapped")),
    ("fit_b0", "bgremove", ("total_field_ppm", "total_field")),
    ("bgremove", "inversion", ("local_field", "local_field")),
    ("inversion", "reference", ("chi", "chi")),
    ("reference", "outputnode", ("chi_referenced", "chi")),
    ("bgremove", "qc_field", ("local_field", "local_field")),
    ("qc_field", "qc", ("metrics", "field_metrics")),
    ("reference", "qc", ("chi_referenced", "chi")),
    ("qc", "outputnode", ("out_file", "qc_metrics")),
]


def _valid(case: dict) -> bool:
    """CSF referencing needs R2*, which needs two echoes: single echo x CSF is an error (tested apart)."""
    return not (case.get("run") == "single" and case.get("reference") == "csf")


def pairwise_cases(factors: dict[str, tuple]) -> list[dict]:
    """A deterministic greedy covering array: every valid pair of values of two factors is in some case."""
    names = list(factors)
    uncovered = {((f, a), (g, b)) for f, g in itertools.combinations(names, 2)
                 for a in factors[f] for b in factors[g] if _valid({f: a, g: b})}
    cases = []
    while uncovered:
        (f, a), (g, b) = min(uncovered, key=lambda p: (names.index(p[0][0]), names.index(p[1][0]), str(p)))
        case = {f: a, g: b}
        for h in names:
            if h in case:
                continue
            options = [v for v in factors[h] if _valid({**case, h: v})]
            case[h] = max(options, key=lambda v: (sum(((k, case[k]), (h, v)) in uncovered or ((h, v), (k, case[k]))
                                                      in uncovered for k in case), -options.index(v)))
        cases.append(case)
        uncovered -= {((x, case[x]), (y, case[y])) for x, y in itertools.combinations(names, 2)}
    return cases


CASES = pairwise_cases(FACTORS)


def _case_id(case: dict) -> str:
    return "-".join([str(case[s]) for s in STAGES] + [f"r2star{int(case['r2star'])}", case["run"],
                                                      "out" if case["outputs"] else "noout"])


def _config(case: dict, tmp_path) -> QsmprepConfig:
    return QsmprepConfig(output_dir=tmp_path / "out" if case["outputs"] else None, omp_nthreads=1,
                         r2star=case["r2star"], **{s: case[s] for s in STAGES})


def _edges(wf) -> dict[tuple[str, str], list]:
    return {(u.name, v.name): d["connect"] for u, v, d in wf._graph.edges(data=True)}


def test_choices_are_the_registered_methods():
    for stage, (reg, _) in NODES.items():
        assert set(reg.names()) <= set(FACTORS[stage]), stage
        assert set(FACTORS[stage]) == set(reg.names()), stage


def test_cases_cover_every_pair():
    names = list(FACTORS)
    for f, g in itertools.combinations(names, 2):
        seen = {(c[f], c[g]) for c in CASES}
        for a, b in itertools.product(FACTORS[f], FACTORS[g]):
            assert (a, b) in seen or not _valid({f: a, g: b}), (f, a, g, b)
    assert all(_valid(c) for c in CASES)
    assert len(CASES) < 80  # the point of a covering array (the full product is 5292 builds)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_build(case, tiny_runs, tmp_path):
    _build_and_check(case, tiny_runs, tmp_path)


@pytest.mark.integration
def test_build_every_method_combination(tiny_runs, tmp_path):
    """The full product of the five method stages (882 builds, ~15 s), multi-echo with R2* and outputs."""
    products = itertools.product(*(FACTORS[s] for s in STAGES))
    for i, methods in enumerate(products):
        case = {**dict(zip(STAGES, methods)), "r2star": bool(i % 2), "run": "multi", "outputs": True}
        _build_and_check(case, tiny_runs, tmp_path / str(i))


def _build_and_check(case: dict, tiny_runs: dict, tmp_path) -> None:
    run = tiny_runs[case["run"]]
    cfg = _config(case, tmp_path)
    wf = init_qsm_wf(run, cfg)
    multi_echo = run.n_echoes > 1
    csf = case["reference"] == "csf"
    want_r2 = case["r2star"] and multi_echo
    names = {n.name for n in wf._graph.nodes()}

    # nodes: R2* iff asked for (and possible) or needed by the CSF reference; sinks iff an output folder
    expected = set(CORE)
    if want_r2 or csf:
        expected.add("r2star")
    if case["outputs"]:
        expected |= {"ds_qsm_wf", "ds_qc_metrics"}
    # BET + phase quality: the brain extraction is a node of its own, next to the phase-offset correction
    separate_bet = case["masking"] == "bet-phase"
    if separate_bet:
        expected.add("brain_extraction")
    assert names == expected

    # each stage's node runs the chosen method; MCPC-3D-S only with two echoes or more
    for stage, (_, node) in NODES.items():
        assert wf.get_node(node).inputs.method == case[stage], stage
    assert wf.get_node("phase_offset").inputs.method == ("mcpc3ds" if multi_echo else "none")
    load = wf.get_node("load_echoes").inputs
    if run.is_complex:
        assert len(load.real_files) == len(load.imag_files) == run.n_echoes
    else:
        assert len(load.phase_files) == run.n_echoes

    # connections: the processing chain, the CSF reference's R2* input, nothing dangling
    edges = _edges(wf)
    for src, dst, conn in CHAIN:
        assert conn in edges.get((src, dst), []), (src, dst, conn)
    assert (("r2star", "reference") in edges) == csf
    if separate_bet:
        bet = wf.get_node("brain_extraction")
        assert bet.inputs.method == "bet" and bet.n_procs == 1
        assert ("mask_file", "brain_extraction") in edges["brain_extraction", "brain_mask"]
        assert ("phase_offset", "brain_extraction") not in edges and ("brain_extraction", "phase_offset") not in edges
        assert wf.get_node("phase_offset").n_procs == max(1, cfg.omp_nthreads - 1)
    if csf:
        assert ("r2star", "r2star") in edges["r2star", "reference"]
    load_node = wf.get_node("load_echoes")
    assert {n.name for n in nx.descendants(wf._graph, load_node)} == names - {"load_echoes"}

    if case["outputs"]:
        ds = wf.get_node("ds_qsm_wf")
        sinks = {n.name for n in ds._graph.nodes()} - {"inputnode"}
        want = {"ds_chimap", "ds_brain_mask", "ds_total_fieldmap", "ds_local_fieldmap"}
        want |= {"ds_r2starmap"} if want_r2 else set()
        want |= {"ds_reference_mask"} if csf else set()
        assert sinks == want
        chimap = ds.get_node("ds_chimap").inputs.out_file
        assert chimap == str((cfg.output_dir / "sub-01" / "ses-1" / "anat" / f"{run.prefix()}_Chimap.nii.gz").absolute())
        assert (("r2star", "ds_qsm_wf") in edges) == want_r2
        assert ("reference", "ds_qsm_wf") in edges and ("qc", "ds_qc_metrics") in edges
        assert not cfg.output_dir.exists()  # building writes nothing


def test_csf_reference_needs_two_echoes(tiny_runs, tmp_path):
    cfg = QsmprepConfig(output_dir=tmp_path / "out", reference="csf", bgremove="vsharp", inversion="tkd")
    with pytest.raises(InputError, match=">= 2 echoes"):  # refused before any work, by the config
        cfg.check_runs([tiny_runs["single"]])
    assert init_qsm_wf(tiny_runs["multi"], cfg).get_node("r2star") is not None
