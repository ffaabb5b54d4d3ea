"""Diffusion math with no Ray and no I/O: schedules, forward/reverse process, losses, guidance, samplers."""

from components.diffusion.denoiser import Denoiser, ModelOutput
from components.diffusion.guidance import (
    cfg_combine,
    dynamic_threshold,
    guidance_weight_from_scale,
    make_cfg_model_fn,
    static_threshold,
    threshold_fn,
)
from components.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
    training_losses,
    vlb_terms,
)
from components.diffusion.noise import batch_noise, draw_per_sample, per_sample_noise, sample_generator
from components.diffusion.process import (
    eps_from_v,
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_eps,
    predict_x0_from_eps,
    q_posterior_mean_variance,
    q_sample,
    reverse_log_variance,
    v_from_x0_eps,
    x0_from_v,
)
from components.diffusion.registry import SAMPLERS, config_options, run_sampler, sampler_options
from components.diffusion.samplers import ddim_invert, ddim_sample, ddim_step, ddpm_sample, ddpm_step
from components.diffusion.score import (
    langevin_sample,
    langevin_step,
    pc_sample,
    reverse_diffusion_step,
    score_from_model_output,
    snr_step_size,
)
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
    "BETA_SCHEDULES", "Denoiser", "ModelOutput", "NoiseSchedule", "SAMPLERS", "approx_standard_normal_cdf",
    "batch_noise", "cfg_combine", "config_options", "cosine_betas", "ddim_invert", "ddim_sample", "ddim_step",
    "ddpm_sample", "ddpm_step", "discretized_gaussian_log_likelihood", "draw_per_sample", "dynamic_threshold",
    "eps_from_v", "extract", "guidance_weight_from_scale", "langevin_sample", "langevin_step", "linear_betas",
    "make_cfg_model_fn", "normal_kl", "p_mean_variance", "pc_sample", "per_sample_noise", "predict_eps_from_x0",
    "predict_x0_eps", "predict_x0_from_eps", "q_posterior_mean_variance", "q_sample", "reverse_diffusion_step",
    "reverse_log_variance", "run_sampler", "sample_generator", "sampler_options", "scaled_linear_betas",
    "score_from_model_output", "snr_step_size", "spaced_timesteps", "static_threshold", "threshold_fn",
    "training_losses", "v_from_x0_eps", "vlb_terms", "x0_from_v",
]
