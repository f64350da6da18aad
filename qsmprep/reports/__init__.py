"""Reports of qsmprep: per-participant HTML reports and the group level.

- :func:`generate_reports` / :func:`build_subject_report`: ``OUTPUT_DIR/sub-<label>.html`` with figures
  in ``OUTPUT_DIR/sub-<label>/figures/`` (:mod:`qsmprep.reports.html`, :mod:`qsmprep.reports.figures`);
- :func:`run_group`: ``OUTPUT_DIR/group_qc.tsv``, ``group_roi.tsv`` and ``group.html``
  (:mod:`qsmprep.reports.group`).

Both read only what OUTPUT_DIR holds (plus the raw echo-1 images for the magnitude and phase panels),
so they can be rebuilt at any time (``--reports-only``) without running the processing again.
"""

from qsmprep.reports.reader import ProcessedRun, find_processed_runs
from qsmprep.reports.group import NoProcessedRunsError, collect_group, run_group
from qsmprep.reports.html import build_subject_report, generate_reports

__all__ = [
    "NoProcessedRunsError",
    "ProcessedRun",
    "build_subject_report",
    "collect_group",
    "find_processed_runs",
    "generate_reports",
    "run_group",
]
