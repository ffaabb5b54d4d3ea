"""Autoencoder stage: a KL-regularised convolutional autoencoder (LDM) that maps images to latents."""
