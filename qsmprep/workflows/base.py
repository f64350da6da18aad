"""Top-level qsmprep workflows: one workflow per participant, one QSM workflow per series.

``init_qsmprep_wf(config, runs)`` returns the Nipype workflow the CLI runs::

    qsmprep_wf                       (base_dir = config.work_dir: re-runs reuse finished nodes)
    └── sub_<label>_wf               (crash files -> OUTPUT_DIR/sub-<label>/log/<run_uuid>/)
        └── qsm_[ses_<s>_][acq_<a>_][run_<r>_]wf    (see qsmprep.workflows.qsm)

Building a workflow writes nothing: the dataset-level files (``dataset_description.json``,
``.bidsignore``, ``logs/CITATION.md``, the settings of the run) are written once by the CLI
(:func:`qsmprep.cli.run.write_dataset_files`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from nipype.pipeline import engine as pe

from qsmprep.utils.boilerplate import build_boilerplate
from qsmprep.anat.inputs import collect_anat
from qsmprep.workflows.anat import anat_requested, init_anat_wf
from qsmprep.workflows.qsm import init_qsm_wf, reference_image

LOGGER = logging.getLogger("qsmprep")

if TYPE_CHECKING:  # pragma: no cover
    from qsmprep.config import QsmprepConfig
    from qsmprep.utils.bids import QsmRun

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
    runs: Sequence["QsmRun"],
    config: "QsmprepConfig",
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
        _add_anat(wf, run_wf, run, config)
    if crash_dir is None:
        if config.output_dir is not None:
            crash_dir = Path(config.output_dir) / f"sub-{subject}" / "log"
        elif config.work_dir is not None:
            crash_dir = Path(config.work_dir) / "log" / f"sub-{subject}"
    crash = _crash_config(Path(crash_dir) if crash_dir is not None else None)
    wf.config = crash
    for node in _all_nodes(wf):
        node.config = json.loads(json.dumps(crash))  # a copy per node (Nipype merges it over the top config)
    return wf


def _add_anat(wf: pe.Workflow, run_wf: pe.Workflow, run: "QsmRun", config: "QsmprepConfig") -> None:
    """The series' anatomical workflow (``anat_<run>_wf``) when spaces/atlases/derivatives are asked for and a
    T1w is found (else a warning: the native outputs are written alone)."""
    if not anat_requested(config):
        return
    anat = collect_anat(config.bids_dir, config.derivatives, run)
    if not anat.found:
        LOGGER.warning("%s: %s; no anatomical or template-space outputs", run.prefix(), anat.t1w_reason)
        return
    if not run.has_magnitude:
        LOGGER.warning("%s: registration to the T1w needs magnitude images; no anatomical outputs", run.prefix())
        return
    LOGGER.info("%s: %s", run.prefix(), anat.t1w_reason)
    anat_wf = init_anat_wf(run, config, anat, str(reference_image(run)),
                           name=run_wf.name.replace("qsm", "anat", 1))
    wf.connect([(run_wf, anat_wf, [("outputnode.chi", "inputnode.chi"), ("outputnode.mask", "inputnode.mask"),
                                   ("outputnode.gre_mask", "inputnode.gre_mask"),
                                   ("outputnode.sidecars", "inputnode.chi_meta")])])


def _all_nodes(wf: pe.Workflow) -> list:
    out = []
    for node in wf._graph.nodes():
        if isinstance(node, pe.Workflow):
            out.extend(_all_nodes(node))
        else:
            out.append(node)
    return out


def init_qsmprep_wf(config: "QsmprepConfig", runs: Sequence["QsmRun"], *, run_uuid: str | None = None) -> pe.Workflow:
    """The qsmprep workflow for ``runs`` (:class:`~qsmprep.utils.bids.QsmRun`) under a validated ``config``.

    ``base_dir`` is ``config.work_dir`` so a re-run with the same work directory resumes. Each
    participant's crash files go to ``OUTPUT_DIR/sub-<label>/log/<run_uuid>/``. The returned
    workflow's ``visit_desc()`` is the methods boilerplate. Nothing is written.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("no series to process")
    run_uuid = run_uuid or new_run_uuid()
    work_dir, output_dir = config.work_dir, config.output_dir
    desc = build_boilerplate(config, runs)
    wf = QsmprepWorkflow("qsmprep_wf", base_dir=None if work_dir is None else str(work_dir), desc=desc)
    wf.config = _crash_config(None)
    # Nipype's distributed plugins poll every 2 s by default, which adds ~2 s per node of a run
    # whose steps take seconds; a 0.05 s poll costs nothing measurable (one pass over a graph of
    # ~20 nodes) and the ~15 nodes of a run, started one after the other, wait 0.1 s less each
    wf.config["execution"]["poll_sleep_duration"] = 0.05

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

    return wf
