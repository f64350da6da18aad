"""Settings of one qsmprep run, shared by the CLI, the workflow builders and the reports.

One dataclass holds every user-facing choice; the CLI fills it from the command line and an optional
TOML config file (command line wins), and the workflow builders read it. Defaults are the methods that
measured most accurate on the simulated head phantom (see benchmarks/).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class QsmprepConfig:
    """All options of a qsmprep run (paths are absolute :class:`~pathlib.Path`)."""

    bids_dir: Path | None = None
    output_dir: Path | None = None
    work_dir: Path | None = None
    analysis_level: str = "participant"
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    bids_filters: dict = field(default_factory=dict)
    # execution
    nprocs: int | None = None
    omp_nthreads: int | None = None
    mem_gb: float | None = None
    plugin: str | None = None
    plugin_args: dict = field(default_factory=dict)
    stop_on_first_crash: bool = False
    boilerplate_only: bool = False
    write_graph: bool = False
    resource_monitor: bool = False
    skip_bids_validation: bool = False
    device: str = "auto"
    #: uQSM test-time refinement steps of the learned inversion (0: off)
    self_supervised_steps: int = 0
    verbose: int = 0
    # methods (names are registry keys in qsmprep.qsm.registry)
    masking: str = "phase"
    unwrapping: str = "romeo"
    bgremove: str = "nextqsm"
    inversion: str = "nextqsm"
    reference: str = "mean"
    r2star: bool = False
    t2star: bool = False
    # reports and group level
    reports_only: bool = False
    segmentation_dir: Path | None = None
    #: extra keyword parameters per stage, e.g. {"inversion": {"maxit": 50}} (keys: masking, offset,
    #: unwrapping, b0, bgremove, inversion, reference, r2star)
    method_params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-friendly dict (paths as strings) for provenance sidecars."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
        return out
