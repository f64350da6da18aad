"""Physical constants and unit conversions used across the pipeline.

One gyromagnetic constant is used everywhere: gamma/2pi = 42.57747892 MHz/T (CODATA 2018, proton).
"""

from __future__ import annotations

import numpy as np

#: Proton gyromagnetic ratio divided by 2*pi, in Hz/T (CODATA 2018).
GAMMA_BAR_HZ_PER_T = 42.57747892e6


def hz_to_ppm(field_hz, b0_tesla: float):
    """Convert a frequency offset in Hz to a relative field in ppm at field strength ``b0_tesla`` (T)."""
    return np.asarray(field_hz, dtype=np.float32) / np.float32(GAMMA_BAR_HZ_PER_T * b0_tesla * 1e-6)


def ppm_to_hz(field_ppm, b0_tesla: float):
    """Convert a relative field in ppm to a frequency offset in Hz at field strength ``b0_tesla`` (T)."""
    return np.asarray(field_ppm, dtype=np.float32) * np.float32(GAMMA_BAR_HZ_PER_T * b0_tesla * 1e-6)
