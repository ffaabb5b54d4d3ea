"""Diffusion math with no Ray and no I/O: schedules, forward/reverse process, losses, guidance, samplers."""

from components.diffusion.guidance import (
    cfg_combine,
    dynamic_threshold,
    guidance_weight_from_scale,
    make_cfg_model_fn,
    static_threshold,
)
from components.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
    training_losses,
    vlb_terms,
)
from components.diffusion.process import (
    eps_from_v,
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_eps,
    predict_x0_from_eps,
    q_posterior_mean_variance,
    q_sample,
    v_from_x0_eps,
    x0_from_v,
)
from components.diffusion.samplers import SAMPLERS, ddim_invert, ddim_sample, ddim_step, ddpm_sample, ddpm_step
from components.diffusion.schedule import (
    BETA_SCHEDULES,
    NoiseSchedule,
    cosine_betas,
    extract,
    linear_betas,
    scaled_linear_betas,
    spaced_timesteps,
)

__all__ = [
    "BETA_SCHEDULES", "SAMPLERS", "NoiseSchedule", "approx_standard_normal_cdf", "cfg_combine", "cosine_betas",
    "ddim_invert", "ddim_sample", "ddim_step", "ddpm_sample", "ddpm_step", "discretized_gaussian_log_likelihood",
    "dynamic_threshold", "eps_from_v", "extract", "guidance_weight_from_scale", "linear_betas", "make_cfg_model_fn",
    "normal_kl", "p_mean_variance", "predict_eps_from_x0", "predict_x0_eps", "predict_x0_from_eps",
    "q_posterior_mean_variance", "q_sample", "scaled_linear_betas", "spaced_timesteps", "static_threshold",
    "training_losses", "v_from_x0_eps", "vlb_terms", "x0_from_v",
]
