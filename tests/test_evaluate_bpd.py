"""The evaluate step reports bits/dim (``bpd``: components/evaluate/bpd.py) for a DiT that learns Σ and not for
a fixed-variance one: the real step on real shards (120 digits at 8 px), an untrained autoencoder and
untrained DiTs in their file formats, a classifier of a few steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from components.common.config import StepResources
from components.dit.config import SamplingConfig
from components.dit.load import DIT_META, DIT_WEIGHTS
from components.evaluate import run as evaluate_module
from components.evaluate.config import BpdConfig, ClassifierTrainConfig, EvaluateConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shard_and_autoencoder(ray_cluster, tmp_path_factory):
    from components.shard.config import ShardConfig
    from components.shard.run import run as shard
    from test_dit import manifest_from, step_ctx, untrained_autoencoder_manifest

    root = tmp_path_factory.mktemp("bpd")
    ctx = step_ctx(root, "shard")
    shard_manifest = manifest_from(shard(ShardConfig(max_samples=120, image_size=8, samples_per_shard=60,
                                                     val_fraction=0.2), {}, ctx), ctx)
    return root, shard_manifest, untrained_autoencoder_manifest(root, shard_manifest.info["classes"])


def dit_manifest(root, classes: list[str], learn_sigma: bool):
    from safetensors.torch import save

    from components.dit.model import build_dit
    from test_evaluate import write_step
    import metas

    kwargs = dict(input_size=4, in_channels=4, num_classes=len(classes), learn_sigma=learn_sigma, depth=2,
                  hidden_size=64, num_heads=2, patch_size=2)
    torch.manual_seed(0)
    dit = build_dit("DiT-Micro/2", **kwargs)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = metas.dit_meta(model=kwargs, schedule="scaled_linear", num_timesteps=1000, prediction="eps",
                          learn_sigma=learn_sigma, num_classes=len(classes), null_label=dit.null_class_id,
                          latent_shape=[4, 4, 4], classes=classes, image_channels=1, image_size=8)
    return write_step(root / ("sigma" if learn_sigma else "fixed"), "dit",
                      {DIT_WEIGHTS: save(dit.state_dict()), DIT_META: json.dumps(meta.to_json()).encode()})


@pytest.mark.parametrize("learn_sigma", [True, False], ids=["learned-variance", "simple-loss"])
def test_bits_per_dim_appear_for_a_learned_variance_dit_only(shard_and_autoencoder, learn_sigma, tmp_path):
    from test_evaluate import make_ctx

    root, shard, autoencoder = shard_and_autoencoder
    cfg = EvaluateConfig(classifier=ClassifierTrainConfig(preset="cnn-tiny", steps=5, batch_size=16),
                         samples_per_class=2, sample=SamplingConfig(steps=2, guidance=1.0), batch_size=20,
                         bpd=BpdConfig(samples=16, timesteps=8, batch_size=8), resources=StepResources(num_cpus=1))
    inputs = {"shard": shard, "autoencoder": autoencoder, "dit": dit_manifest(root, shard.info["classes"], learn_sigma)}
    out = evaluate_module.run(cfg, inputs, make_ctx(tmp_path, "evaluate"))
    metrics = out.metrics
    if not learn_sigma:
        assert not any(name.startswith("bpd") for name in metrics), metrics
        return
    print(f"\nbpd {metrics['bpd']:.3f} = prior {metrics['bpd_prior']:.4f} + kl {metrics['bpd_kl']:.3f} "
          f"+ decoder {metrics['bpd_decoder']:.3f} (untrained DiT)")
    assert metrics["bpd_samples"] == 16 and metrics["bpd_timesteps"] == 9  # t = 0 and 8 KL terms
    assert math.isclose(metrics["bpd"], metrics["bpd_prior"] + metrics["bpd_kl"] + metrics["bpd_decoder"],
                        rel_tol=1e-9)
    assert metrics["bpd_kl"] > 0 and metrics["bpd_prior"] >= 0 and math.isfinite(metrics["bpd"])
    assert json.loads(make_ctx(tmp_path, "evaluate").output.read_text(evaluate_module.EVALUATION))["metrics"]["bpd"] \
        == pytest.approx(metrics["bpd"])
    # the same config without the section keeps the evaluate cache key it had before the field
    assert "bpd" not in EvaluateConfig().cache_relevant() and "bpd" in cfg.cache_relevant()
