"""Entry point of the ``qsmprep`` BIDS App: parse, configure, validate the input, run the workflow.

Order of work (nothing is written before every input check has passed):

1. parse the command line (usage errors: exit 64);
2. layer defaults < ``--config-file`` (TOML) < command line into a :class:`~qsmprep.config.QsmprepConfig`;
3. check paths, discover the QSM series (:func:`qsmprep.utils.bids.collect_runs`), check headers and
   phase data (:mod:`qsmprep.utils.validation`), then run ``bids-validator-deno`` unless
   ``--skip-bids-validation`` (input errors: exit 65 invalid data, 66 missing input);
4. build ``qsmprep.workflows.base.init_qsmprep_wf(config, runs)`` and run it with the Nipype plugin
   (a failed node: exit 1);
5. write the HTML report of each processed participant (``OUTPUT_DIR/sub-<label>.html``), also after a
   failure (its Errors section lists the crash files).

``--reports-only`` does step 5 alone from the existing outputs. The ``group`` level tabulates the QC
metrics and region statistics of every processed series (:func:`qsmprep.reports.run_group`; exit 66
when OUTPUT_DIR holds none).

Every error is one line on stderr: ``qsmprep: error: <file>: <problem>. <fix>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import tomllib
import traceback
from pathlib import Path
from typing import Sequence

from qsmprep.__about__ import __version__
from qsmprep.config import QsmprepConfig
from qsmprep.utils.plugins import make_plugin
from qsmprep.utils.validation import (
    EX_DATAERR,
    EX_FAILURE,
    EX_NOINPUT,
    EX_OK,
    EX_USAGE,
    InputError,
)

__all__ = ["main", "parse_config", "load_config_file", "load_plugin_file", "IMPORTANT"]

LOGGER = logging.getLogger("qsmprep")
#: log level of the few progress lines printed by default (between INFO and WARNING, as in fMRIPrep)
IMPORTANT = 25
logging.addLevelName(IMPORTANT, "IMPORTANT")

#: config-file keys that have no command-line option
_TOML_ONLY = ("plugin", "plugin_args", "bids_filters", "method_params")
#: stages that accept extra parameters in a config file's [method_params.<stage>] table
_PARAM_STAGES = ("masking", "offset", "unwrapping", "b0", "bgremove", "inversion", "reference", "r2star")
#: keys given on the command line only (positional); ignored in a config file
_POSITIONAL = ("bids_dir", "output_dir", "analysis_level")


# --------------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------------


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"qsmprep: error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"qsmprep: warning: {msg}"
        return f"qsmprep: {msg}"


def _setup_logging(verbose: int) -> None:
    level = IMPORTANT if verbose <= 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    LOGGER.setLevel(level)
    for h in list(LOGGER.handlers):
        if getattr(h, "_qsmprep", False):
            LOGGER.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    handler._qsmprep = True  # type: ignore[attr-defined]
    LOGGER.addHandler(handler)
    LOGGER.propagate = False


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


def _bad_value(path: Path, key: str, value, problem: str) -> InputError:
    return InputError(path, f"{key} = {value!r}: {problem}", "Fix this value in the config file", EX_DATAERR)


def _coerce(action: argparse.Action, value, path: Path, key: str):
    """Convert one config-file value like argparse would convert the option's text."""
    from qsmprep.cli.parser import Flag

    if isinstance(action, (Flag, argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        if not isinstance(value, bool):
            raise _bad_value(path, key, value, "expected true or false")
        return value
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _bad_value(path, key, value, "expected a non-negative integer")
        return value
    multi = action.nargs in ("+", "*")
    if isinstance(value, list) and not multi:
        raise _bad_value(path, key, value, "expected a single value")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _bad_value(path, key, value, "expected at least one value")
    out = []
    for item in items:
        if isinstance(item, (bool, dict, list)):
            raise _bad_value(path, key, value, "expected a string or a number")
        if action.type is not None:
            try:
                item = action.type(str(item))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
                raise _bad_value(path, key, value, str(exc)) from None
        else:
            item = str(item)
        if action.choices is not None and item not in action.choices:
            raise _bad_value(path, key, value, f"choose one of {', '.join(map(str, action.choices))}")
        if isinstance(item, Path) and not item.is_absolute():
            item = path.parent / item  # relative paths are relative to the config file
        out.append(item)
    return out if multi else out[0]


def load_config_file(path: Path, parser: argparse.ArgumentParser) -> dict:
    """Option values (by dest) from a TOML config file.

    Keys are long option names with dashes or underscores (``nprocs``, ``work-dir``, ``unwrapping``,
    ``participant_label = ["01"]``, ``mem = "16G"``), optionally inside a ``[qsmprep]`` table; also
    ``plugin`` / ``plugin_args`` (Nipype) and ``bids_filters`` (as in a filter file). Relative paths
    are relative to the config file. Missing file: exit 66; bad TOML, unknown keys or values: 65.
    """
    from qsmprep.utils.bids import _check_filters

    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise InputError(path, "config file not found", "Check the path given to --config-file", EX_NOINPUT)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(path, f"is not valid TOML ({exc})", "Fix the TOML syntax of the config file") from None
    if set(data) == {"qsmprep"} and isinstance(data["qsmprep"], dict):
        data = data["qsmprep"]
    actions: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if not a.option_strings or a.dest in ("help", "version", "config_file"):
            continue
        actions[a.dest] = a
        for s in a.option_strings:
            if s.startswith("--"):
                actions[s[2:].replace("-", "_")] = a
    out: dict = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k in _POSITIONAL:
            continue  # the positional arguments are always given on the command line, which wins
        if k == "plugin":
            if not isinstance(value, str):
                raise _bad_value(path, key, value, "expected a Nipype plugin name such as \"MultiProc\"")
            out["plugin"] = value
        elif k == "plugin_args":
            if not isinstance(value, dict):
                raise _bad_value(path, key, value, "expected a table")
            out["plugin_args"] = dict(value)
        elif k == "bids_filters":
            out["bids_filters"] = _check_filters(value, path)
        elif k == "method_params":
            if not isinstance(value, dict) or not all(
                s in _PARAM_STAGES and isinstance(v, dict) for s, v in value.items()
            ):
                raise _bad_value(
                    path, key, value, f"expected tables named after stages ({', '.join(_PARAM_STAGES)})"
                )
            out["method_params"] = {s: dict(v) for s, v in value.items()}
        elif k in actions:
            out[actions[k].dest] = _coerce(actions[k], value, path, str(key))
        else:
            raise InputError(
                path,
                f"unknown option {key!r}",
                "Use the long option names of qsmprep --help without dashes (e.g. nprocs, work_dir, unwrapping)",
                EX_DATAERR,
            )
    return out


def load_plugin_file(path: Path) -> tuple[str, dict]:
    """``(plugin, plugin_args)`` from a Nipype plugin YAML (``plugin: MultiProc`` + ``plugin_args:``)."""
    import yaml

    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise InputError(path, "Nipype plugin file not found", "Check the path given to --use-plugin", EX_NOINPUT)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        msg = " ".join(str(exc).split())
        raise InputError(path, f"is not valid YAML ({msg})", "Fix the YAML syntax of the plugin file") from None
    example = "Write e.g. 'plugin: MultiProc' and 'plugin_args: {n_procs: 8, memory_gb: 16}'"
    if not isinstance(data, dict) or not isinstance(data.get("plugin"), str):
        raise InputError(path, "a Nipype plugin file needs a 'plugin:' name", example)
    args = data.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise InputError(path, "'plugin_args:' must be a mapping", example)
    unknown = sorted(set(data) - {"plugin", "plugin_args"})
    if unknown:
        raise InputError(path, f"unknown key(s) {', '.join(map(str, unknown))}", example)
    return data["plugin"], dict(args)


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def parse_config(argv: Sequence[str] | None = None) -> QsmprepConfig:
    """Parse the command line and the optional config file into a :class:`QsmprepConfig`.

    Raises ``SystemExit`` (status 64 on usage errors, 0 for ``--help``/``--version``) and
    :class:`InputError` for config, filter and plugin file problems.
    """
    from qsmprep.cli.parser import build_parser

    parser = build_parser()
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    given = vars(args)
    merged = dict(load_config_file(given["config_file"], parser)) if "config_file" in given else {}
    if "bids_filter_file" in given:
        merged.pop("bids_filters", None)  # a filter file on the command line beats config-file filters
    if "use_plugin" in given:
        merged.pop("plugin", None)
        merged.pop("plugin_args", None)
    merged.update(given)

    cfg = QsmprepConfig()
    cfg.bids_dir = Path(merged["bids_dir"]).absolute()
    cfg.output_dir = Path(merged["output_dir"]).absolute()
    cfg.analysis_level = merged["analysis_level"]
    cfg.work_dir = Path(merged.get("work_dir", Path("work"))).expanduser().absolute()
    cfg.participant_label = list(dict.fromkeys(merged.get("participant_label", [])))
    cfg.session_label = list(dict.fromkeys(merged.get("session_label", [])))
    if "bids_filter_file" in merged:
        from qsmprep.utils.bids import load_bids_filters

        cfg.bids_filters = load_bids_filters(Path(merged["bids_filter_file"]).absolute())
    else:
        cfg.bids_filters = dict(merged.get("bids_filters", {}))

    plugin, plugin_args = merged.get("plugin"), dict(merged.get("plugin_args", {}))
    if "use_plugin" in merged:
        plugin, plugin_args = load_plugin_file(merged["use_plugin"])
    nprocs = merged.get("nprocs")
    if nprocs is None:
        nprocs = plugin_args.get("n_procs") or plugin_args.get("nprocs") or _cpu_count()
    cfg.nprocs = int(nprocs)
    cfg.omp_nthreads = int(merged.get("omp_nthreads") or min(cfg.nprocs, 8))
    mem = merged.get("mem_gb", plugin_args.get("memory_gb"))
    cfg.mem_gb = None if mem is None else float(mem)
    if plugin is None:
        plugin = "Linear" if cfg.nprocs == 1 else "MultiProc"
    if plugin == "MultiProc":
        if "nprocs" in merged or "n_procs" not in plugin_args:
            plugin_args["n_procs"] = cfg.nprocs
        if cfg.mem_gb is not None and ("mem_gb" in merged or "memory_gb" not in plugin_args):
            plugin_args["memory_gb"] = cfg.mem_gb
        plugin_args.setdefault("raise_insufficient", False)
    cfg.plugin, cfg.plugin_args = plugin, plugin_args
    cfg.method_params = dict(merged.get("method_params", {}))
    if merged.get("segmentation_dir") is not None:
        cfg.segmentation_dir = Path(merged["segmentation_dir"]).expanduser().absolute()

    for key in (
        "stop_on_first_crash",
        "boilerplate_only",
        "write_graph",
        "resource_monitor",
        "skip_bids_validation",
        "device",
        "self_supervised_steps",
        "masking",
        "unwrapping",
        "bgremove",
        "inversion",
        "reference",
        "r2star",
        "t2star",
        "reports_only",
    ):
        if key in merged:
            setattr(cfg, key, merged[key])
    cfg.verbose = int(merged.get("verbose", 0))
    return cfg


# --------------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------------


def validate_inputs(cfg: QsmprepConfig) -> list:
    """Every input check, in order; returns the :class:`~qsmprep.utils.bids.QsmRun` list. Writes nothing."""
    from qsmprep.utils.bids import collect_runs
    from qsmprep.utils.validation import check_bids_root, check_paths, check_runs, run_bids_validator

    check_paths(cfg.bids_dir, cfg.output_dir, cfg.work_dir)
    check_bids_root(cfg.bids_dir)
    t0 = time.perf_counter()
    runs = collect_runs(cfg.bids_dir, cfg.participant_label, cfg.session_label, cfg.bids_filters)
    check_runs(runs)
    LOGGER.info("input checks passed in %.1f s", time.perf_counter() - t0)
    if not cfg.skip_bids_validation:
        run_bids_validator(cfg.bids_dir, sorted({r.subject for r in runs}) if cfg.participant_label else ())
    if cfg.omp_nthreads > cfg.nprocs:
        LOGGER.warning("--omp-nthreads %d exceeds --nprocs %d", cfg.omp_nthreads, cfg.nprocs)
    return runs


def _check_plugin(cfg: QsmprepConfig) -> None:
    from nipype.pipeline import plugins

    if not hasattr(plugins, f"{cfg.plugin}Plugin"):
        known = sorted(n[: -len("Plugin")] for n in dir(plugins) if n.endswith("Plugin") and n != "Plugin")
        raise InputError(
            f"plugin {cfg.plugin!r}",
            "is not a Nipype execution plugin",
            f"Use one of {', '.join(known)} in the plugin file (--use-plugin) or config file",
            EX_DATAERR,
        )


def _check_methods(cfg: QsmprepConfig) -> None:
    """Defaults of the config must name registered methods (explicit choices were checked by argparse)."""
    from qsmprep.cli.parser import method_choices

    for stage in ("masking", "unwrapping", "bgremove", "inversion", "reference"):
        value = getattr(cfg, stage)
        choices = method_choices(stage)
        if value not in choices:
            raise InputError(
                f"--{stage}",
                f"the method {value!r} is not available (choices: {', '.join(choices)})",
                f"Pass --{stage} with one of the choices",
                EX_USAGE,
            )


def _check_device(cfg: QsmprepConfig) -> None:
    if cfg.device != "cuda":
        return
    try:
        import torch

        ok = bool(torch.cuda.is_available())
    except Exception:
        ok = False
    if not ok:
        raise InputError(
            "--device cuda",
            "no CUDA GPU is available to PyTorch",
            "Use --device auto or cpu (in a container, expose the GPU: docker run --gpus all / apptainer run --nv)",
            EX_USAGE,
        )


# --------------------------------------------------------------------------------------------------
# workflow
# --------------------------------------------------------------------------------------------------


def _boilerplate(wf, cfg: QsmprepConfig) -> str:
    """Methods text: the workflow's own ``visit_desc()``/``__desc__`` texts, else a summary of the config."""
    texts: list[str] = []
    if hasattr(wf, "visit_desc"):
        try:
            texts.append(str(wf.visit_desc()))
        except Exception:  # pragma: no cover - depends on the workflow layer
            texts = []
    if not texts:
        seen = set()

        def visit(w):
            if id(w) in seen:
                return
            seen.add(id(w))
            for attr in ("__desc__", "__postdesc__"):
                if getattr(w, attr, None):
                    texts.append(str(getattr(w, attr)).strip())
            graph = getattr(w, "_graph", None)
            if graph is not None:
                import networkx as nx

                try:
                    order = list(nx.topological_sort(graph))
                except Exception:  # pragma: no cover
                    order = list(graph.nodes())
                for node in order:
                    if hasattr(node, "_graph"):
                        visit(node)

        visit(wf)
    if not texts:
        texts.append(
            f"Quantitative susceptibility maps were computed with qsmprep {__version__}: brain masking "
            f"({cfg.masking}), phase unwrapping ({cfg.unwrapping}), background field removal ({cfg.bgremove}), "
            f"dipole inversion ({cfg.inversion}) and susceptibility referencing ({cfg.reference})."
        )
    return "\n\n".join(t for t in texts if t).strip() + "\n"


def _configure_nipype(cfg: QsmprepConfig, log_dir: Path) -> None:
    from nipype import config as ncfg
    from nipype import logging as nlogging

    level = "DEBUG" if cfg.verbose >= 3 else ("INFO" if cfg.verbose >= 2 else "WARNING")
    ncfg.update_config(
        {
            "logging": {"workflow_level": level, "interface_level": level, "utils_level": level},
            "execution": {
                "crashdump_dir": str(log_dir),
                "crashfile_format": "txt",
                "stop_on_first_crash": str(bool(cfg.stop_on_first_crash)).lower(),
            },
            "monitoring": {"enabled": str(bool(cfg.resource_monitor)).lower()},
        }
    )
    if cfg.resource_monitor:
        ncfg.enable_resource_monitor()
    nlogging.update_logging(ncfg)


def _run_workflow(cfg: QsmprepConfig, runs: list) -> int:
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network
    _check_methods(cfg)
    _check_plugin(cfg)
    log_dir = cfg.output_dir / "logs"
    _configure_nipype(cfg, log_dir)
    try:
        from qsmprep.workflows.base import init_qsmprep_wf
    except ImportError as exc:
        print(
            f"qsmprep: error: qsmprep.workflows.base: the workflow layer cannot be imported ({exc}). "
            "Reinstall qsmprep.",
            file=sys.stderr,
        )
        return EX_FAILURE
    try:
        wf = init_qsmprep_wf(cfg, runs)
    except Exception as exc:
        if cfg.verbose:
            traceback.print_exc()
        print(
            f"qsmprep: error: building the workflow failed ({type(exc).__name__}: {' '.join(str(exc).split())}). "
            "This is a bug; rerun with -v for the traceback and report it.",
            file=sys.stderr,
        )
        return EX_FAILURE
    if getattr(wf, "base_dir", None) is None:
        wf.base_dir = str(cfg.work_dir)
    if not isinstance(getattr(wf, "config", None), dict):
        wf.config = {}
    wf.config.setdefault("execution", {})
    wf.config["execution"].update(
        {
            "crashdump_dir": str(log_dir),
            "crashfile_format": "txt",
            "stop_on_first_crash": str(bool(cfg.stop_on_first_crash)).lower(),
        }
    )

    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(exist_ok=True)
    citation = log_dir / "CITATION.md"
    citation.write_text(_boilerplate(wf, cfg), encoding="utf-8")
    if cfg.boilerplate_only:
        LOGGER.log(IMPORTANT, "wrote the methods boilerplate to %s", citation)
        return EX_OK
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    if cfg.write_graph:
        try:
            wf.write_graph(graph2use="colored", format="svg", simple_form=True)
        except Exception as exc:  # graphviz missing, ...
            LOGGER.warning("could not write the workflow graph (%s)", " ".join(str(exc).split()))
    LOGGER.log(
        IMPORTANT,
        "running %d series with the %s plugin (%s); work directory %s",
        len(runs),
        cfg.plugin,
        ", ".join(f"{k}={v}" for k, v in cfg.plugin_args.items()) or "no arguments",
        cfg.work_dir,
    )
    t0 = time.time()
    try:
        plugin, plugin_args = make_plugin(cfg.plugin, cfg.plugin_args)
        wf.run(plugin=plugin, plugin_args=plugin_args)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        crashes = sorted(p for p in log_dir.glob("crash-*") if p.stat().st_mtime >= t0 - 1)
        if cfg.verbose:
            traceback.print_exc()
        _write_reports(cfg, runs)
        if crashes:
            print(
                f"qsmprep: error: {log_dir}: {len(crashes)} processing step{'s' if len(crashes) != 1 else ''} failed "
                f"(first: {crashes[0].name}). Read the crash file, fix the cause and rerun; finished steps are "
                f"reused from {cfg.work_dir}.",
                file=sys.stderr,
            )
        else:
            print(
                f"qsmprep: error: the workflow failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}). "
                "Rerun with -v for details.",
                file=sys.stderr,
            )
        return EX_FAILURE
    LOGGER.log(IMPORTANT, "finished in %.0f s; outputs in %s", time.time() - t0, cfg.output_dir)
    _write_reports(cfg, runs)
    return EX_OK


# --------------------------------------------------------------------------------------------------
# reports and group level
# --------------------------------------------------------------------------------------------------


def _write_reports(cfg: QsmprepConfig, runs: list) -> list:
    """HTML report of each participant of ``runs``; a failing report is a warning, never an exit status."""
    subjects = sorted({str(r.subject) for r in runs})
    t0 = time.perf_counter()
    try:
        from qsmprep.reports import generate_reports

        written = generate_reports(cfg.output_dir, subjects, bids_dir=cfg.bids_dir)
    except Exception as exc:  # pragma: no cover - the reports must not hide the processing result
        LOGGER.warning("could not write the reports (%s: %s)", type(exc).__name__, " ".join(str(exc).split()))
        return []
    if written:
        LOGGER.log(
            IMPORTANT,
            "wrote %d report%s in %.1f s: %s",
            len(written),
            "s" if len(written) != 1 else "",
            time.perf_counter() - t0,
            ", ".join(str(p) for p in written[:5]) + (", ..." if len(written) > 5 else ""),
        )
    return written


def _check_segmentation_dir(cfg: QsmprepConfig) -> None:
    """``--segmentation-dir`` must be an existing folder holding ``*_dseg`` images (exit 66)."""
    path = cfg.segmentation_dir
    if path is None:
        return
    if not path.is_dir():
        raise InputError(
            path,
            "segmentation directory not found" if not path.exists() else "is not a directory",
            "Give --segmentation-dir the root of a BIDS derivative dataset with sub-<label>/anat/*_dseg.nii.gz "
            "and a *_dseg.tsv label table",
            EX_NOINPUT,
        )
    if next(path.glob("sub-*/**/*_dseg.nii*"), None) is None:
        raise InputError(
            path,
            "no segmentation images (sub-<label>/[ses-<label>/]anat/*_dseg.nii[.gz]) found",
            "Point --segmentation-dir at the root of a BIDS derivative dataset with *_dseg images",
            EX_NOINPUT,
        )


def _no_outputs(cfg: QsmprepConfig, what: str) -> InputError:
    return InputError(
        cfg.output_dir,
        what,
        "Run the participant level first: qsmprep BIDS_DIR OUTPUT_DIR participant",
        EX_NOINPUT,
    )


def _reports_only(cfg: QsmprepConfig) -> int:
    """``--reports-only``: rebuild the reports of the selected (default: all) participants of OUTPUT_DIR."""
    from qsmprep.reports._outputs import subjects_with_outputs
    from qsmprep.utils.validation import check_paths

    check_paths(cfg.bids_dir, cfg.output_dir, None)
    if not cfg.output_dir.is_dir():
        raise _no_outputs(cfg, "OUTPUT_DIR does not exist, so there are no outputs to report on")
    have = subjects_with_outputs(cfg.output_dir)
    subjects = list(cfg.participant_label) or have
    missing = [s for s in subjects if s not in have]
    if missing:
        raise InputError(
            cfg.output_dir,
            f"no outputs of participant{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(OUTPUT_DIR has: {', '.join(have[:20]) or 'none'}{', ...' if len(have) > 20 else ''})",
            "Check --participant-label, or run the participant level first",
            EX_NOINPUT,
        )
    if not subjects:
        raise _no_outputs(cfg, "no sub-<label> folders, so there are no outputs to report on")
    t0 = time.perf_counter()
    from qsmprep.reports import generate_reports

    written = generate_reports(cfg.output_dir, subjects, bids_dir=cfg.bids_dir)
    LOGGER.log(IMPORTANT, "rebuilt %d report%s in %.1f s (no processing was run)", len(written),
               "s" if len(written) != 1 else "", time.perf_counter() - t0)
    return EX_OK if len(written) == len(subjects) else EX_FAILURE


def _run_group(cfg: QsmprepConfig) -> int:
    """The group level: ``group_qc.tsv``, ``group_roi.tsv`` and ``group.html`` in OUTPUT_DIR."""
    from qsmprep.reports import NoProcessedRunsError, run_group

    if not cfg.output_dir.is_dir():
        raise _no_outputs(cfg, "OUTPUT_DIR does not exist, so there are no processed series for the group level")
    t0 = time.perf_counter()
    try:
        paths = run_group(cfg.output_dir, cfg.participant_label or None, cfg.session_label or None)
    except NoProcessedRunsError:
        selection = " of the selected participants/sessions" if cfg.participant_label or cfg.session_label else ""
        raise _no_outputs(
            cfg, f"no processed series{selection} found (no sub-<label>/[ses-<label>/]anat/*_Chimap.nii.gz)"
        ) from None
    LOGGER.log(IMPORTANT, "group level done in %.1f s: %s", time.perf_counter() - t0,
               ", ".join(str(p) for p in paths.values()))
    return EX_OK


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def _check_learned_methods(cfg: QsmprepConfig) -> None:
    """Fail before any work when a learned method's model file is missing or corrupt, or when
    ``--self-supervised-steps`` is given without the learned inversion."""
    import inspect

    from qsmprep.utils.boilerplate import canonical_method, method_function, method_params

    if cfg.self_supervised_steps and canonical_method("inversion", cfg.inversion) != "nextqsm":
        raise InputError("--self-supervised-steps", f"applies to --inversion nextqsm, not {cfg.inversion}",
                         "add --inversion nextqsm or drop the option", code=EX_USAGE)
    for stage in ("bgremove", "inversion"):
        try:
            name, func = method_function(stage, getattr(cfg, stage))
        except ValueError:
            continue  # an unknown name is reported by _check_methods
        params = inspect.signature(func).parameters
        if "model" not in params:
            continue
        from qsmprep.nn.models import ModelFileError, load_model

        user = method_params(cfg, stage)
        try:
            load_model(user.get("model", params["model"].default), device="cpu", directory=user.get("model_dir"))
        except ModelFileError as exc:
            raise InputError(f"--{stage} {name}", str(exc), f"or choose another --{stage} method", code=EX_USAGE) from None


def _main(argv: Sequence[str] | None) -> int:
    try:
        cfg = parse_config(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or usage error (64)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EX_USAGE
    _setup_logging(cfg.verbose)
    if cfg.analysis_level == "group":
        return _run_group(cfg)
    _check_segmentation_dir(cfg)
    if cfg.reports_only:
        return _reports_only(cfg)
    _check_device(cfg)
    _check_learned_methods(cfg)
    runs = validate_inputs(cfg)
    LOGGER.log(
        IMPORTANT,
        "found %d QSM series: %s",
        len(runs),
        ", ".join(f"{r.prefix()} ({r.suffix}, {r.n_echoes} echo{'es' if r.n_echoes != 1 else ''})" for r in runs[:10])
        + (", ..." if len(runs) > 10 else ""),
    )
    return _run_workflow(cfg, runs)


def main(argv: Sequence[str] | None = None) -> int:
    """Run qsmprep; returns the exit status (0, 1, 64, 65 or 66). ``argv`` defaults to ``sys.argv[1:]``."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    try:
        return _main(argv)
    except InputError as err:
        print(f"qsmprep: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("qsmprep: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
