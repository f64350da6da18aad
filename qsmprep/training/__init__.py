"""Training of the neural QSM stages on simulated data (DeepQSM; NeXtQSM background U-Net and VarNet).

Modules: :mod:`~qsmprep.training.data` (seeded synthetic patches), :mod:`~qsmprep.training.losses`
(masked L1/L2, NRMSE, uQSM self-supervised loss), :mod:`~qsmprep.training.train` (``TrainConfig``,
``train``, ``export``) and :mod:`~qsmprep.training.cli` (console script ``qsmprep-train``). Configs:
``configs/deepqsm.toml`` (section ``deepqsm``) and ``configs/nextqsm.toml`` (sections ``nextqsm-bg``,
``nextqsm-varnet`` and ``nextqsm-varnet-v2``, the GPU recipe with per-step seeded data for ``--workers``;
pick one with ``--section``).

Scaling contract with the inference side (:mod:`qsmprep.nn`), stored in the model file's ``scales``:

* U-Nets (``deepqsm``, ``nextqsm-bg``): ``scales = {"input_scale": a, "output_scale": b,
  "input_ppm": 1/a, "output_ppm": 1/b}``; with ``x = field_ppm * mask`` and ``rms`` its RMS in the
  mask, the prediction in ppm is ``rms * net(x / rms) * input_scale / output_scale`` (equivalently
  ``rms * net(x / rms) * output_ppm / input_ppm``): linear in the field's amplitude. ``deepqsm``: input = local field (ppm), output = chi (ppm); ``nextqsm-bg``: input =
  masked total field (ppm, after the scanner-like 2nd-order shim), output = local field (ppm).
  No other normalisation. TKD-primed ``deepqsm`` (2 input channels): ``[TKD(x / rms) * input_scale /
  output_scale, x / rms]``. Prior-guided ``nextqsm-bg`` (``data.prior = "pdf"`` or ``"vsharp"``, 3 input
  channels, ``input_scale = output_scale = 1``): ``s * net([prior / s, total / s_t, prior mask])`` with ``s``
  and ``s_t`` the RMS of the prior local field and of the total field in the mask
  (:func:`qsmprep.nn.unet.bg_unet_input`), a residual net, output demeaned in the mask.
* VarNet (``nextqsm-varnet``): takes and returns ppm (``VarNet(field_ppm, mask, kernel)``, its
  internal scales are its kwargs ``field_scale_ppm``/``chi_scale_ppm``); ``scales`` holds
  ``input_scale = output_scale = 1`` and those two values as ``field_ppm``/``chi_ppm``. The kernel is
  :func:`qsmprep.nn.dipole.dipole_kernel_torch` for the (possibly oblique) B0 direction and voxel size.

Head-phantom seeds 0..9 are used for training; 100..199 are reserved for held-out evaluation.
"""

from qsmprep.training.data import KINDS, deepqsm_shapes_sample, hybrid_brain_sample, make_batch, validation_set
from qsmprep.training.losses import masked_l1, masked_l2, nrmse, uqsm_loss
from qsmprep.training.train import TrainConfig, export, export_nextqsm, read_loss_log, train

__all__ = [
    "KINDS",
    "TrainConfig",
    "deepqsm_shapes_sample",
    "export",
    "export_nextqsm",
    "hybrid_brain_sample",
    "make_batch",
    "masked_l1",
    "masked_l2",
    "nrmse",
    "read_loss_log",
    "train",
    "uqsm_loss",
    "validation_set",
]
