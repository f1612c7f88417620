"""Plain-PyTorch reference of every formula in SPEC.md: schedules, preconditioning, the
ambient loss, the noisy pair, the sampler update steps, and input validation."""

from .coefficients import ambient_coefficients, eligibility_rule, eligible
from .loss import AmbientLoss, LossConfig, ambient_loss, per_sample_loss_reference
from .noise import noisy_pair, sample_normal
from .precond import EDMPrecond, VPToEDM, edm_precond_coefficients
from .schedules import edm_training_sigmas, karras_sigmas, lambda_edm, ve_to_vp_sigma, vp_to_ve_sigma

__all__ = [
    "AmbientLoss",
    "EDMPrecond",
    "LossConfig",
    "VPToEDM",
    "ambient_coefficients",
    "ambient_loss",
    "edm_precond_coefficients",
    "edm_training_sigmas",
    "eligibility_rule",
    "eligible",
    "karras_sigmas",
    "lambda_edm",
    "noisy_pair",
    "per_sample_loss_reference",
    "sample_normal",
    "ve_to_vp_sigma",
    "vp_to_ve_sigma",
]
