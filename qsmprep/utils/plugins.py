"""Nipype execution plugins as qsmprep runs them.

Only one change to Nipype's own ``MultiProc``: a worker process that dies (killed by the kernel for
exceeding memory, or a segmentation fault) makes ``concurrent.futures`` raise ``BrokenProcessPool`` in
a callback that Nipype 1.x swallows, and the run then waits forever. Here that node is reported as
crashed (crash file, exit status 1) instead.

And one to Nipype's ``SLURM``: a job that ends without a result file (cancelled, killed, out of time)
gets its traceback as one string where ``report_crash`` appends a list, so Nipype 1.11 raises
``TypeError`` and writes no crash file. Here the traceback is passed as lines: the node is reported as
crashed with its crash file, like any other failure.
"""

from __future__ import annotations

from nipype.pipeline.plugins.multiproc import MultiProcPlugin
from nipype.pipeline.plugins.slurm import SLURMPlugin

#: Start method of the worker processes: ``forkserver`` starts workers from a clean interpreter, so
#: thread pools (OpenMP, numba, torch) already running in the parent are never forked half-way.
DEFAULT_MP_CONTEXT = "forkserver"


class SafeMultiProcPlugin(MultiProcPlugin):
    """Nipype's ``MultiProc`` that turns a dead worker process into a node crash instead of a hang."""

    def _get_result(self, taskid):
        future = self._task_obj.get(taskid)
        if future is not None and future.done() and future.exception() is not None:
            exc = future.exception()
            raise RuntimeError(
                f"the worker process running this node died ({type(exc).__name__}: {exc}); if it ran out of "
                "memory, lower --nprocs or give --mem"
            ) from exc
        return super()._get_result(taskid)


class SafeSLURMPlugin(SLURMPlugin):
    """Nipype's ``SLURM`` whose crash report of a job that left no result file does not fail itself."""

    def _report_crash(self, node, result=None):
        if result is not None and isinstance(result.get("traceback"), str):
            result = dict(result, traceback=result["traceback"].splitlines(keepends=True))
        return super()._report_crash(node, result=result)


def make_plugin(name: str, plugin_args: dict):
    """``(plugin, plugin_args)`` for ``Workflow.run``: MultiProc as :class:`SafeMultiProcPlugin`, SLURM as
    :class:`SafeSLURMPlugin`."""
    if name == "MultiProc":
        args = dict(plugin_args)
        args.setdefault("mp_context", DEFAULT_MP_CONTEXT)
        return SafeMultiProcPlugin(plugin_args=args), None
    if name == "SLURM":
        return SafeSLURMPlugin(plugin_args=dict(plugin_args)), None
    return name, plugin_args
