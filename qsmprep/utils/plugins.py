"""Nipype execution plugins as qsmprep runs them.

One change to Nipype's own ``MultiProc``: a worker process that dies (killed by the kernel for
exceeding memory, or a segmentation fault) makes ``concurrent.futures`` raise ``BrokenProcessPool`` in
a callback that Nipype 1.x swallows, and the run then waits forever. Here that node is reported as
crashed (crash file, exit status 1) instead.

And one to both ``MultiProc`` and ``SLURM``: a node that ends without a result file (a dead worker; a
job cancelled, killed or out of time) gets its traceback as one string where ``report_crash`` appends a
list, so Nipype 1.11 raises ``TypeError: can only concatenate str (not "list") to str`` and writes no
crash file. Here the traceback is passed as lines: the node is reported as crashed with its crash file,
like any other failure.

And one to ``MultiProc`` alone: after every node the worker hands the memory the node freed back to the
system (:func:`qsmprep.utils.allocation.release_free_memory`), since qsmprep's allocation settings let
``malloc`` keep freed volumes for reuse within a node.

:func:`start_worker_server` starts the ``forkserver`` that MultiProc's workers are forked from while the
command line still checks the inputs, with the modules every node needs (NumPy, SciPy, Nipype, qsmprep's
interfaces, torch for the FFTs) imported once there (:data:`WORKER_PRELOAD`): a worker then starts in
milliseconds instead of spending 1-2 s on imports before its first node (torch alone: 0.9 s on 2 cores).

Both (and every other non-graph plugin) accept a ``status_callback``: :class:`StepReporter` prints one
line per finished node with its elapsed time, the progress qsmprep shows by default.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

from nipype.pipeline.plugins.multiproc import MultiProcPlugin
from nipype.pipeline.plugins.slurm import SLURMPlugin

#: Start method of the worker processes: ``forkserver`` starts workers from a clean interpreter, so
#: thread pools (OpenMP, numba, torch) already running in the parent are never forked half-way.
DEFAULT_MP_CONTEXT = "forkserver"

#: Modules the ``forkserver`` imports before it forks MultiProc's workers (:func:`start_worker_server`).
WORKER_PRELOAD = ("qsmprep.interfaces.qsm", "qsmprep.interfaces.reports", "qsmprep.cli.run")


def start_worker_server(mp_context: str | None = DEFAULT_MP_CONTEXT) -> bool:
    """Start the ``forkserver`` of MultiProc's workers now, importing :data:`WORKER_PRELOAD` (and torch when
    :mod:`qsmprep.qsm.fft` runs its FFTs in torch) in it, so that the imports overlap the caller's own work
    (the input checks) and every worker forked from it starts with them done. OpenMP threads (torch's FFTs)
    sleep instead of spinning between parallel regions (``OMP_WAIT_POLICY=PASSIVE`` unless set): a spinning
    thread takes the core of the node running next to it. Returns whether a server was started; a no-op for
    other start methods, or when this process already runs one (its preload list is then unchanged)."""
    if (mp_context or DEFAULT_MP_CONTEXT) != "forkserver":
        return False
    import multiprocessing as mp
    from multiprocessing import forkserver

    if getattr(forkserver._forkserver, "_forkserver_pid", None) is not None:
        return False
    from qsmprep.qsm.fft import FFT_BACKEND

    preload = list(WORKER_PRELOAD) + (["torch"] if FFT_BACKEND != "scipy" else [])
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    mp.get_context("forkserver").set_forkserver_preload(preload)
    forkserver.ensure_running()
    return True


def _run_node_then_release_memory(node, updatehash, taskid):
    """Nipype's MultiProc task (``run_node``), then the memory the node freed back to the system
    (:func:`qsmprep.utils.allocation.release_free_memory`): a worker does not keep its peak between nodes."""
    from nipype.pipeline.plugins.multiproc import run_node

    from qsmprep.utils.allocation import release_free_memory

    try:
        return run_node(node, updatehash, taskid)
    finally:
        release_free_memory()


def _no_op() -> None:
    """A task that only makes the pool start a worker process."""


def _init_worker(cwd: str, levels: dict) -> None:
    """Worker start-up: Nipype's own, plus the parent's Nipype log levels (a ``forkserver`` worker starts
    from a clean interpreter, where Nipype would log every node at INFO)."""
    from nipype import config
    from nipype import logging as nlogging
    from nipype.pipeline.plugins.multiproc import process_initializer

    process_initializer(cwd)
    config.update_config({"logging": levels})
    nlogging.update_logging(config)


class _ReportsCachedNodes:
    """Tells a :class:`StepReporter` callback which finished nodes were reused from the work directory
    (Nipype's callback does not say)."""

    def _task_finished_cb(self, jobid, cached=False):
        if cached and isinstance(self._status_callback, StepReporter):
            self._status_callback.cached.add(str(self.procs[jobid].fullname))
        return super()._task_finished_cb(jobid, cached=cached)


class _CrashReportOfMissingResult:
    """Nipype's crash report of a node that left no result file, with the traceback as lines (see the module
    docstring)."""

    def _report_crash(self, node, result=None):
        if result is not None and isinstance(result.get("traceback"), str):
            result = dict(result, traceback=result["traceback"].splitlines(keepends=True))
        return super()._report_crash(node, result=result)


class SafeMultiProcPlugin(_CrashReportOfMissingResult, _ReportsCachedNodes, MultiProcPlugin):
    """Nipype's ``MultiProc`` that turns a dead worker process into a node crash instead of a hang, and
    whose workers log at the parent's Nipype log levels."""

    def __init__(self, plugin_args=None):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from nipype import config

        super().__init__(plugin_args=plugin_args)
        levels = {k: config.get("logging", k) for k in ("workflow_level", "interface_level", "utils_level")}
        self.pool.shutdown(wait=False)  # no worker started yet: replaced by one with our initializer
        self.pool = ProcessPoolExecutor(max_workers=self.processors, initializer=_init_worker,
                                        initargs=(self._cwd, levels),
                                        mp_context=mp.get_context(self.plugin_args.get("mp_context")))
        # start every worker now, while Nipype still prepares the graph: the pool would start them one per
        # submitted node, and the second node of a run would wait for its worker's start-up
        for _ in range(self.processors):
            self.pool.submit(_no_op)

    def _submit_job(self, node, updatehash=False):
        """Nipype's, with the node run by :func:`_run_node_then_release_memory`."""
        self._taskid += 1
        if getattr(node.interface, "terminal_output", "") == "stream":  # no streaming outputs, as in Nipype
            node.interface.terminal_output = "allatonce"
        try:
            future = self.pool.submit(_run_node_then_release_memory, node, updatehash, self._taskid)
        except BrokenProcessPool as exc:  # a worker died before (e.g. while starting): this node's crash
            future = Future()
            future.set_exception(exc)
        future.add_done_callback(self._async_callback)
        self._task_obj[self._taskid] = future
        return self._taskid

    def _get_result(self, taskid):
        future = self._task_obj.get(taskid)
        if future is not None and future.done() and future.exception() is not None:
            exc = future.exception()
            raise RuntimeError(
                f"the worker process running this node died ({type(exc).__name__}: {exc}); if it ran out of "
                "memory, lower --nprocs or give --mem; if qsmprep was called from a Python script, the workers "
                "import that script: put the call under if __name__ == '__main__':"
            ) from exc
        return super()._get_result(taskid)


class SafeSLURMPlugin(_CrashReportOfMissingResult, _ReportsCachedNodes, SLURMPlugin):
    """Nipype's ``SLURM`` whose crash report of a job that left no result file does not fail itself."""


#: log level of the progress lines (``IMPORTANT`` of the CLI: shown by default, between INFO and WARNING)
PROGRESS_LEVEL = 25


class StepReporter:
    """Nipype ``status_callback``: one line per finished node, ``sub-01 unwrap done in 3.2 s``, to the
    ``qsmprep`` logger at :data:`PROGRESS_LEVEL` (a node reused from the work directory: ``reused``; a
    failed one: ``failed after ...``). Nipype calls it in the main process."""

    def __init__(self, logger: logging.Logger | None = None):
        self.logger = logger or logging.getLogger("qsmprep")
        self.started: dict[str, float] = {}
        self.cached: set[str] = set()

    @staticmethod
    def label(node) -> str:
        """``sub-01 [ses_1_run_2 ]<node name>`` from the node's place in the workflow."""
        parts = str(getattr(node, "fullname", node)).split(".")
        subject = next((p for p in parts if re.fullmatch(r"sub_.+_wf", p)), None)
        series = next((p for p in parts if re.fullmatch(r"qsm(_.+)?_wf", p)), None)
        words = [("sub-" + subject[4:-3]) if subject else None,
                 series[4:-3] if series and series != "qsm_wf" else None, getattr(node, "name", parts[-1])]
        return " ".join(w for w in words if w)

    def __call__(self, node, status: str) -> None:
        key = str(getattr(node, "fullname", id(node)))
        if status == "start":
            self.started[key] = time.perf_counter()
            return
        t0 = self.started.pop(key, None)
        if t0 is not None:
            elapsed = f"{time.perf_counter() - t0:.1f} s"
        else:  # run in the main process without a start event (sinks): the node's own timing
            duration = getattr(getattr(getattr(node, "result", None), "runtime", None), "duration", None)
            elapsed = f"{float(duration):.1f} s" if isinstance(duration, (int, float)) else None
        if status == "end" and key in self.cached:
            self.cached.discard(key)
            self.logger.log(PROGRESS_LEVEL, "%s reused from the work directory", self.label(node))
        elif status == "end":
            self.logger.log(PROGRESS_LEVEL, "%s done%s", self.label(node), f" in {elapsed}" if elapsed else "")
        elif status == "exception":
            self.logger.log(PROGRESS_LEVEL, "%s failed%s", self.label(node), f" after {elapsed}" if elapsed else "")


def make_plugin(name: str, plugin_args: dict, status_callback=None):
    """``(plugin, plugin_args)`` for ``Workflow.run``: MultiProc as :class:`SafeMultiProcPlugin`, SLURM as
    :class:`SafeSLURMPlugin`. ``status_callback`` (e.g. a :class:`StepReporter`) goes to every plugin
    that supports one (not the graph-submission plugins, which run no node themselves)."""
    args = dict(plugin_args)
    if status_callback is not None and not name.endswith("Graph"):
        args["status_callback"] = status_callback
    if name == "MultiProc":
        args.setdefault("mp_context", DEFAULT_MP_CONTEXT)
        return SafeMultiProcPlugin(plugin_args=args), None
    if name == "SLURM":
        return SafeSLURMPlugin(plugin_args=args), None
    return name, args
