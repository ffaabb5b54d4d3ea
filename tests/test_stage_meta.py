"""Typed stage metadata writes the JSON the dict version wrote, and reads back what it wrote."""

from __future__ import annotations

import pytest

from components.evaluate.load import ClassifierMeta
from components.noisy_classifier.load import NoisyClassifierMeta

CLASSIFIER_JSON = {"preset": "cnn-tiny", "in_channels": 1, "num_classes": 2, "classes": ["a", "b"], "image_size": 8,
                   "val_accuracy": 0.5, "input_range": "uint8 / 127.5 - 1", "train": {"steps": 3}}
NOISY_JSON = {"preset": "nc-tiny", "model": {"channels": 16}, "schedule": "linear", "num_timesteps": 1000,
              "classes": ["a", "b"], "latent_shape": [4, 8, 8], "parameters": 123}


@pytest.mark.parametrize("meta_class,written", [(ClassifierMeta, CLASSIFIER_JSON), (NoisyClassifierMeta, NOISY_JSON)])
def test_a_round_trip_gives_the_same_json_unknown_keys_included(meta_class, written):
    assert meta_class.from_json(written).to_json() == written
    newer = {**written, "written_by_newer_code": [1, 2]}
    meta = meta_class.from_json(newer)
    assert meta.to_json() == newer and meta.extra == {"written_by_newer_code": [1, 2]}
    assert meta["classes"] == meta.classes == ["a", "b"] and meta.get("absent", 7) == 7


def test_a_field_older_files_lack_is_left_out_and_a_required_one_is_named():
    older = {k: v for k, v in NOISY_JSON.items() if k not in ("latent_shape", "parameters")}
    assert NoisyClassifierMeta.from_json(older).to_json() == older
    with pytest.raises(TypeError, match="classes"):
        ClassifierMeta.from_json({k: v for k, v in CLASSIFIER_JSON.items() if k != "classes"})
