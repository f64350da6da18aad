#!/usr/bin/env python
"""Wall time of the report builders and of the CLI parser (the wall-clock budgets the tests used to assert).

    python benchmarks/bench_reports.py                    # simulate, process once, time --reports-only
    python benchmarks/bench_reports.py --repeat 5 --keep /tmp/bench_reports

Data as in ``tests/test_reports.py``: ``write_bids_dataset`` of two participants (head phantom
downsampled 4x, TE 4/8/12 ms, seed 3), processed once with ``qsmprep BIDS OUT participant --nprocs 2
--r2star``. Then, on that output folder:

* ``--reports-only`` (rebuilds both subjects' HTML reports and figures, runs no node): the best and the
  median of ``--repeat`` runs; target <= 10 s on 2 cores (was ``assert seconds < 10.0`` in
  ``test_reports_only_is_fast_and_runs_no_processing``);
* building the argument parser in a fresh interpreter (``from qsmprep.cli.parser import build_parser``,
  what ``qsmprep --help`` pays before printing); target <= 20 s (was ``assert float(seconds) < 20.0`` in
  ``tests/test_cli.py::test_parser_builds_quickly_and_has_no_heavy_imports``).

Prints a Markdown table; exit status 1 when a measured time misses its target.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TES = (0.004, 0.008, 0.012)
TARGET_REPORTS_S = 10.0
TARGET_PARSER_S = 20.0

PARSER_CODE = (
    "import time; t = time.perf_counter(); "
    "from qsmprep.cli.parser import build_parser; build_parser(); "
    "print(time.perf_counter() - t)"
)


def _process(root: Path) -> tuple[Path, Path, Path, float]:
    from qsmprep.cli.run import main
    from qsmprep.simulate import write_bids_dataset

    bids, out, work = root / "bids", root / "out", root / "work"
    write_bids_dataset(bids, subjects=("1", "2"), phantom_kwargs={"downsample": 4},
                       simulate_kwargs={"echo_times_s": TES}, seed=3)
    t0 = time.perf_counter()
    rc = main([str(bids), str(out), "participant", "-w", str(work), "--nprocs", "2", "--r2star",
               "--skip-bids-validation"])
    if rc != 0:
        raise SystemExit(f"the participant run failed (exit status {rc})")
    return bids, out, work, time.perf_counter() - t0


def _reports_only(bids: Path, out: Path, work: Path) -> float:
    from qsmprep.cli.run import main

    for report in out.glob("sub-*.html"):
        report.unlink()
    t0 = time.perf_counter()
    rc = main([str(bids), str(out), "participant", "-w", str(work), "--reports-only"])
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"--reports-only failed (exit status {rc})")
    return seconds


def _parser_seconds() -> float:
    proc = subprocess.run([sys.executable, "-c", PARSER_CODE], capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions of each measurement (default 3)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_reports_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        bids, out, work, participant_s = _process(root)
        reports = [_reports_only(bids, out, work) for _ in range(args.repeat)]
        parser_s = [_parser_seconds() for _ in range(args.repeat)]
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    rows = [
        ("participant run (2 subjects, 4 mm, --r2star), once", [participant_s], None),
        ("--reports-only (2 subjects)", reports, TARGET_REPORTS_S),
        ("build the CLI parser (fresh interpreter)", parser_s, TARGET_PARSER_S),
    ]
    print(f"# qsmprep report and CLI timings ({platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f})\n")
    print("| measurement | runs | best s | median s | target s | ok |")
    print("|---|---:|---:|---:|---:|---|")
    failed = False
    for name, values, target in rows:
        best, med = min(values), statistics.median(values)
        ok = "" if target is None else ("yes" if med <= target else "NO")
        failed |= ok == "NO"
        print(f"| {name} | {len(values)} | {best:.2f} | {med:.2f} | {'' if target is None else f'{target:g}'} | {ok} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
