"""Neural QSM stages (inference): DeepQSM and NeXtQSM networks, model files, registered methods.

Importing this package registers ``INVERSION["deepqsm"]``, ``INVERSION["nextqsm"]`` and
``BGREMOVE["nextqsm"]``, ``BGREMOVE["nextqsm-unet"]`` in :mod:`qsmprep.qsm.registry` (it imports torch; :mod:`qsmprep.qsm` does not).
Training code lives in :mod:`qsmprep.training`.
"""

from qsmprep.nn.dipole import dipole_convolve, dipole_kernel_torch
from qsmprep.nn.inference import (
    deepqsm,
    model_provenance,
    nextqsm_bgremove,
    nextqsm_inversion,
    nextqsm_unet_bgremove,
    predict_padded,
    resolve_device,
)
from qsmprep.nn.models import (
    DEFAULT_SCALES,
    ModelFileError,
    NeXtQSM,
    available_models,
    build_model,
    load_model,
    model_dir,
    save_model,
    sha256_file,
)
from qsmprep.nn.unet import UNet3d
from qsmprep.nn.varnet import VarNet

__all__ = [
    "DEFAULT_SCALES",
    "ModelFileError",
    "NeXtQSM",
    "UNet3d",
    "VarNet",
    "available_models",
    "build_model",
    "deepqsm",
    "dipole_convolve",
    "dipole_kernel_torch",
    "load_model",
    "model_dir",
    "model_provenance",
    "nextqsm_bgremove",
    "nextqsm_inversion",
    "nextqsm_unet_bgremove",
    "predict_padded",
    "resolve_device",
    "save_model",
    "sha256_file",
]
