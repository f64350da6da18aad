"""Command-line parser of the ``qsmprep`` BIDS App.

``qsmprep BIDS_DIR OUTPUT_DIR {participant,group} [options]`` (BIDS Apps 1.0). Options accept both
dash and underscore spellings. Every option has the default ``argparse.SUPPRESS`` so that the
namespace holds only what was typed: :mod:`qsmprep.cli.run` layers defaults
(:class:`~qsmprep.config.QsmprepConfig`) < ``--config-file`` (TOML) < command line. Usage errors exit
with status 64 (``EX_USAGE``) and one line on stderr.

The method choices come from the algorithm registries (:mod:`qsmprep.qsm.registry`), which fill when
their modules are imported; that happens in :func:`build_parser`, not at import of this module.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path
from typing import NoReturn

from qsmprep.__about__ import __version__
from qsmprep.config import QsmprepConfig

__all__ = ["Flag", "build_parser", "method_choices", "parse_mem_gb", "EX_USAGE", "METHOD_STAGES"]

EX_USAGE = 64

#: option dest -> (registry attribute in qsmprep.qsm.registry, module that registers it, fallback names)
METHOD_STAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "masking": ("MASKING", "qsmprep.qsm.masking", ("phase", "magnitude", "robust")),
    "unwrapping": ("UNWRAP", "qsmprep.qsm.unwrap", ("romeo", "laplacian")),
    "bgremove": ("BGREMOVE", "qsmprep.qsm.bgremove", ("vsharp", "sharp", "pdf", "ismv", "lbv")),
    "inversion": ("INVERSION", "qsmprep.qsm.inversion", ("rts", "tkd", "tsvd", "tikhonov", "tv")),
    "reference": ("REFERENCE", "qsmprep.qsm.reference", ("mean", "csf", "none")),
}

#: learned methods (registered by :mod:`qsmprep.nn`, which imports PyTorch: listed here so that
#: ``--help`` stays quick; a test checks the list against the registries)
LEARNED_METHODS: dict[str, tuple[str, ...]] = {"bgremove": ("nextqsm", "nextqsm-unet"), "inversion": ("deepqsm", "nextqsm")}

#: values of ``--reference`` that the workflow handles itself (no registry entry needed)
REFERENCE_EXTRA = ("none",)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def method_choices(stage: str) -> list[str]:
    """Registered names of a pipeline stage (importing its module), or built-in names if none are.

    ``--reference`` always offers ``none`` (no referencing).
    """
    attr, module, fallback = METHOD_STAGES[stage]
    try:
        importlib.import_module(module)
    except Exception:  # a missing or broken algorithm module must not break the CLI
        pass
    from qsmprep.qsm import registry

    names = list(getattr(registry, attr).names()) or list(fallback)
    names += [n for n in LEARNED_METHODS.get(stage, ()) if n not in names]
    if stage == "reference":
        names += [n for n in REFERENCE_EXTRA if n not in names]
    return names


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
        "-v", "--verbose", dest="verbose", action="count", help="more log output: -v details, -vv debug and Nipype progress, -vvv Nipype debug (default: progress lines and warnings)"
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
    g.add_argument(
        "--masking", choices=method_choices("masking"), help=f"brain-masking method (default: {d.masking})"
    )
    g.add_argument(
        "--unwrapping", choices=method_choices("unwrapping"), help=f"phase-unwrapping method (default: {d.unwrapping})"
    )
    g.add_argument(
        "--bgremove", choices=method_choices("bgremove"), help=f"background-field removal (default: {d.bgremove})"
    )
    g.add_argument("--inversion", choices=method_choices("inversion"), help=f"dipole inversion (default: {d.inversion})")
    g.add_argument(
        "--reference",
        choices=method_choices("reference"),
        help=f"susceptibility reference: mean of the brain, CSF, or none (default: {d.reference})",
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
        "--device",
        choices=["auto", "cuda", "cpu"],
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


def main(argv=None) -> int:  # pragma: no cover - convenience for `python -m qsmprep.cli.parser`
    try:
        print(build_parser().parse_args(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
