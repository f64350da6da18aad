"""Simulated multi-echo GRE data with ground truth: phantoms, forward model and BIDS writer.

>>> from qsmprep.simulate import make_head_phantom, simulate_gre
>>> sim = simulate_gre(make_head_phantom(downsample=2), snr=50, seed=0)   # doctest: +SKIP
"""

from qsmprep.simulate.bids import write_bids_dataset
from qsmprep.simulate.deform import make_deformed_zubal_phantom
from qsmprep.simulate.phantom import (
    Phantom,
    downsample_phantom,
    make_head_phantom,
    make_shapes_phantom,
    make_zubal_phantom,
    texture_phantom,
)
from qsmprep.simulate.signal import DEFAULT_ECHO_TIMES_S, GreSimulation, simulate_gre

__all__ = [
    "DEFAULT_ECHO_TIMES_S",
    "GreSimulation",
    "Phantom",
    "downsample_phantom",
    "make_deformed_zubal_phantom",
    "make_head_phantom",
    "make_shapes_phantom",
    "make_zubal_phantom",
    "simulate_gre",
    "texture_phantom",
    "write_bids_dataset",
]
