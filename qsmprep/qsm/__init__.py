"""The QSM physics library: pure functions on float32 arrays (no file I/O, no Nipype).

Importing the package registers the classical methods in the registries of
:mod:`qsmprep.qsm.registry`; :mod:`qsmprep.methods` adds the learned ones and is the catalogue the
rest of qsmprep reads.
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
from qsmprep.qsm.registry import B0FIT, BGREMOVE, INVERSION, MASKING, OFFSET, R2STAR, REFERENCE, UNWRAP

__all__ = ["B0FIT", "BGREMOVE", "INVERSION", "MASKING", "OFFSET", "R2STAR", "REFERENCE", "UNWRAP"]
