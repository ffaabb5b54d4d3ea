"""The noisy classifiers by name, the keys of ``noisy_classifier.preset``. Plain data, no torch."""

NOISY_CLASSIFIER_PRESETS = {
    "nc-tiny": dict(channels=32, channel_mults=(1, 2), blocks=1),
    "nc-small": dict(channels=64, channel_mults=(1, 2, 2), blocks=2),
    # ImageNet latents (32x32x4), 1,000 classes
    "nc-base": dict(channels=128, channel_mults=(1, 2, 3, 4), blocks=2),
}
