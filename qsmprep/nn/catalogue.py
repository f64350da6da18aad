"""Catalogue entries of the learned methods: registered lazily, so that listing them imports no PyTorch.

Each entry names its function in :mod:`qsmprep.nn.inference` (imported, with torch, when the method
runs). Importing :mod:`qsmprep.methods` imports this module.
"""

from __future__ import annotations

from qsmprep.qsm.registry import BGREMOVE, INVERSION

__all__: list[str] = []

INVERSION.register_lazy(
    "deepqsm",
    "qsmprep.nn.inference:deepqsm",
    label="DeepQSM",
    description="a DeepQSM-style 3D U-Net primed with truncated k-space division (it sees the local field and its "
    "TKD estimate and predicts a correction of TKD), trained by qsmprep on simulated random shapes and hybrid "
    "brains with QSMnet+ range augmentation (field resampled to a B0-aligned 1 mm grid and back), followed by "
    "one exact dipole data-consistency step",
    references=("bollmann2019", "jung2020", "shmueli2009", "aggarwal2019"),
    ranges={"tile": "[16, inf)", "overlap": "[0, inf)", "data_consistency_mu": "[0, inf)"},
)
INVERSION.register_lazy(
    "nextqsm",
    "qsmprep.nn.inference:nextqsm_inversion",
    label="NeXtQSM VarNet",
    description="a NeXtQSM-style variational network (unrolled steps of learned CNN regularisers, each followed "
    "by an exact dipole data-consistency solve) trained by qsmprep on simulated hybrid brains",
    references=("cognolato2023", "aggarwal2019", "jung2020"),
    ranges={"pad_voxels": "[0, inf)", "self_supervised_steps": "[0, inf)", "self_supervised_lr": "(0, inf)",
            "self_supervised_tv": "[0, inf)"},
)
BGREMOVE.register_lazy(
    "nextqsm",
    "qsmprep.nn.inference:nextqsm_bgremove",
    label="NeXtQSM background removal (PDF with a learned susceptibility prior)",
    description="projection onto dipole fields (PDF) alternated with a NeXtQSM-style variational network as the "
    "susceptibility prior: the background sources outside the brain were refitted (PDF's conjugate gradients, "
    "warm-started) to the part of the total field that the network's susceptibility inside the brain does not "
    "explain, which restores the smooth part of the local field that PDF alone removes; the network was trained "
    "by qsmprep on simulated hybrid brains",
    references=("liu2011", "cognolato2023"),
    ranges={"n_outer": "[1, inf)", "refit_max_iter": "[1, inf)", "rim_mm": "[0, inf)"},
)
BGREMOVE.register_lazy(
    "nextqsm-unet",
    "qsmprep.nn.inference:nextqsm_unet_bgremove",
    label="NeXtQSM background U-Net",
    description="a NeXtQSM-style 3D U-Net (a user-supplied trained model) that maps the masked total field to the "
    "local field; a PDF-guided model predicts a smooth correction of PDF on a coarse B0-aligned grid of the "
    "whole brain",
    references=("cognolato2023", "liu2011"),
    ranges={"tile": "[16, inf)", "overlap": "[0, inf)"},
)
