"""The QSM physics library: pure functions on float32 arrays (no file I/O, no Nipype).

Importing the package fills the algorithm registries of :mod:`qsmprep.qsm.registry`
(``UNWRAP``, ``BGREMOVE``, ``INVERSION``, ``REFERENCE``, ``MASKING``).
"""

from qsmprep.qsm import (  # noqa: F401  (imported for their registry entries)
    bgremove,
    inversion,
    masking,
    multiecho,
    phase,
    reference,
    unwrap,
)
from qsmprep.qsm.registry import BGREMOVE, INVERSION, MASKING, REFERENCE, UNWRAP

__all__ = ["BGREMOVE", "INVERSION", "MASKING", "REFERENCE", "UNWRAP"]
