"""Top-level qsmprep workflows: one workflow per participant, one QSM workflow per series.

``init_qsmprep_wf(config, runs)`` returns the Nipype workflow the CLI runs::

    qsmprep_wf                       (base_dir = config.work_dir: re-runs reuse finished nodes)
    └── sub_<label>_wf               (crash files -> OUTPUT_DIR/sub-<label>/log/<run_uuid>/)
        └── qsm_[ses_<s>_][acq_<a>_][run_<r>_]wf    (see qsmprep.workflows.qsm)

When ``config.output_dir`` is set, building the workflow also writes the dataset-level files (they do
not depend on the processing, and ``--boilerplate-only`` needs them without running anything):
``dataset_description.json``, ``.bidsignore``, ``logs/CITATION.md``/``.bib`` and, per participant,
``sub-<label>/log/<run_uuid>/qsmprep.json`` (the settings of this run).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from nipype.pipeline import engine as pe

from qsmprep.utils.boilerplate import build_boilerplate, write_citation
from qsmprep.utils.derivatives import atomic_write_json, write_bidsignore, write_derivative_description
from qsmprep.workflows.qsm import init_qsm_wf, run_workflow_name

__all__ = ["QsmprepWorkflow", "init_qsmprep_wf", "init_single_subject_wf", "new_run_uuid"]


class QsmprepWorkflow(pe.Workflow):
    """A Nipype workflow that carries its methods description (``__desc__``, ``visit_desc()``)."""

    def __init__(self, name: str, base_dir: str | None = None, desc: str = ""):
        super().__init__(name, base_dir=base_dir)
        self.__desc__ = desc

    def visit_desc(self) -> str:
        """The Markdown methods boilerplate of this workflow (same text as ``logs/CITATION.md``)."""
        return self.__desc__ or ""


def new_run_uuid() -> str:
    """``YYYYMMDD-HHMMSS_<uuid4>``: names this execution's log folders (as fMRIPrep does)."""
    return f"{datetime.now():%Y%m%d-%H%M%S}_{uuid.uuid4()}"


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_")


def _crash_config(crash_dir: Path | None) -> dict:
    execution = {"crashfile_format": "txt"}
    if crash_dir is not None:
        execution["crashdump_dir"] = str(crash_dir)
    return {"execution": execution}


def init_single_subject_wf(
    subject: str,
    runs: Sequence[Any],
    config: Any,
    crash_dir: str | os.PathLike | None = None,
    name: str | None = None,
) -> pe.Workflow:
    """All QSM series of one participant, one ``init_qsm_wf`` each.

    ``crash_dir`` (default ``OUTPUT_DIR/sub-<label>/log`` or, without an output folder, the work
    directory's ``log``) receives the text crash files of this participant's nodes.
    """
    runs = [r for r in runs if str(r.subject) == str(subject)]
    if not runs:
        raise ValueError(f"no series for participant {subject!r}")
    wf = pe.Workflow(name=name or f"sub_{_label(subject)}_wf")
    names = set()
    for run in runs:
        run_wf = init_qsm_wf(run, config)
        if run_wf.name in names:  # same entities: should not happen (discovery refuses it)
            raise ValueError(f"two series of sub-{subject} map to the workflow name {run_wf.name}")
        names.add(run_wf.name)
        wf.add_nodes([run_wf])
    if crash_dir is None:
        out = getattr(config, "output_dir", None)
        work = getattr(config, "work_dir", None)
        if out is not None:
            crash_dir = Path(out) / f"sub-{subject}" / "log"
        elif work is not None:
            crash_dir = Path(work) / "log" / f"sub-{subject}"
    crash = _crash_config(Path(crash_dir) if crash_dir is not None else None)
    wf.config = crash
    for node in _all_nodes(wf):
        node.config = json.loads(json.dumps(crash))  # a copy per node (Nipype merges it over the top config)
    return wf


def _all_nodes(wf: pe.Workflow) -> list:
    out = []
    for node in wf._graph.nodes():
        if isinstance(node, pe.Workflow):
            out.extend(_all_nodes(node))
        else:
            out.append(node)
    return out


def init_qsmprep_wf(config: Any, runs: Sequence[Any], *, run_uuid: str | None = None,
                    write_files: bool = True) -> pe.Workflow:
    """The qsmprep workflow for ``runs`` (:class:`~qsmprep.utils.bids.QsmRun`) under ``config``.

    ``base_dir`` is ``config.work_dir`` so a re-run with the same work directory resumes. Each
    participant's crash files go to ``OUTPUT_DIR/sub-<label>/log/<run_uuid>/``. With
    ``write_files`` (default) and ``config.output_dir`` set, the dataset-level files are written now
    (see the module docstring). The returned workflow's ``visit_desc()`` is the methods boilerplate.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("no series to process")
    run_uuid = run_uuid or new_run_uuid()
    work_dir = getattr(config, "work_dir", None)
    output_dir = getattr(config, "output_dir", None)
    desc = build_boilerplate(config, runs)
    wf = QsmprepWorkflow("qsmprep_wf", base_dir=None if work_dir is None else str(work_dir), desc=desc)
    wf.config = _crash_config(None)
    # Nipype's distributed plugins poll every 2 s by default, which adds ~2 s per node of a run
    # whose steps take seconds; a 0.2 s poll costs nothing measurable
    wf.config["execution"]["poll_sleep_duration"] = 0.2

    by_subject: "OrderedDict[str, list]" = OrderedDict()
    for run in runs:
        by_subject.setdefault(str(run.subject), []).append(run)
    for subject, sub_runs in by_subject.items():
        crash_dir = None
        if output_dir is not None:
            crash_dir = Path(output_dir) / f"sub-{subject}" / "log" / run_uuid
        elif work_dir is not None:
            crash_dir = Path(work_dir) / "log" / run_uuid / f"sub-{subject}"
        wf.add_nodes([init_single_subject_wf(subject, sub_runs, config, crash_dir=crash_dir)])

    if write_files and output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_derivative_description(getattr(config, "bids_dir", None), out)
        write_bidsignore(out)
        write_citation(out, config, runs)
        settings = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        settings["run_uuid"] = run_uuid
        settings["method_params"] = dict(getattr(config, "method_params", None) or {})
        for subject, sub_runs in by_subject.items():
            atomic_write_json(
                out / f"sub-{subject}" / "log" / run_uuid / "qsmprep.json",
                dict(settings, series=[r.prefix() for r in sub_runs],
                     workflows=[run_workflow_name(r) for r in sub_runs]),
            )
    return wf
