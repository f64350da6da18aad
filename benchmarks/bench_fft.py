#!/usr/bin/env python
"""The FFT backends of :mod:`qsmprep.qsm.fft` side by side: float32 real 3D FFTs of head-sized boxes.

    python benchmarks/bench_fft.py                  # 1 and 2 threads
    python benchmarks/bench_fft.py --threads 2 --repeat 20

For each shape (the padded brain boxes of PDF and MEDI-TV on the 1 mm head, and a 2 mm one) and thread
count, the median time of a forward (``rfftn``) and an inverse (``irfftn``) transform with
``QSMPREP_FFT_BACKEND``'s choices, torch (MKL on x86) and SciPy (pocketfft), and the largest
difference between them relative to the largest value. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from qsmprep.qsm import fft as qfft

SHAPES = ((192, 240, 200), (180, 216, 180), (96, 120, 100))


def _median_s(func, repeat: int) -> float:
    func()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        func()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    import torch

    print(f"# FFT backends: torch {torch.__version__} (MKL: {torch.backends.mkl.is_available()}), "
          f"{platform.processor() or platform.machine()}\n")
    print("| shape | threads | torch fwd (ms) | torch inv (ms) | scipy fwd (ms) | scipy inv (ms) | max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        x = rng.normal(size=shape).astype(np.float32)
        for n in args.threads:
            qfft.FFT_WORKERS = n
            row, res = [], {}
            for backend in ("torch", "scipy"):
                with qfft.fft_backend_scope(backend):
                    k = qfft.rfftn(x)
                    res[backend] = qfft.irfftn(k, shape)
                    row.append(_median_s(lambda: qfft.rfftn(x), args.repeat) * 1e3)
                    row.append(_median_s(lambda: qfft.irfftn(k, shape), args.repeat) * 1e3)
            diff = float(np.abs(res["torch"] - res["scipy"]).max() / np.abs(res["scipy"]).max())
            print(f"| {shape} | {n} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
