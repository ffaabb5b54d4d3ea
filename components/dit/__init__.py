"""Diffusion Transformer (DiT) stage: a class-conditional transformer denoiser for latents."""
