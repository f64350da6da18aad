"""Wall time and peak resident memory of a code block, for the benchmark scripts."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Current resident set size of this process (bytes), from /proc/self/statm."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


class Measurement:
    """Filled in by :func:`measure`: ``seconds`` and ``peak_gb`` (peak RSS of the process in the block)."""

    seconds: float = 0.0
    peak_gb: float = 0.0


@contextmanager
def measure(interval_s: float = 0.005):
    """Time a block and sample the process RSS in a thread to find its peak."""
    result = Measurement()
    peak = [rss_bytes()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - t0
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes())
        result.peak_gb = peak[0] / 1e9
