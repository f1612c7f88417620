"""Plain-PyTorch reference of every formula in SPEC.md: schedules, preconditioning, the
ambient loss, the noisy pair, the sampler update steps, and input validation. Imports nothing
of the package above it (the fused kernels and the public loss entry point sit above)."""

from .coefficients import ambient_coefficients, eligibility_rule, eligible
from .loss import LossConfig, per_sample_loss_reference, resolve_config
from .noise import noisy_pair, sample_normal
from .precond import EDMPrecond, VPToEDM, edm_precond_coefficients
from .schedules import edm_training_sigmas, karras_sigmas, lambda_edm, ve_to_vp_sigma, vp_to_ve_sigma

__all__ = [
    "EDMPrecond",
    "LossConfig",
    "VPToEDM",
    "ambient_coefficients",
    "edm_precond_coefficients",
    "edm_training_sigmas",
    "eligibility_rule",
    "eligible",
    "karras_sigmas",
    "lambda_edm",
    "noisy_pair",
    "per_sample_loss_reference",
    "resolve_config",
    "sample_normal",
    "ve_to_vp_sigma",
    "vp_to_ve_sigma",
]
