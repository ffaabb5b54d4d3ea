"""The autoencoders by name, the keys of ``autoencoder.preset``. Plain data, no torch: the config
checks a preset and its shapes at load. ``in_channels`` is the preset's default only: the
autoencoder takes the shards' channels (pipelines/shapes.py)."""

AUTOENCODER_PRESETS: dict[str, dict] = {
    # Test-sized: f=2, about 0.1M parameters.
    "ae-tiny": dict(in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                    latent_channels=4, use_attention=False),
    # Grayscale 32x32 digits, f=4: sized to train ~500 steps of batch 128 in about 90 s on 2 threads.
    "ae-mnist": dict(in_channels=1, base_channels=8, channel_mult=(1, 2, 4), num_res_blocks=1,
                     latent_channels=4, use_attention=False),
    # A cascade's 64 px base: f=2, c=4 keeps the 32x32x4 latent grid of the ImageNet-256 DiT.
    "ae-f2c4": dict(in_channels=3, base_channels=128, channel_mult=(1, 2), num_res_blocks=2,
                    latent_channels=4, use_attention=True),
    # The production LDM first stage (kl-f8, c=4), about 84M parameters.
    "ae-f8c4": dict(in_channels=3, base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                    latent_channels=4, use_attention=True),
}
