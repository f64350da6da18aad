"""Nipype execution plugins as qsmprep runs them.

Only one change to Nipype's own ``MultiProc``: a worker process that dies (killed by the kernel for
exceeding memory, or a segmentation fault) makes ``concurrent.futures`` raise ``BrokenProcessPool`` in
a callback that Nipype 1.x swallows, and the run then waits forever. Here that node is reported as
crashed (crash file, exit status 1) instead.
"""

from __future__ import annotations

from nipype.pipeline.plugins.multiproc import MultiProcPlugin

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


def make_plugin(name: str, plugin_args: dict):
    """``(plugin, plugin_args)`` for ``Workflow.run``: MultiProc as :class:`SafeMultiProcPlugin`."""
    if name == "MultiProc":
        args = dict(plugin_args)
        args.setdefault("mp_context", DEFAULT_MP_CONTEXT)
        return SafeMultiProcPlugin(plugin_args=args), None
    return name, plugin_args
