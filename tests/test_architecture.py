"""The shape of the code base: layers and imports, the method catalogue, the output spec, and that adding
a method is one function plus one registration."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest

import qsmprep
from qsmprep.config import MethodParams, QsmprepConfig
from qsmprep.methods import STAGES
from qsmprep.references import REFERENCES

PACKAGE = Path(qsmprep.__file__).parent
DOCS = PACKAGE.parent / "docs"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """``(module, imported name or None)`` of every qsmprep import in a file, function-level ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.startswith("qsmprep")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("qsmprep"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, None) if sub in modules else (base, alias.name))
    return out


def test_no_import_cycle_inside_qsmprep():
    """Import graph over every module (function-level imports included): no strongly connected component
    bigger than one module. Edges go to the module named (a package ``__init__`` only when imported)."""
    modules = _modules()
    graph = {m: sorted({t for t, _ in _imports(p, m, modules) if t in modules and t != m}) for m, p in modules.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def strong(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, cycles


def test_layers_depend_one_way():
    """qsm (pure arrays) imports no outer layer; interfaces no workflows/cli; workflows no cli; nothing imports cli
    except cli (and the demo)."""
    modules = _modules()
    forbidden = {
        "qsmprep.qsm": ("qsmprep.interfaces", "qsmprep.workflows", "qsmprep.cli", "qsmprep.utils", "qsmprep.nn",
                        "qsmprep.reports", "qsmprep.config", "qsmprep.methods"),
        "qsmprep.interfaces": ("qsmprep.workflows", "qsmprep.cli"),
        "qsmprep.workflows": ("qsmprep.cli",),
        "qsmprep.utils": ("qsmprep.interfaces", "qsmprep.workflows", "qsmprep.cli"),
        "qsmprep.reports": ("qsmprep.workflows", "qsmprep.cli"),
        "qsmprep.anat": ("qsmprep.interfaces", "qsmprep.workflows", "qsmprep.cli", "qsmprep.reports", "qsmprep.nn",
                         "qsmprep.qsm"),
    }
    bad = []
    for m, p in modules.items():
        for layer, outer in forbidden.items():
            if m == layer or m.startswith(layer + "."):
                bad += [(m, t) for t, _ in _imports(p, m, modules) if t.startswith(outer)]
    assert not bad, bad


def test_no_private_name_is_imported_across_modules():
    """``from qsmprep.x import _name`` and private modules used outside their package are refused."""
    modules = _modules()

    def private(part: str) -> bool:
        return part.startswith("_") and not part.startswith("__")

    bad = []
    for m, p in modules.items():
        for target, name in _imports(p, m, modules):
            if name is not None and private(name) and target != m:
                bad.append((m, f"{target}.{name}"))
            private_at = [i for i, part in enumerate(target.split(".")) if private(part)]
            if private_at and not m.startswith(".".join(target.split(".")[: private_at[0]]) + "."):
                bad.append((m, target))
    assert not bad, bad


# --------------------------------------------------------------------------------------------------
# the method catalogue and the config
# --------------------------------------------------------------------------------------------------


def test_every_registered_method_has_a_complete_catalogue_entry():
    for key, registry in STAGES.items():
        assert registry.key == key and registry.names()
        for name in registry.names():
            m = registry.method(name)
            assert m.stage == key and m.name == name and m.label and m.description, (key, name)
            assert set(m.references) <= set(REFERENCES), (key, name, m.references)
            if not m.learned:  # classical functions are there without importing anything else
                params = m.parameters()
                assert not set(params) & set(m.data_args), (key, name)
                assert all(not p.startswith("_") for p in params)


def test_every_config_default_is_a_registered_name_and_stages_match():
    defaults = QsmprepConfig()
    fields = QsmprepConfig.method_fields()
    assert set(fields.values()) <= set(STAGES) and len(set(fields.values())) == len(fields)
    for name, stage in fields.items():
        assert getattr(defaults, name) in STAGES[stage], (name, getattr(defaults, name))
    assert set(MethodParams.stages()) == set(STAGES)
    assert set(defaults.chosen_methods()) == set(STAGES)
    assert defaults.validate() is defaults


def test_listing_the_catalogue_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, qsmprep.methods as m, qsmprep.cli.parser as p; p.build_parser(); "
            "print(m.names('inversion')); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "nextqsm" in proc.stdout and "deepqsm" in proc.stdout


def test_method_parameters_are_checked_by_name_and_type():
    vsharp = STAGES["bgremove"].method("v-sharp")
    assert vsharp.name == "vsharp" and list(vsharp.parameters()) == ["radii_mm", "threshold"]
    assert vsharp.check_params({"radii_mm": [8, 6, 4], "threshold": 0.1}) == {"radii_mm": [8, 6, 4], "threshold": 0.1}
    with pytest.raises(ValueError, match=r"no parameter 'radius_mm' \(valid: radii_mm, threshold\)"):
        vsharp.check_params({"radius_mm": 8})
    with pytest.raises(ValueError, match="threshold = 'high' should be a number"):
        vsharp.check_params({"threshold": "high"})
    with pytest.raises(ValueError, match="maxit = 2.5 should be a number"):
        STAGES["inversion"].method("rts").check_params({"maxit": 2.5})
    assert vsharp.resolve_params({}, {"voxel_size_mm": (1.0, 1.0, 2.0)})["radii_mm"] == [12.0, 10.0, 8.0, 6.0, 4.0]
    assert "12 mm down" in vsharp.resolve_params({})["radii_mm"]  # described in words without data
    romeo = STAGES["unwrapping"].method("romeo")
    assert romeo.resolve_params({}, {"n_echoes": 4})["global_correction"] is True
    assert romeo.resolve_params({}, {"n_echoes": 1})["global_correction"] is False


def test_config_validation_names_the_problem_in_one_line():
    from qsmprep.utils.errors import EX_DATAERR, EX_USAGE, InputError

    with pytest.raises(InputError) as err:
        QsmprepConfig(bgremove="vsharp", method_params={"bgremove": {"radius_mm": 8}}).validate()
    assert err.value.code == EX_DATAERR and "[method_params.bgremove]" in str(err.value)
    assert "valid: radii_mm, threshold" in str(err.value)
    with pytest.raises(InputError) as err:
        QsmprepConfig(inversion="nope").validate()
    assert err.value.code == EX_USAGE and "--inversion" in str(err.value)
    with pytest.raises(ValueError, match="expected tables named after stages"):
        QsmprepConfig(method_params={"bgremoval": {}})
    assert QsmprepConfig(masking="Phase-Quality", bgremove="V-SHARP").bgremove == "vsharp"


def test_config_from_dict_is_generic_over_the_fields(tmp_path):
    cfg = QsmprepConfig.from_dict({"bids_dir": "rel", "nprocs": "3", "participant_label": ["1", "1", "2"],
                                   "method_params": {"inversion": {"maxit": 5}}, "mem_gb": 2})
    assert cfg.bids_dir == Path("rel").absolute() and cfg.nprocs == 3 and cfg.participant_label == ["1", "2"]
    assert cfg.method_params.inversion == {"maxit": 5} and cfg.mem_gb == 2.0
    with pytest.raises(ValueError, match="unknown setting"):
        QsmprepConfig.from_dict({"bg_remove": "pdf"})


# --------------------------------------------------------------------------------------------------
# the output spec
# --------------------------------------------------------------------------------------------------


def test_docs_output_table_is_the_output_spec():
    from qsmprep.outputs import markdown_table

    assert markdown_table() in (DOCS / "outputs.md").read_text(encoding="utf-8")


def test_bidsignore_and_report_reader_come_from_the_spec():
    from qsmprep.outputs import IMAGES, OUTPUTS, bidsignore_text
    from qsmprep.reports.reader import ProcessedRun

    text = bidsignore_text()
    for o in OUTPUTS:
        assert (o.ignore_pattern in text) == (o.not_bids is not None), o.key
    run = ProcessedRun("sub-1_run-2", Path("/out/sub-1/anat"), {"sub": "1", "run": "2"})
    for key, spec in IMAGES.items():
        assert run.path(key).name == spec.name("sub-1_run-2")
    assert run.qc_json.name == "sub-1_run-2_desc-qc_metrics.json"
    assert run.roi_tsv.name == "sub-1_run-2_desc-roi_stats.tsv"


# --------------------------------------------------------------------------------------------------
# a new method is one function + one registration
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def toy_bgremove():
    """A classical background removal registered by the test alone: subtract the field's mean and a
    ``scale`` of its linear trend (no other file knows it)."""
    from qsmprep.qsm.registry import BGREMOVE

    @BGREMOVE.register("toytrend", label="Toy trend removal", references=("liu2011",),
                       description="a toy removal of the mean and a scaled linear trend of the total field")
    def toytrend(total_field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), scale: float = 1.0):
        m = np.asarray(mask, bool)
        f = np.asarray(total_field_ppm, np.float32)
        grid = np.stack(np.nonzero(m), axis=1).astype(np.float64)
        design = np.c_[np.ones(len(grid)), grid]
        coef, *_ = np.linalg.lstsq(design, f[m], rcond=None)
        local = np.zeros_like(f)
        local[m] = f[m] - coef[0] - scale * (grid @ coef[1:])
        return local, m

    yield "toytrend"
    BGREMOVE.unregister("toytrend")


@pytest.mark.integration
def test_a_registered_toy_method_runs_through_cli_workflow_sidecar_and_boilerplate(toy_bgremove, tmp_path):
    from qsmprep.cli.run import main
    from qsmprep.simulate import make_shapes_phantom, simulate_gre, write_bids_dataset

    ph = make_shapes_phantom(shape=(32, 32, 32), voxel_size_mm=(1.5, 1.5, 1.5), seed=3)
    sim = simulate_gre(ph, echo_times_s=(0.004, 0.008, 0.012), b0_tesla=3.0, snr=100, seed=3)
    write_bids_dataset(tmp_path / "bids", sim, subjects=["01"])
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[method_params.bgremove]\nscale = 0.5\n")
    out = tmp_path / "out"
    rc = main([str(tmp_path / "bids"), str(out), "participant", "-w", str(tmp_path / "work"), "--nprocs", "1",
               "--bgremove", toy_bgremove, "--inversion", "tkd", "--skip-bids-validation", "--config-file", str(cfg)])
    assert rc == 0
    meta = json.loads(next(out.rglob("*_Chimap.json")).read_text())
    step = meta["ProcessingSteps"]["BackgroundFieldRemoval"]
    assert step == {"Method": "toytrend", "Parameters": {"scale": 0.5}, "MaskVoxelsIn": step["MaskVoxelsIn"],
                    "MaskVoxelsOut": step["MaskVoxelsOut"]}
    assert "Toy trend removal background field removal" in meta["EstimationAlgorithm"]
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "a toy removal of the mean and a scaled linear trend" in citation and "scale = 0.5" in citation
    assert re.search(r"projection onto dipole fields \(PDF\)\. NMR Biomed", citation)  # its reference is cited
    saved = next(out.rglob("qsmprep.toml")).read_text()
    assert 'bgremove = "toytrend"' in saved
