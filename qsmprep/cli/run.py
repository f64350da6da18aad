"""Entry point of the ``qsmprep`` BIDS App: parse, configure, validate the input, run the workflow.

Order of work (nothing is written before every input check has passed):

1. parse the command line and ``--config-file`` into a :class:`~qsmprep.config.QsmprepConfig`
   (:func:`qsmprep.cli.parser.parse_config`; usage errors: exit 64) and validate the settings
   (:meth:`~qsmprep.config.QsmprepConfig.validate`: methods, method parameters, device, model files);
2. check paths, discover the QSM series (:func:`qsmprep.utils.bids.collect_runs`), check headers and
   phase data (:mod:`qsmprep.utils.validation`), check the settings against the data, then run
   ``bids-validator-deno`` unless ``--skip-bids-validation`` (input errors: exit 65 invalid data, 66
   missing input);
3. build ``qsmprep.workflows.base.init_qsmprep_wf(config, runs)``, write the dataset-level files once
   (:func:`write_dataset_files`) and run the workflow with the Nipype plugin (a failed node: exit 1);
4. write the HTML report of each processed participant (``OUTPUT_DIR/sub-<label>.html``), also after a
   failure (its Errors section lists the crash files).

``--reports-only`` does step 5 alone from the existing outputs. The ``group`` level tabulates the QC
metrics and region statistics of every processed series (:func:`qsmprep.reports.run_group`; exit 66
when OUTPUT_DIR holds none).

Every error is one line on stderr: ``qsmprep: error: <file>: <problem>. <fix>``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Sequence

from qsmprep.cli.parser import parse_config
from qsmprep.config import QsmprepConfig
from qsmprep.utils.allocation import tune_allocation
from qsmprep.utils.errors import EX_DATAERR, EX_FAILURE, EX_NOINPUT, EX_OK, EX_USAGE, InputError
from qsmprep.utils.plugins import DEFAULT_MP_CONTEXT, PROGRESS_LEVEL, StepReporter, make_plugin, start_worker_server

__all__ = ["main", "validate_inputs", "write_dataset_files", "IMPORTANT"]

LOGGER = logging.getLogger("qsmprep")
#: log level of the few progress lines printed by default (between INFO and WARNING, as in fMRIPrep)
IMPORTANT = PROGRESS_LEVEL
logging.addLevelName(IMPORTANT, "IMPORTANT")



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
    cfg.check_runs(runs)
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


# --------------------------------------------------------------------------------------------------
# workflow
# --------------------------------------------------------------------------------------------------


def write_dataset_files(cfg: QsmprepConfig, runs: list, run_uuid: str, boilerplate: str) -> None:
    """The dataset-level files of OUTPUT_DIR, each written once and atomically: ``dataset_description.json``,
    ``.bidsignore``, ``logs/CITATION.md``/``.bib`` and, per participant, ``sub-<label>/log/<run_uuid>/``
    ``qsmprep.toml`` (the settings: ``--config-file`` loads it back) and ``qsmprep.json`` (settings, series
    and workflows of this execution, for the report)."""
    from qsmprep.utils.boilerplate import write_citation
    from qsmprep.utils.derivatives import (
        atomic_write_json,
        atomic_write_text,
        write_bidsignore,
        write_derivative_description,
    )
    from qsmprep.workflows.qsm import run_workflow_name

    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    write_derivative_description(cfg.bids_dir, out)
    write_bidsignore(out)
    write_citation(out, cfg, runs, text=boilerplate)
    settings = dict(cfg.to_dict(), run_uuid=run_uuid)
    toml = cfg.to_toml()
    for subject in sorted({str(r.subject) for r in runs}):
        sub_runs = [r for r in runs if str(r.subject) == subject]
        log = out / f"sub-{subject}" / "log" / run_uuid
        atomic_write_text(log / "qsmprep.toml", toml)
        atomic_write_json(log / "qsmprep.json", dict(settings, series=[r.prefix() for r in sub_runs],
                                                     workflows=[run_workflow_name(r) for r in sub_runs]))


def _configure_nipype(cfg: QsmprepConfig, log_dir: Path) -> None:
    from nipype import config as ncfg
    from nipype import logging as nlogging

    # Nipype's own INFO lines ("[Node] Finished", "Workflow ... settings", "[MultiProc] Running") only
    # with -v; by default the StepReporter prints one line per finished node
    level = "DEBUG" if cfg.verbose >= 3 else ("INFO" if cfg.verbose >= 1 else "WARNING")
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
    _check_plugin(cfg)
    log_dir = cfg.output_dir / "logs"
    _configure_nipype(cfg, log_dir)
    from qsmprep.workflows.base import init_qsmprep_wf, new_run_uuid

    run_uuid = new_run_uuid()
    try:
        wf = init_qsmprep_wf(cfg, runs, run_uuid=run_uuid)
    except Exception as exc:
        if cfg.verbose:
            traceback.print_exc()
        print(
            f"qsmprep: error: building the workflow failed ({type(exc).__name__}: {' '.join(str(exc).split())}). "
            "This is a bug; rerun with -v for the traceback and report it.",
            file=sys.stderr,
        )
        return EX_FAILURE
    wf.config["execution"].update(
        {
            "crashdump_dir": str(log_dir),
            "crashfile_format": "txt",
            "stop_on_first_crash": str(bool(cfg.stop_on_first_crash)).lower(),
        }
    )

    write_dataset_files(cfg, runs, run_uuid, wf.visit_desc())
    citation = log_dir / "CITATION.md"
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
    # the report modules (matplotlib: ~0.6 s) import while the workflow runs, in this process's idle time
    threading.Thread(target=_import_reports, name="qsmprep-import-reports", daemon=True).start()
    try:
        plugin, plugin_args = make_plugin(cfg.plugin, cfg.plugin_args, status_callback=StepReporter(LOGGER))
        wf.run(plugin=plugin, plugin_args=plugin_args)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        # crash files of this execution: per participant (sub-<label>/log/<run_uuid>/) or in logs/
        found = list(cfg.output_dir.glob(f"sub-*/log/{run_uuid}/crash-*")) + list(log_dir.glob("crash-*"))
        crashes = sorted(p for p in found if p.stat().st_mtime >= t0 - 1)
        if cfg.verbose:
            traceback.print_exc()
        _write_reports(cfg, runs)
        if crashes:
            print(
                f"qsmprep: error: {crashes[0].parent}: {len(crashes)} processing step{'s' if len(crashes) != 1 else ''} failed "
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


def _import_reports() -> None:
    """Import what :func:`_write_reports` needs (run in a thread while the workflow runs)."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401

        import qsmprep.reports.figures  # noqa: F401
        import qsmprep.reports.html  # noqa: F401
    except Exception:  # pragma: no cover - _write_reports reports it
        pass


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
    from qsmprep.reports.reader import subjects_with_outputs
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
    cfg.validate()
    if cfg.plugin == "MultiProc" and not cfg.boilerplate_only:
        # the workers' imports (torch, scipy, nipype) run in the forkserver while the inputs are checked
        start_worker_server(cfg.plugin_args.get("mp_context", DEFAULT_MP_CONTEXT))
    runs = validate_inputs(cfg)
    LOGGER.log(
        IMPORTANT,
        "found %d QSM series: %s",
        len(runs),
        ", ".join(f"{r.prefix()} ({r.suffix}, {r.n_echoes} echo{'es' if r.n_echoes != 1 else ''})" for r in runs[:10])
        + (", ..." if len(runs) > 10 else ""),
    )
    return _run_workflow(cfg, runs)


def _importing_main_in_a_worker() -> bool:
    """True while a ``forkserver``/``spawn`` process imports the caller's main script (multiprocessing's own
    test, ``spawn._check_not_importing_main``): a script that calls :func:`main` without an ``if __name__ ==
    "__main__":`` guard would otherwise start a second, nested run there, writing into the same output folder,
    and break MultiProc's worker pool (``BrokenProcessPool``)."""
    import multiprocessing

    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def main(argv: Sequence[str] | None = None) -> int:
    """Run qsmprep; returns the exit status (0, 1, 64, 65 or 66). ``argv`` defaults to ``sys.argv[1:]``."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    tune_allocation()
    if _importing_main_in_a_worker():
        print("qsmprep: note: not run again in a MultiProc worker that imports the calling script; put the call "
              "of qsmprep.cli.run.main under if __name__ == '__main__':", file=sys.stderr)
        return EX_USAGE
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
