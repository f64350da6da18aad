#!/usr/bin/env python
"""Wall time of qsmprep's up-front input validation on a 1 mm, 6-echo simulated head.

    python benchmarks/bench_validation.py                      # simulate into a temporary folder
    python benchmarks/bench_validation.py --keep /tmp/bench_val  # reuse (or create) the dataset there

Simulates ``make_head_phantom(downsample=1)`` (197 x 233 x 189 voxels at 1 mm, 6 echoes 4-24 ms, gzip
NIfTI, float32 phase in rad) with :func:`qsmprep.simulate.bids.write_bids_dataset`, then times
:func:`qsmprep.cli.run.validate_inputs` (``--skip-bids-validation``: the external validator is not part
of qsmprep's own checks) and its parts: run discovery (pybids), the header checks and the data checks.
Each is repeated ``--repeat`` times (best and median wall time, best CPU time summed over the reading
threads). Target (issue 17): the validation of such a dataset adds <= 3 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _measure import measure  # noqa: E402


def _dataset(root: Path) -> Path:
    if (root / "dataset_description.json").is_file():
        return root
    from qsmprep.simulate.bids import write_bids_dataset

    t0 = time.perf_counter()
    write_bids_dataset(root, subjects=("1",), phantom="head", phantom_kwargs={"downsample": 1}, derivatives=False)
    print(f"simulated {root} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="folder of the simulated dataset (created if missing, kept)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    from qsmprep.cli.parser import parse_config
    from qsmprep.cli.run import validate_inputs
    from qsmprep.utils.bids import collect_runs
    from qsmprep.utils.validation import check_run_data, check_run_headers

    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="qsmprep_bench_val_")
        root = Path(tmp.name) / "bids"
    else:
        root = args.keep
    bids = _dataset(root)
    out = Path(tempfile.mkdtemp(prefix="qsmprep_bench_val_out_")) / "out"
    cfg = parse_config([str(bids), str(out), "participant", "--skip-bids-validation", "-w", str(out.parent / "w")])
    runs = collect_runs(bids)
    run = runs[0]
    import nibabel as nib

    shape = nib.load(str(run.phase_files[0])).shape
    size_mb = sum(Path(f).stat().st_size for f in run.magnitude_files + run.phase_files) / 1e6
    rows = []
    for name, func in (
        ("collect_runs (pybids)", lambda: collect_runs(bids)),
        ("check_run_headers", lambda: check_run_headers(run)),
        ("check_run_data", lambda: check_run_data(run)),
        ("validate_inputs (all)", lambda: validate_inputs(cfg)),
    ):
        times, cpus, peak = [], [], 0.0
        for _ in range(args.repeat):
            c0 = time.process_time()
            with measure() as m:
                func()
            cpus.append(time.process_time() - c0)
            times.append(m.seconds)
            peak = max(peak, m.peak_gb)
        rows.append((name, min(times), statistics.median(times), min(cpus), peak))
    print(f"\n{run.prefix()}: {run.n_echoes} echoes, {len(run.magnitude_files) + len(run.phase_files)} files, "
          f"shape {tuple(shape)}, {size_mb:.0f} MB on disk\n")
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load:.1f} (wall times on a shared machine grow with the load; "
          "the CPU time, summed over threads, does not)\n")
    print("| step | wall best (s) | wall median (s) | CPU best (s) | peak RSS (GB) |")
    print("|---|---:|---:|---:|---:|")
    for name, best, med, cpu, peak in rows:
        print(f"| {name} | {best:.2f} | {med:.2f} | {cpu:.2f} | {peak:.2f} |")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
