"""Cascaded super-resolution (Ho et al. 2021): an Imagen-style Efficient U-Net per stage, noise and blur
conditioning augmentation, the training step, and the composed sampler."""
