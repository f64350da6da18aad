"""qsmprep: quantitative susceptibility mapping from multi-echo GRE MRI, as a BIDS App."""

from qsmprep.__about__ import __version__

__all__ = ["__version__"]
