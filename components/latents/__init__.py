"""Latents step: encode every shard once with the trained autoencoder into latent shards."""
