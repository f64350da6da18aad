#!/usr/bin/env python
"""Wall time, peak memory and accuracy of one qsmprep participant on the full-size simulated head.

    python benchmarks/bench_participant.py                     # 1 mm head, 6 echoes, --nprocs 2
    python benchmarks/bench_participant.py --downsample 2 --nprocs 1 --keep /tmp/bench

Simulates ``make_head_phantom(downsample=1)`` (197 x 233 x 189 at 1 mm) with the default 6 echoes
(4-24 ms, 3 T, SNR 50) into a raw BIDS dataset, then runs ``python -m qsmprep.cli.run BIDS OUT
participant -w WORK --nprocs N`` (default pipeline, fresh work directory, BIDS validation included)
as a subprocess. While it runs, /proc is sampled every 50 ms for the whole process tree (qsmprep and
its MultiProc workers): peak of the summed RSS (counts pages shared by forked workers once per
process, an upper bound) and of the summed PSS (shared pages split between processes: the memory the
tree really holds). Prints a Markdown table with the wall time, peak memory, per-node times (from
Nipype's result files) and the Chimap NRMSE against the simulator's truth inside the output mask.
Targets on 2 cores: <= 90 s, <= 8 GB.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")
TARGET_S = 90.0
TARGET_GB = 8.0


# --------------------------------------------------------------------------------------------------
# process-tree memory sampling (/proc, no psutil)
# --------------------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: the ppid follows the last ')'
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _rss_pss_bytes(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            rss = int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0, 0
    pss = rss
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return rss, pss


class TreeSampler:
    """Samples the summed RSS/PSS of a process tree in a thread; ``peak_rss``/``peak_pss`` in bytes."""

    def __init__(self, pid: int, interval_s: float = 0.05):
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss = self.peak_pss = 0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = process_tree(self.pid)
            rss = pss = 0
            for p in pids:
                r, s = _rss_pss_bytes(p)
                rss += r
                pss += s
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.max_procs = max(self.max_procs, len(pids))
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------
# benchmark
# --------------------------------------------------------------------------------------------------


def simulate(bids: Path, downsample: int, snr: float, tilt: float, seed: int) -> float:
    from qsmprep.simulate import make_head_phantom, simulate_gre, write_bids_dataset

    t0 = time.perf_counter()
    sim = simulate_gre(make_head_phantom(downsample=downsample, seed=seed), snr=snr, seed=seed + 1, tilt_deg=tilt)
    write_bids_dataset(bids, sim, subjects=("1",))
    return time.perf_counter() - t0


def node_times(work: Path) -> list[tuple[str, float]]:
    """(node, seconds) from the runtime of every Nipype result file, in start order."""
    from nipype.utils.filemanip import loadpkl

    rows = []
    for p in work.rglob("result_*.pklz"):
        rt = loadpkl(p).runtime
        start = datetime.fromisoformat(rt.startTime).timestamp()
        end = datetime.fromisoformat(rt.endTime).timestamp()
        rows.append((start, p.parent.name, end - start))
    return [(name, sec) for _, name, sec in sorted(rows)]


def accuracy(bids: Path, out: Path) -> dict[str, float]:
    import nibabel as nib
    import numpy as np

    from qsmprep.qsm import metrics

    anat = out / "sub-1" / "anat"
    truth = bids / "derivatives" / "qsmprep-simulate" / "sub-1" / "anat"
    chi = nib.load(anat / "sub-1_Chimap.nii.gz").get_fdata(dtype=np.float32)
    mask = np.asanyarray(nib.load(anat / "sub-1_desc-brain_mask.nii.gz").dataobj) > 0
    t = nib.load(truth / "sub-1_Chimap.nii.gz").get_fdata(dtype=np.float32)
    brain = np.asanyarray(nib.load(truth / "sub-1_desc-brain_mask.nii.gz").dataobj) > 0
    labels = np.asanyarray(nib.load(truth / "sub-1_dseg.nii.gz").dataobj)
    return {
        "nrmse": metrics.nrmse(chi, t, mask),
        "hfen": metrics.hfen(chi, t, mask),
        "dgm_slope": metrics.dgm_slope(chi, t, mask, labels, (1, 2, 3, 4, 5, 6, 7)),
        "mask_in_brain": 100.0 * float((mask & brain).sum()) / float(mask.sum()),
        "brain_kept": 100.0 * float((mask & brain).sum()) / float(brain.sum()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--downsample", type=int, default=1, help="head phantom downsampling (1: 1 mm)")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--snr", type=float, default=50.0)
    parser.add_argument("--tilt", type=float, default=0.0, help="B0 tilt (deg)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep bids/, out/, work/ in")
    parser.add_argument("qsmprep_args", nargs="*", help="extra qsmprep options (after --)")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench_participant_")) if args.keep is None else args.keep.absolute()
    bids, out, work = root / "bids", root / "out", root / "work"
    for p in (out, work):
        shutil.rmtree(p, ignore_errors=True)
    try:
        if not (bids / "dataset_description.json").exists():
            t_sim = simulate(bids, args.downsample, args.snr, args.tilt, args.seed)
            print(f"simulated the head (downsample {args.downsample}) in {t_sim:.1f} s", flush=True)
        cmd = [sys.executable, "-m", "qsmprep.cli.run", str(bids), str(out), "participant", "-w", str(work),
               "--nprocs", str(args.nprocs), *args.qsmprep_args]
        env = dict(os.environ, NIPYPE_NO_ET="1")
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with TreeSampler(proc.pid) as sampler:
            log = proc.communicate()[0]
        wall = time.perf_counter() - t0
        load1 = os.getloadavg()
        if proc.returncode != 0:
            print(log)
            print(f"qsmprep exited with status {proc.returncode}", file=sys.stderr)
            return 1
        acc = accuracy(bids, out)
        nodes = node_times(work)

        import nibabel as nib

        shape = nib.load(next((bids / "sub-1" / "anat").glob("*_echo-1_part-mag_MEGRE.nii.gz"))).shape
        n_echoes = len(list((bids / "sub-1" / "anat").glob("*_part-phase_MEGRE.nii.gz")))
        print(f"\n# qsmprep participant: {shape} x {n_echoes} echoes, --nprocs {args.nprocs} "
              f"{' '.join(args.qsmprep_args)}".rstrip())
        print(f"load average (1/5/15 min) before {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
              f"after {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}; {os.cpu_count()} CPUs")
        print("\n| metric | value | target |")
        print("|---|---:|---:|")
        print(f"| wall time (s) | {wall:.1f} | <= {TARGET_S:g} |")
        print(f"| peak memory, process tree PSS (GB) | {sampler.peak_pss / 1e9:.2f} | <= {TARGET_GB:g} |")
        print(f"| peak memory, process tree RSS sum (GB) | {sampler.peak_rss / 1e9:.2f} | |")
        print(f"| processes in the tree (max) | {sampler.max_procs} | |")
        m = re.search(r"finished in ([0-9.]+) s", log)
        if m:
            print(f"| of which the Nipype workflow (s, qsmprep's log) | {float(m.group(1)):.0f} | |")
        m = re.search(r"wrote \d+ reports? in ([0-9.]+) s", log)
        if m:
            print(f"| of which the HTML reports (s, qsmprep's log) | {float(m.group(1)):.1f} | |")
        print(f"| Chimap NRMSE in output mask (%) | {acc['nrmse']:.1f} | |")
        print(f"| Chimap HFEN in output mask (%) | {acc['hfen']:.1f} | |")
        print(f"| deep grey matter slope | {acc['dgm_slope']:.2f} | 1 |")
        print(f"| output mask inside true brain (%) | {acc['mask_in_brain']:.1f} | |")
        print(f"| true brain kept by the output mask (%) | {acc['brain_kept']:.1f} | |")
        print("\n| node | s |")
        print("|---|---:|")
        for name, sec in nodes:
            print(f"| {name} | {sec:.2f} |")
        print(f"| sum of node times | {sum(s for _, s in nodes):.1f} |")
        ok = wall <= TARGET_S and sampler.peak_pss / 1e9 <= TARGET_GB
        print(f"\ntargets {'met' if ok else 'NOT met'}")
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
