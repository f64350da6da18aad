"""Training losses: re-exported from :mod:`qsmprep.nn.losses` (inference uses the uQSM loss for the
test-time refinement, so the losses live with the networks)."""

from qsmprep.nn.losses import masked_l1, masked_l2, nrmse, phase_per_ppm, total_variation, uqsm_loss

__all__ = ["masked_l1", "masked_l2", "nrmse", "phase_per_ppm", "total_variation", "uqsm_loss"]
