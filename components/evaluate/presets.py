"""The evaluation classifiers by name, the keys of ``evaluate.classifier.preset``. Plain data, no torch."""

CLASSIFIER_PRESETS: dict[str, dict] = {
    "cnn-small": {"widths": (32, 64, 128), "feature_dim": 128},
    "cnn-tiny": {"widths": (8, 16, 16), "feature_dim": 32},
}
