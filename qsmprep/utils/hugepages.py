"""NumPy's transparent-huge-page advice, switched off where the kernel would stall on it.

NumPy asks the kernel (``madvise(MADV_HUGEPAGE)``) to back every array of 4 MiB or more with 2 MiB
huge pages. Where the kernel's THP ``defrag`` setting is ``always``, ``madvise`` or
``defer+madvise`` (the default of many distributions and cloud images), a page fault in such a region
that finds no free huge page compacts memory synchronously. On a machine whose memory is filled with
page cache (any host that has just read a BIDS dataset) that makes the first touch of a new array
10-15 times slower: measured on the 2-core CI machine, stacking six 1 mm echoes (208 MB) took 0.9-1.9 s
instead of 0.1 s, and writing the 4D series 1.7 s instead of 0.3 s. Without the advice, a first touch
costs 4 KiB page faults (about 0.1 s per 200 MB), and nothing stalls.

:func:`avoid_stalling_hugepages` sets ``NUMPY_MADVISE_HUGEPAGE=0`` (read by NumPy at import: Nipype
workers and SLURM jobs inherit it) and switches the advice off in the running interpreter, unless the
user has set that variable (their choice wins) or the kernel does not compact on fault.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["STALLING_DEFRAG_MODES", "thp_defrag_mode", "avoid_stalling_hugepages"]

#: THP ``defrag`` modes in which a fault in a ``MADV_HUGEPAGE`` region compacts memory synchronously
STALLING_DEFRAG_MODES = frozenset({"always", "madvise", "defer+madvise"})
_DEFRAG = Path("/sys/kernel/mm/transparent_hugepage/defrag")


def thp_defrag_mode(path: str | os.PathLike = _DEFRAG) -> str | None:
    """The selected (bracketed) mode of the kernel's THP ``defrag`` setting; None where not readable."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def avoid_stalling_hugepages(path: str | os.PathLike = _DEFRAG) -> bool:
    """Switch NumPy's huge-page advice off where the kernel stalls on it (see the module docstring).

    Returns True when it switched the advice off. A user's ``NUMPY_MADVISE_HUGEPAGE`` is left as set.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ or thp_defrag_mode(path) not in STALLING_DEFRAG_MODES:
        return False
    os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"
    try:  # NumPy already imported: its import-time choice is switched in this interpreter too
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # pragma: no cover - NumPy < 2
        from numpy.core.multiarray import _set_madvise_hugepage
    _set_madvise_hugepage(False)
    return True
