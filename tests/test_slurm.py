"""qsmprep on a real (one-node) SLURM cluster: Nipype's SLURM plugins and the array script of docs/hpc.md.

One test function runs the steps in order (the cluster and the data are shared, and under ``pytest -n``
all steps stay on one worker):

1. reference: a MultiProc run of two simulated participants (2 mm grid, V-SHARP + RTS);
2. ``--use-plugin`` with ``plugin: SLURMGraph`` for participant 01 (steps 2 and 3 run one participant:
   the plugins' behaviour does not depend on how many, and each job costs an interpreter start): every
   node is an ``sbatch`` job (job ids from the
   controller's log); qsmprep returns after submitting, the test waits for the jobs; a rerun with the same
   work directory resubmits no processing node (the result cache is reused; only the derivative writers
   run again) and writes the reports; outputs identical to the MultiProc run's for that participant;
3. ``plugin: SLURM`` (blocking) with one job cancelled (``scancel``, the sub-01 unwrapping node): qsmprep
   exits non-zero and a crash file names the job; a rerun resumes, submitting fewer jobs than a full run
   (none for the nodes finished before the cancel), and finishes
   with outputs identical to the MultiProc run's;
4. ``scripts/slurm/qsmprep_array.sbatch`` (venv variant: the qsmprep of this Python) submitted with
   ``--array=1-2``: two array tasks, one participant each, work on scratch; outputs equal the MultiProc run.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra_fixtures import (
    REPO,
    job_table,
    load_compare,
    log_offset,
    slurm_cluster,  # noqa: F401  (fixture)
    slurm_env,
    submitted_job_ids,
    wait_for_jobs,
)

pytestmark = pytest.mark.integration

FAST = ["--bgremove", "vsharp", "--inversion", "rts", "--omp-nthreads", "1"]
SUBJECTS = ["01", "02"]
#: the participant of the SLURMGraph and SLURM-plugin runs (MultiProc and the array script run both)
ONE = ["01"]
#: Nipype nodes of one series with FAST (one sbatch job each under SLURMGraph)
NODES_PER_SERIES = 17
#: what the one-participant runs do not write
NOT_ONE = ("sub-02/*", "sub-02.html")
#: processing nodes of one participant (the ds_* derivative writers always run again)
PROCESSING = ("load_echoes", "phase_offset", "brain_mask", "unwrap", "fit_b0", "bgremove", "inversion",
              "reference", "sidecars", "qc_field", "qc")
SBATCH_ARGS = "--time=00:20:00 --cpus-per-task=1 --mem=2G"


def _qsmprep(args, env, log: Path, timeout=900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qsmprep.cli.run", *map(str, args)]
    with open(log, "w") as fh:
        return subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                              stdin=subprocess.DEVNULL)


def _stamp(times: dict, name: str, t0: float) -> None:
    times[name] = time.perf_counter() - t0
    print(f"[slurm-test] {name}: {times[name]:.1f} s", flush=True)


def test_qsmprep_through_slurm(slurm_cluster, tmp_path):  # noqa: F811
    compare = load_compare()
    env = slurm_env()
    log = slurm_cluster["log"]
    times: dict[str, float] = {}

    # -- data and the MultiProc reference ------------------------------------------------------------
    t0 = time.perf_counter()
    bids = tmp_path / "bids"
    subprocess.run([sys.executable, "-m", "qsmprep.simulate.cli", str(bids), "--subjects", *SUBJECTS, "--small",
                    "--no-derivatives", "--seed", "0"], env=env, check=True, capture_output=True, timeout=600)
    _stamp(times, "simulate", t0)
    t0 = time.perf_counter()
    ref = tmp_path / "out_multiproc"
    proc = _qsmprep([bids, ref, "participant", "--participant-label", *SUBJECTS, "-w", tmp_path / "work_mp",
                     "--nprocs", "2", *FAST], env, tmp_path / "multiproc.log")
    assert proc.returncode == 0, (tmp_path / "multiproc.log").read_text()[-3000:]
    _stamp(times, "MultiProc reference run", t0)

    # -- SLURMGraph ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    graph_yml = tmp_path / "slurm.yml"
    graph_yml.write_text("plugin: SLURMGraph\nplugin_args:\n  dont_resubmit_completed_jobs: true\n"
                         f"  sbatch_args: \"{SBATCH_ARGS}\"\n")
    out_g, work_g = tmp_path / "out_slurmgraph", tmp_path / "work_slurmgraph"
    argv = [bids, out_g, "participant", "--participant-label", *ONE, "-w", work_g, "--use-plugin", graph_yml, *FAST]
    off = log_offset(log)
    proc = _qsmprep(argv, env, tmp_path / "slurmgraph.log")
    assert proc.returncode == 0, (tmp_path / "slurmgraph.log").read_text()[-3000:]
    jobs = submitted_job_ids(log, off)
    # 17 nodes a series: the default bet-phase mask's brain extraction is a node of its own
    assert len(jobs) == NODES_PER_SERIES * len(ONE), f"expected one sbatch job per node ({NODES_PER_SERIES}), got {jobs}"
    table = wait_for_jobs(jobs)
    print(f"[slurm-test] SLURMGraph: {len(jobs)} sbatch jobs, ids {jobs[0]}..{jobs[-1]}: "
          + ", ".join(f"{j}={table[j][0]}" for j in jobs[:6]) + ", ...")
    bad = {j: v for j, v in table.items() if v[1] != "COMPLETED"}
    assert not bad, f"SLURMGraph jobs that did not complete: {bad}"
    names = {name for name, _ in table.values()}
    assert any("unwrap" in n for n in names) and any("inversion" in n for n in names), names
    submit = (work_g / "qsmprep_wf" / "batch" / "submit_jobs.sh").read_text()
    assert submit.count("sbatch ") == len(jobs) and "--dependency=afterok:" in submit
    _stamp(times, "SLURMGraph run (submit + jobs)", t0)

    # rerun: nothing to compute again; the reports (written after the run) now see all outputs
    t0 = time.perf_counter()
    off = log_offset(log)
    proc = _qsmprep(argv, env, tmp_path / "slurmgraph-rerun.log")
    assert proc.returncode == 0, (tmp_path / "slurmgraph-rerun.log").read_text()[-3000:]
    rerun_jobs = submitted_job_ids(log, off)
    rerun_table = wait_for_jobs(rerun_jobs)
    resubmitted = sorted(name for name, _ in rerun_table.values())
    assert not [n for n in resubmitted if any(re.fullmatch(rf"j\d+_{p}", n) for p in PROCESSING)], (
        f"the rerun resubmitted processing nodes: {resubmitted}")
    assert all(state == "COMPLETED" for _, state in rerun_table.values()), rerun_table
    # the reports of the first call were written before the jobs ran: write them again with every output
    proc = _qsmprep(argv, env, tmp_path / "slurmgraph-reports.log")
    assert proc.returncode == 0
    wait_for_jobs(submitted_job_ids(log, off))
    _stamp(times, "SLURMGraph rerun (resume)", t0)
    diffs = compare(ref, out_g, rtol=0, atol=0, ignore=NOT_ONE)
    assert not diffs, "SLURMGraph outputs differ from MultiProc:\n" + "\n".join(diffs)

    # -- SLURM (blocking) with a cancelled job, then a resuming rerun ------------------------------------
    t0 = time.perf_counter()
    slurm_yml = tmp_path / "slurm-blocking.yml"
    slurm_yml.write_text(f"plugin: SLURM\nplugin_args:\n  sbatch_args: \"{SBATCH_ARGS}\"\n  poll_sleep_duration: 1\n")
    out_s, work_s = tmp_path / "out_slurm", tmp_path / "work_slurm"
    argv = [bids, out_s, "participant", "--participant-label", *ONE, "-w", work_s, "--use-plugin", slurm_yml, *FAST]
    off = log_offset(log)
    cmd = [sys.executable, "-m", "qsmprep.cli.run", *map(str, argv)]
    with open(tmp_path / "slurm-killed.log", "w") as fh:
        run = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        victim = None
        t_end = time.monotonic() + 600
        while victim is None and run.poll() is None and time.monotonic() < t_end:
            q = subprocess.run(["squeue", "-h", "-o", "%i|%j"], capture_output=True, text=True, timeout=30).stdout
            for line in q.splitlines():
                jid, name = line.split("|")
                if name.startswith("unwrap.") and ".sub_01_wf." in name:
                    victim = int(jid)
                    subprocess.run(["scancel", str(victim)], check=True, timeout=30)
                    break
            time.sleep(0.2)
        rc = run.wait(timeout=900)
    text = (tmp_path / "slurm-killed.log").read_text()
    assert victim is not None, "the sub-01 unwrapping job never appeared in squeue:\n" + text[-3000:]
    assert rc != 0, "qsmprep exited 0 although a SLURM job was cancelled:\n" + text[-3000:]
    crashes = sorted(out_s.rglob("crash-*unwrap*.txt"))
    assert crashes, "no crash file for the cancelled node:\n" + text[-3000:]
    assert f"Job id ({victim}) finished or terminated" in crashes[0].read_text()
    assert "Saving crash info to" in text and crashes[0].name in text
    killed_jobs = submitted_job_ids(log, off)
    print(f"[slurm-test] SLURM plugin: cancelled job {victim}; qsmprep exit {rc}; crash file {crashes[0].name}; "
          f"{len(killed_jobs)} jobs {killed_jobs[0]}..{killed_jobs[-1]}")
    _stamp(times, "SLURM run with a cancelled job", t0)

    t0 = time.perf_counter()
    off = log_offset(log)
    proc = _qsmprep(argv, env, tmp_path / "slurm-resume.log")
    text = (tmp_path / "slurm-resume.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    resume_jobs = submitted_job_ids(log, off)
    # everything the first run finished is reused: the unwrapping of sub-01 and what follows it run again
    assert 0 < len(resume_jobs) < NODES_PER_SERIES * len(ONE), (len(resume_jobs), len(killed_jobs))  # fewer than a full run
    assert not [n for n, _ in job_table(resume_jobs).values() if n.startswith(("load_echoes.", "phase_offset."))]
    print(f"[slurm-test] SLURM rerun: {len(resume_jobs)} jobs ({resume_jobs[0]}..{resume_jobs[-1]}), "
          f"first run {len(killed_jobs)}")
    _stamp(times, "SLURM rerun (resume)", t0)
    # the crash file of the cancelled run stays in that run's log folder (history), the rest is identical
    diffs = compare(ref, out_s, rtol=0, atol=0, ignore=("*/log/RUN/crash-*", *NOT_ONE))
    assert not diffs, "SLURM outputs differ from MultiProc:\n" + "\n".join(diffs)

    # -- the array script of docs/hpc.md (venv variant) --------------------------------------------------
    t0 = time.perf_counter()
    out_a, scratch = tmp_path / "out_array", tmp_path / "scratch"
    scratch.mkdir()
    script = REPO / "scripts" / "slurm" / "qsmprep_array.sbatch"
    sub = subprocess.run(
        ["sbatch", "--parsable", "--array=1-2", "--cpus-per-task=1", "--mem=3G", "--time=00:20:00",
         f"--output={tmp_path}/array_%A_%a.log", str(script), str(bids), str(out_a), *FAST],
        env=slurm_env(QSMPREP_SCRATCH=str(scratch), QSMPREP_RUNNER="venv"), capture_output=True, text=True,
        timeout=60, cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    array_id = int(sub.stdout.strip().split(";")[0])
    table = wait_for_jobs([array_id], timeout_s=900)
    logs = {p.name: p.read_text() for p in sorted(tmp_path.glob(f"array_{array_id}_*.log"))}
    print(f"[slurm-test] array job {array_id}: {table}")
    assert sorted(table) == [f"{array_id}_1", f"{array_id}_2"], table
    assert all(state == "COMPLETED" for _, state in table.values()), (table, logs)
    assert len(logs) == 2, logs
    for i, label in ((1, "01"), (2, "02")):
        text = logs[f"array_{array_id}_{i}.log"]
        assert f"qsmprep array task {i} (job " in text and f"sub-{label}, 1 CPUs --mem " in text, text[-2000:]
    assert not any(scratch.iterdir()), "the array tasks left their work directories on scratch"
    _stamp(times, "array script (2 tasks)", t0)
    # the group-level files are the same; per-participant outputs equal the MultiProc run's
    diffs = compare(ref, out_a, rtol=0, atol=0)
    assert not diffs, "array-script outputs differ from MultiProc:\n" + "\n".join(diffs)
    print("[slurm-test] times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
