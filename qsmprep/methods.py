"""The complete method catalogue: every stage's registry, filled with the classical methods
(:mod:`qsmprep.qsm`) and the learned ones (:mod:`qsmprep.nn.catalogue`, registered without importing
PyTorch).

Import this module, not :mod:`qsmprep.qsm.registry`, wherever every method must be known (the CLI's
choices, the config checks, the interfaces). Each entry is a :class:`~qsmprep.qsm.registry.Method`
with its function, label, references and typed parameter set; see :mod:`qsmprep.qsm.registry` for
how a method is added.
"""

from __future__ import annotations

import qsmprep.nn.catalogue  # noqa: F401  (registers the learned methods, lazily)
import qsmprep.qsm  # noqa: F401  (registers the classical methods)
from qsmprep.qsm.registry import (
    B0FIT,
    BGREMOVE,
    INVERSION,
    MASKING,
    OFFSET,
    R2STAR,
    REFERENCE,
    UNWRAP,
    Method,
    Registry,
)

__all__ = [
    "STAGES", "Method", "Registry", "stage", "method", "names", "method_label", "method_references",
]

#: stage key (as in ``[method_params.<stage>]``) -> registry, in pipeline order
STAGES: dict[str, Registry] = {
    r.key: r for r in (MASKING, OFFSET, UNWRAP, B0FIT, BGREMOVE, INVERSION, REFERENCE, R2STAR)
}


def stage(key: str) -> Registry:
    """The registry of a stage key (``"bgremove"``); ``KeyError`` for unknown stages."""
    return STAGES[key]


def method(stage_key: str, name: str) -> Method:
    """Catalogue entry of ``name`` in a stage (aliases resolved); ``ValueError`` listing the choices."""
    return STAGES[stage_key].method(name)


def names(stage_key: str) -> list[str]:
    """Registered method names of a stage, in registration order (imports no PyTorch)."""
    return STAGES[stage_key].names()


def method_label(stage_key: str, name: str) -> str:
    """Display name of a method (``"V-SHARP"``); the name itself when it is not registered."""
    try:
        return STAGES[stage_key].method(name).label
    except (KeyError, ValueError):
        return str(name)


def method_references(stage_key: str, name: str) -> list[str]:
    """Reference keys (:data:`qsmprep.references.REFERENCES`) of a method; empty when not registered."""
    try:
        return list(STAGES[stage_key].method(name).references)
    except (KeyError, ValueError):
        return []
