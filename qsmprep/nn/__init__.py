"""Neural QSM stages (inference): DeepQSM and NeXtQSM networks, model files.

Importing this package imports no PyTorch: the learned methods are registered lazily by
:mod:`qsmprep.nn.catalogue`, and the names below load their modules (and torch) on first access.
Training code lives in :mod:`qsmprep.training`.
"""

from __future__ import annotations

import importlib

#: public name -> module that defines it
_EXPORTS = {
    "dipole_convolve": "qsmprep.nn.dipole",
    "dipole_kernel_torch": "qsmprep.nn.dipole",
    "deepqsm": "qsmprep.nn.inference",
    "model_provenance": "qsmprep.nn.inference",
    "nextqsm_bgremove": "qsmprep.nn.inference",
    "nextqsm_inversion": "qsmprep.nn.inference",
    "nextqsm_unet_bgremove": "qsmprep.nn.inference",
    "predict_padded": "qsmprep.nn.inference",
    "resolve_device": "qsmprep.nn.inference",
    "DEFAULT_SCALES": "qsmprep.nn.models",
    "ModelFileError": "qsmprep.nn.models",
    "NeXtQSM": "qsmprep.nn.models",
    "available_models": "qsmprep.nn.models",
    "build_model": "qsmprep.nn.models",
    "load_model": "qsmprep.nn.models",
    "model_dir": "qsmprep.nn.models",
    "save_model": "qsmprep.nn.models",
    "sha256_file": "qsmprep.nn.models",
    "UNet3d": "qsmprep.nn.unet",
    "VarNet": "qsmprep.nn.varnet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qsmprep.nn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
