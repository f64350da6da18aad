"""Errors and exit statuses of every qsmprep console script (``qsmprep``, ``qsmprep-demo``,
``qsmprep-simulate``, ``qsmprep-train``).

Exit statuses follow ``sysexits.h``, as the BIDS Apps execution draft recommends. A problem with the
input or the settings raises :class:`InputError`, printed as one line ``<file>: <problem>. <fix>``.
"""

from __future__ import annotations

__all__ = ["EX_OK", "EX_FAILURE", "EX_USAGE", "EX_DATAERR", "EX_NOINPUT", "InputError"]

EX_OK = 0  #: success
EX_FAILURE = 1  #: a workflow node failed (or an unexpected error)
EX_USAGE = 64  #: the command line was wrong
EX_DATAERR = 65  #: the input data (or a settings file) are invalid
EX_NOINPUT = 66  #: an input file or folder does not exist, or holds nothing to process


class InputError(Exception):
    """A problem with qsmprep's input, printed as one line ``<path>: <problem>. <fix>``; ``code`` is the
    exit status."""

    def __init__(self, path, problem: str, fix: str, code: int = EX_DATAERR):
        self.path = str(path)
        self.problem = " ".join(str(problem).split()).rstrip(".")
        self.fix = " ".join(str(fix).split()).rstrip(".")
        self.code = int(code)
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}. {self.fix}."
