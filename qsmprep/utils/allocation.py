"""Memory allocation settings that keep qsmprep's large arrays from page-faulting over and over.

A QSM step allocates and frees volumes of tens to hundreds of MB many times (every FFT of PDF, TV or
RTS returns a new spectrum). Two defaults make that slow, each measured on the 2-core CI machine (a
virtual machine; the 1 mm benchmark participant, ``benchmarks/bench_participant.py``):

* NumPy asks the kernel (``madvise(MADV_HUGEPAGE)``) for 2 MiB pages for every array of 4 MiB or
  more. Where the kernel's THP ``defrag`` setting is ``always``, ``madvise`` or ``defer+madvise`` (the
  default of many distributions and cloud images), a fault in such a region that finds no free huge
  page compacts memory synchronously: with memory full of page cache, stacking six 1 mm echoes took
  0.9-1.9 s instead of 0.1 s. Switched off there (``NUMPY_MADVISE_HUGEPAGE=0``): 66 -> 48 s.
* glibc's ``malloc`` serves every block above 32 MiB (a 1 mm volume is 35 MB) with a fresh ``mmap``
  and returns it with ``munmap`` on free, so each new array page-faults in all its 4 KiB pages again
  (0.6 s of kernel time per 20 FFTs of PDF's box). With ``mmap`` off for ``malloc``
  (``M_MMAP_MAX = 0``) and free memory kept up to ``M_TRIM_THRESHOLD`` (256 MiB) at the top of the
  heap, freed volumes are reused without faults: 48 -> 41 s. :func:`release_free_memory` (run by
  qsmprep's MultiProc workers after every node) hands what a node freed back to the system, so a
  long-lived worker does not keep its peak.

:func:`tune_allocation` applies both to the running interpreter and, through the environment, to the
processes it starts (Nipype workers, SLURM jobs). A variable the user has set is left as set.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

__all__ = [
    "STALLING_DEFRAG_MODES",
    "MALLOC_TRIM_THRESHOLD_BYTES",
    "thp_defrag_mode",
    "avoid_stalling_hugepages",
    "keep_freed_memory_in_heap",
    "release_free_memory",
    "tune_allocation",
]

#: THP ``defrag`` modes in which a fault in a ``MADV_HUGEPAGE`` region compacts memory synchronously
STALLING_DEFRAG_MODES = frozenset({"always", "madvise", "defer+madvise"})
#: free memory glibc keeps at the top of the heap before returning it to the system
MALLOC_TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
_DEFRAG = Path("/sys/kernel/mm/transparent_hugepage/defrag")
# mallopt(3) parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


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


@functools.cache
def _glibc():
    """The C library this interpreter runs on when it is glibc (``mallopt``/``malloc_trim`` are glibc's),
    else None; looked up once per process (:func:`release_free_memory` runs after every node)."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into the process, the C library's among them
        libc.gnu_get_libc_version  # noqa: B018  (AttributeError elsewhere: musl, macOS)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory_in_heap() -> bool:
    """glibc ``malloc`` without ``mmap`` blocks and with a 256 MiB trim threshold, here and (through
    ``MALLOC_MMAP_MAX_``/``MALLOC_TRIM_THRESHOLD_``) in the processes started from here.

    Returns True when set in this interpreter; False without glibc or when the user set either
    variable (then nothing is changed).
    """
    if "MALLOC_MMAP_MAX_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    os.environ["MALLOC_MMAP_MAX_"] = "0"
    os.environ["MALLOC_TRIM_THRESHOLD_"] = str(MALLOC_TRIM_THRESHOLD_BYTES)
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES) == 1
    return bool(ok)


def release_free_memory() -> None:
    """Return the free memory of glibc's heap to the system (``malloc_trim(0)``); nothing without glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def tune_allocation() -> dict[str, bool]:
    """Both settings of the module docstring; which ones were applied."""
    return {"numpy_hugepages_off": avoid_stalling_hugepages(), "malloc_keeps_freed_memory": keep_freed_memory_in_heap()}
