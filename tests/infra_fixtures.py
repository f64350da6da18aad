"""Fixtures and helpers for the infrastructure tests (real services: a one-node SLURM cluster).

Import what a test module needs: ``from infra_fixtures import slurm_cluster, ...`` (the tests folder is on
``sys.path`` under pytest's default import mode). The cluster is started by ``scripts/ci/slurm-local.sh``
(installing Debian's ``slurm-wlm``/``munge`` when missing and running as root) and stopped at the end of
the session when this fixture started it. Where SLURM cannot be started (not root and no cluster running,
no apt), the tests skip with the reason; in CI (``CI=true``) as root a failure to start is a test error.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
SLURM_SCRIPT = SCRIPTS / "ci" / "slurm-local.sh"
SLURM_DIR = Path(os.environ.get("QSMPREP_SLURM_DIR", "/var/lib/qsmprep-ci-slurm"))
SLURMCTLD_LOG = SLURM_DIR / "log" / "slurmctld.log"
_SUBMIT_RE = re.compile(r"_slurm_rpc_submit_batch_job: JobId=(\d+)")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _cluster_up() -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in out.stdout


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM cluster (node ``localhost``): ``{"log": slurmctld log path}``."""
    was_up = _cluster_up() and SLURMCTLD_LOG.exists()
    started = False
    if not was_up:
        if os.geteuid() != 0:
            pytest.skip("SLURM: no cluster is running and starting one (slurm-wlm, munge) needs root")
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", str(SLURM_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            msg = f"SLURM: {SLURM_SCRIPT.name} start failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
            if in_ci():
                pytest.fail(msg)
            pytest.skip(msg)
        started = True
        print(f"[slurm] cluster started in {time.perf_counter() - t0:.1f} s: {proc.stderr.strip().splitlines()[-1]}")
    yield {"log": SLURMCTLD_LOG}
    if started:
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop"], capture_output=True, text=True, timeout=300)


def slurm_env(**extra) -> dict:
    """Environment for qsmprep under SLURM: Nipype's SLURM plugins need ``LOGNAME`` (and ``USER``)."""
    import pwd

    env = dict(os.environ)
    user = pwd.getpwuid(os.getuid()).pw_name
    env.setdefault("LOGNAME", user)
    env.setdefault("USER", user)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # the worktree's qsmprep in the jobs too (sbatch exports the submitting environment)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def log_offset(log: Path) -> int:
    return log.stat().st_size if log.exists() else 0


def submitted_job_ids(log: Path, offset: int) -> list[int]:
    """SLURM job ids submitted since ``offset`` of the slurmctld log (``_slurm_rpc_submit_batch_job``)."""
    with open(log, "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode("utf-8", "replace")
    return [int(m) for m in _SUBMIT_RE.findall(text)]


def job_table(job_ids) -> dict[int, tuple[str, str]]:
    """``{job id: (name, state)}`` of jobs the controller still knows (finished jobs stay MinJobAge=300 s)."""
    ids = ",".join(str(j) for j in job_ids)
    if not ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", ids, "-o", "%i|%j|%T"], capture_output=True,
                         text=True, timeout=30)
    table = {}
    for line in out.stdout.splitlines():
        jid, name, state = line.split("|")
        if "_" in jid:  # array task "12_1"
            table[jid] = (name, state)
        else:
            table[int(jid)] = (name, state)
    return table


def wait_for_jobs(job_ids, timeout_s: float = 600.0, poll_s: float = 1.0) -> dict:
    """Wait until none of ``job_ids`` is pending or running; their final ``{id: (name, state)}``."""
    active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
    t_end = time.monotonic() + timeout_s
    while True:
        table = job_table(job_ids)
        if not any(state in active for _, state in table.values()):
            return table
        if time.monotonic() > t_end:
            raise AssertionError(f"SLURM jobs still active after {timeout_s:.0f} s: {table}")
        time.sleep(poll_s)


def load_compare():
    """``compare(a, b, rtol, atol, ignore)`` from ``scripts/ci/compare_derivatives.py``."""
    spec = importlib.util.spec_from_file_location("compare_derivatives", SCRIPTS / "ci" / "compare_derivatives.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.compare
