"""The super-resolution U-Nets by name, the keys of ``superres[k].preset``. Plain data, no torch:
the config checks a preset and its sizes at load."""

SUPERRES_PRESETS: dict[str, dict] = {
    # tests and the smoke pipeline
    "sr-tiny": dict(channels=8, channel_mults=(1, 2), blocks=(1, 1), attention_levels=()),
    # MNIST 32 -> 64: widths 8/16/32 at 64/32/16 px; ~4 ms per 64x64 image on one CPU thread
    "sr-mnist": dict(channels=8, channel_mults=(1, 2, 4), blocks=(1, 1, 2), attention_levels=()),
    # ImageNet 64 -> 256: Imagen's SR-256 layout at a third of its width
    "sr-256": dict(channels=128, channel_mults=(1, 2, 4, 8), blocks=(2, 4, 8, 8), attention_levels=()),
}
