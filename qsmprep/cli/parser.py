"""Command line and config file of the ``qsmprep`` BIDS App, turned into a :class:`~qsmprep.config.QsmprepConfig`.

``qsmprep BIDS_DIR OUTPUT_DIR {participant,group} [options]`` (BIDS Apps 1.0). Options accept both
dash and underscore spellings; each option's ``dest`` is the name of a config field. Every option has
the default ``argparse.SUPPRESS`` so that the namespace holds only what was typed:
:func:`parse_config` layers defaults (:class:`~qsmprep.config.QsmprepConfig`) < ``--config-file``
(TOML) < command line. Usage errors exit with status 64 (``EX_USAGE``) and one line on stderr.

The method options (``--masking``, ``--bgremove``, ...) are made from the config's method fields, with
the names of the method catalogue (:mod:`qsmprep.methods`, which imports no PyTorch) as choices.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from pathlib import Path
from typing import NoReturn, Sequence

from qsmprep.__about__ import __version__
from qsmprep.config import DEVICES, MethodParams, QsmprepConfig
from qsmprep.methods import STAGES
from qsmprep.qsm.swi import SWI_PHASE_SCALINGS
from qsmprep.utils.errors import EX_DATAERR, EX_NOINPUT, EX_USAGE, InputError

__all__ = ["Flag", "build_parser", "parse_config", "load_config_file", "load_plugin_file", "parse_mem_gb"]

#: keys given on the command line only (positional); ignored in a config file
_POSITIONAL = ("bids_dir", "output_dir", "analysis_level")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


class QsmprepArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors print one line and exit 64 (``EX_USAGE``), not 2."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(str(message).split())
        self.exit(EX_USAGE, f"{self.prog}: error: {message}. See '{self.prog} --help'.\n")


class Flag(argparse.Action):
    """On/off option: ``--name`` (and its aliases) sets True, ``--no-name`` sets False."""

    def __init__(self, option_strings, dest, default=None, help=None, **kwargs):
        opts = list(option_strings)
        if opts and opts[0].startswith("--"):
            opts.append("--no-" + opts[0][2:])
        super().__init__(opts, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not str(option_string).startswith("--no-"))

    def format_usage(self) -> str:
        return self.option_strings[0]


# --------------------------------------------------------------------------------------------------
# value types
# --------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(str(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_MEM_UNITS = {"": 1.0, "k": 1e-6, "m": 1e-3, "g": 1.0, "t": 1e3}


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def parse_mem_gb(text) -> float:
    """Memory in GB from ``"16"``, ``"16G"``, ``"16GB"``, ``"16000M"``, ``"0.5T"`` (bare numbers: GB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size (e.g. 16, 16G, 16000M)")
    value = float(m.group(1)) * _MEM_UNITS[m.group(2).lower()]
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _label(text: str) -> str:
    text = str(text).strip()
    for prefix in ("sub-", "ses-"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    if not re.fullmatch(r"[A-Za-z0-9]+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a BIDS label (letters and digits only)")
    return text


def _existing_or_any_path(text: str) -> Path:
    return Path(text).expanduser()


# --------------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------------


def build_parser(prog: str = "qsmprep") -> QsmprepArgumentParser:
    """The ``qsmprep`` parser (options default to SUPPRESS; see the module docstring)."""
    d = QsmprepConfig()
    S = argparse.SUPPRESS
    p = QsmprepArgumentParser(
        prog=prog,
        description=(
            "qsmprep: quantitative susceptibility mapping (QSM) of multi-echo gradient-echo MRI "
            "(BIDS MEGRE or T2starw with part-mag/part-phase), as a BIDS App."
        ),
        epilog=(
            "Exit status: 0 success, 1 a processing step failed, 64 usage error, 65 invalid input data, "
            "66 missing input. Values of --config-file are overridden by the command line."
        ),
        allow_abbrev=False,
        argument_default=S,
    )
    p.add_argument("bids_dir", type=_existing_or_any_path, help="root folder of the input BIDS dataset (read only)")
    p.add_argument(
        "output_dir",
        type=_existing_or_any_path,
        help="output folder for the derivatives (e.g. BIDS_DIR/derivatives/qsmprep)",
    )
    p.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="'participant': process each participant and write its HTML report; 'group': tabulate the QC "
        "metrics and region statistics of every series processed in OUTPUT_DIR (group_qc.tsv, group_roi.tsv, "
        "group.html)",
    )
    p.add_argument("--version", action="version", version=f"qsmprep {__version__}")
    p.add_argument(
        "-v", "--verbose", dest="verbose", action="count", help="more log output: -v details and Nipype's own progress lines, -vv debug, -vvv Nipype debug (default: one line per finished step and warnings)"
    )
    p.add_argument(
        "--config-file",
        "--config_file",
        dest="config_file",
        type=_existing_or_any_path,
        metavar="FILE",
        help="TOML file of options (keys are the long option names, e.g. nprocs = 4, unwrapping = \"romeo\"); "
        "the command line overrides it",
    )

    g = p.add_argument_group("Selecting input data")
    g.add_argument(
        "--participant-label",
        "--participant_label",
        dest="participant_label",
        nargs="+",
        type=_label,
        metavar="LABEL",
        help="participants to process (the 'sub-' prefix may be omitted); default: all",
    )
    g.add_argument(
        "--session-label",
        "--session_label",
        dest="session_label",
        nargs="+",
        type=_label,
        metavar="LABEL",
        help="sessions to process (the 'ses-' prefix may be omitted); default: all",
    )
    g.add_argument(
        "--bids-filter-file",
        "--bids_filter_file",
        dest="bids_filter_file",
        type=_existing_or_any_path,
        metavar="FILE",
        help='JSON file of pybids filters per query, e.g. {"megre": {"acquisition": "qsm"}, "t2starw": {...}}; '
        'null selects files without the entity, "*" any value',
    )
    g.add_argument(
        "--skip-bids-validation",
        "--skip_bids_validation",
        "--skip_bids_validator",
        dest="skip_bids_validation",
        action=Flag,
        help=f"do not run bids-validator-deno on BIDS_DIR (qsmprep's own checks still run) (default: {d.skip_bids_validation})",
    )

    g = p.add_argument_group("Methods")
    for name, stage in QsmprepConfig.method_fields().items():
        registry = STAGES[stage]
        option = "--" + name.replace("_", "-")
        g.add_argument(
            option, *([f"--{name}"] if "_" in name else []), dest=name, choices=registry.names(),
            type=registry.canonical, metavar="{" + ",".join(registry.names()) + "}",
            help=f"{registry.title} method: "
            + "; ".join(f"{n} = {registry.method(n).label}" for n in registry.names())
            + f" (default: {getattr(d, name)})",
        )
    g.add_argument(
        "--r2star",
        action=Flag,
        help=f"also write an R2* map (1/s) from the magnitude decay (default: {d.r2star})",
    )
    g.add_argument(
        "--t2star",
        action=Flag,
        help=f"also write a T2* map (s) from the magnitude decay (default: {d.t2star})",
    )
    g.add_argument(
        "--swi",
        action=Flag,
        help="also write a susceptibility-weighted image (CLEAR-SWI: echo-combined magnitude x phase mask of the "
        f"high-pass filtered field) and its minimum-intensity projection (default: {d.swi})",
    )
    g.add_argument(
        "--swi-minip-slab-mm",
        "--swi_minip_slab_mm",
        dest="swi_minip_slab_mm",
        type=_positive_float,
        metavar="MM",
        help=f"slab thickness of the SWI minimum-intensity projection along the slice axis (default: {d.swi_minip_slab_mm:g})",
    )
    g.add_argument(
        "--swi-phase-scaling",
        "--swi_phase_scaling",
        dest="swi_phase_scaling",
        choices=list(SWI_PHASE_SCALINGS),
        help="SWI phase mask: tanh (CLEAR-SWI) or positive (Haacke 2004: linear mask of the positive field to a "
        f"power) (default: {d.swi_phase_scaling})",
    )
    g.add_argument(
        "--swi-phase-strength",
        "--swi_phase_strength",
        dest="swi_phase_strength",
        type=_positive_float,
        metavar="X",
        help=f"strength (tanh) or power (positive) of the SWI phase mask (default: {d.swi_phase_strength:g})",
    )
    g.add_argument(
        "--device",
        choices=list(DEVICES),
        help=f"device of the neural-network steps: auto uses a CUDA GPU when present (default: {d.device})",
    )
    g.add_argument(
        "--self-supervised-steps",
        type=_non_negative_int,
        metavar="N",
        help="uQSM-style test-time refinement of the learned inversion (--inversion nextqsm): fine-tune the "
        f"network on each subject's own field for N steps (default: {d.self_supervised_steps}: off)",
    )

    g = p.add_argument_group("Reports and regions")
    g.add_argument(
        "--reports-only",
        "--reports_only",
        dest="reports_only",
        action=Flag,
        help="rebuild the HTML reports (OUTPUT_DIR/sub-<label>.html) from the existing outputs without "
        f"running any processing (default: {d.reports_only})",
    )
    g.add_argument(
        "--segmentation-dir",
        "--segmentation_dir",
        dest="segmentation_dir",
        type=_existing_or_any_path,
        metavar="DIR",
        help="BIDS derivative dataset with a segmentation (*_dseg.nii[.gz] + *_dseg.tsv label table) on the grid "
        "of each series: per-region susceptibility statistics are written next to the Chimap",
    )

    g = p.add_argument_group("Anatomical and template spaces")
    g.add_argument(
        "--output-spaces",
        "--output_spaces",
        dest="output_spaces",
        nargs="+",
        metavar="SPACE",
        help="spaces to resample the Chimap into, besides the native GRE grid (always written): T1w, "
        "MNI152NLin6Asym[:res-2], MNI152NLin2009cAsym[:res-1] (fMRIPrep's names; a template needs a T1w of the "
        "subject and its files in TEMPLATEFLOW_HOME; without a template the nonlinear step is skipped); "
        "default: none",
    )
    g.add_argument(
        "--derivatives",
        dest="derivatives",
        nargs="+",
        type=_existing_or_any_path,
        metavar="DIR",
        help="sMRIPrep/fMRIPrep output folders (desc-preproc_T1w, desc-brain_mask, desc-aseg_dseg/dseg, "
        "from-T1w_to-<template>_mode-image_xfm.h5 are reused, not recomputed) or FreeSurfer/FastSurfer "
        "SUBJECTS_DIRs (mri/aseg.mgz): segmentations give region tables on the GRE grid",
    )
    g.add_argument(
        "--atlas",
        dest="atlas",
        nargs="+",
        metavar="ATLAS",
        help="TemplateFlow atlases warped to the GRE grid for region statistics: "
        "<template>:<atlas>[:desc-<d>][:res-<r>], e.g. MNI152NLin6Asym:HOCPA:desc-th25:res-2 (needs a T1w)",
    )
    g.add_argument(
        "--roi-erode-voxels",
        "--roi_erode_voxels",
        dest="roi_erode_voxels",
        type=_non_negative_int,
        metavar="N",
        help=f"erode each region by N voxels of the GRE grid before its statistics, against partial volume "
        f"(registered segmentations and atlases) (default: {d.roi_erode_voxels})",
    )

    g = p.add_argument_group("Execution")
    g.add_argument(
        "-w",
        "--work-dir",
        "--work_dir",
        dest="work_dir",
        type=_existing_or_any_path,
        metavar="DIR",
        help="folder for intermediate results (reused on rerun) (default: ./work)",
    )
    g.add_argument(
        "--nprocs",
        "--nthreads",
        "--n-cpus",
        "--n_cpus",
        dest="nprocs",
        type=_positive_int,
        metavar="N",
        help="maximum number of CPUs used across all processes (default: all available)",
    )
    g.add_argument(
        "--omp-nthreads",
        "--omp_nthreads",
        dest="omp_nthreads",
        type=_positive_int,
        metavar="N",
        help="maximum number of threads per process (default: min(nprocs, 8))",
    )
    g.add_argument(
        "--mem",
        "--mem-gb",
        "--mem_gb",
        dest="mem_gb",
        type=parse_mem_gb,
        metavar="GB",
        help="upper bound of memory use in GB (suffixes K/M/G/T accepted, e.g. 16G, 16000M)",
    )
    g.add_argument(
        "--use-plugin",
        "--use_plugin",
        "--nipype-plugin-file",
        dest="use_plugin",
        type=_existing_or_any_path,
        metavar="FILE",
        help="Nipype plugin YAML with 'plugin:' (MultiProc, Linear, SLURMGraph, ...) and 'plugin_args:'",
    )
    g.add_argument(
        "--stop-on-first-crash",
        "--stop_on_first_crash",
        dest="stop_on_first_crash",
        action=Flag,
        help=f"stop at the first failed step instead of running all that can run (default: {d.stop_on_first_crash})",
    )
    g.add_argument(
        "--boilerplate-only",
        "--boilerplate_only",
        dest="boilerplate_only",
        action=Flag,
        help=f"write the methods boilerplate (OUTPUT_DIR/logs/CITATION.md) and exit (default: {d.boilerplate_only})",
    )
    g.add_argument(
        "--write-graph",
        "--write_graph",
        dest="write_graph",
        action=Flag,
        help=f"write the workflow graph (SVG) into the work directory (default: {d.write_graph})",
    )
    g.add_argument(
        "--resource-monitor",
        "--resource_monitor",
        dest="resource_monitor",
        action=Flag,
        help=f"enable Nipype's memory and CPU monitoring (default: {d.resource_monitor})",
    )
    return p


# --------------------------------------------------------------------------------------------------
# config file and settings
# --------------------------------------------------------------------------------------------------


def _bad_value(path: Path, key: str, value, problem: str) -> InputError:
    return InputError(path, f"{key} = {value!r}: {problem}", "Fix this value in the config file", EX_DATAERR)


def _coerce(action: argparse.Action, value, path: Path, key: str):
    """Convert one config-file value like argparse would convert the option's text."""
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
    from qsmprep.utils.bids import check_filters

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
            out["bids_filters"] = check_filters(value, path)
        elif k == "method_params":
            try:
                if not isinstance(value, dict):
                    raise ValueError(f"expected tables named after stages ({', '.join(MethodParams.stages())})")
                out["method_params"] = MethodParams.from_mapping(value)
            except ValueError as exc:
                raise _bad_value(path, key, value, str(exc)) from None
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
    :class:`InputError` for config, filter and plugin file problems. The config is not validated yet
    (:meth:`QsmprepConfig.validate`).
    """
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
    merged.pop("config_file", None)

    merged.setdefault("work_dir", Path("work"))
    if "bids_filter_file" in merged:
        from qsmprep.utils.bids import load_bids_filters

        merged["bids_filters"] = load_bids_filters(Path(merged.pop("bids_filter_file")).absolute())
    plugin, plugin_args = merged.get("plugin"), dict(merged.get("plugin_args", {}))
    if "use_plugin" in merged:
        plugin, plugin_args = load_plugin_file(merged.pop("use_plugin"))
    nprocs = merged.get("nprocs")
    if nprocs is None:
        nprocs = plugin_args.get("n_procs") or plugin_args.get("nprocs") or _cpu_count()
    nprocs = int(nprocs)
    merged["omp_nthreads"] = int(merged.get("omp_nthreads") or min(nprocs, 8))
    mem = merged.get("mem_gb", plugin_args.get("memory_gb"))
    if plugin is None:
        plugin = "Linear" if nprocs == 1 else "MultiProc"
    if plugin == "MultiProc":
        if "nprocs" in merged or "n_procs" not in plugin_args:
            plugin_args["n_procs"] = nprocs
        if mem is not None and ("mem_gb" in merged or "memory_gb" not in plugin_args):
            plugin_args["memory_gb"] = mem
        plugin_args.setdefault("raise_insufficient", False)
    merged.update(nprocs=nprocs, mem_gb=mem, plugin=plugin, plugin_args=plugin_args)
    return QsmprepConfig.from_dict(merged)
