"""Shape, initialisation and wiring tests for the DiT and the KL autoencoder (tiny configs, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from components.autoencoder.discriminator import PatchDiscriminator, adaptive_disc_weight, hinge_d_loss
from components.autoencoder.model import AUTOENCODER_PRESETS, DiagonalGaussian, build_autoencoder
from components.dit.model import DIT_PRESETS, DiT, build_dit, dit_flops_per_image


def micro_dit(**overrides) -> DiT:
    return build_dit("DiT-Micro/2", **{"input_size": 8, "num_classes": 10, **overrides})


def dit_inputs(n: int = 3, size: int = 8):
    return torch.randn(n, 4, size, size), torch.randint(0, 1000, (n,)), torch.randint(0, 10, (n,))


# ---------------------------------------------------------------------------------------------- DiT


@pytest.mark.parametrize("learn_sigma, out_channels", [(False, 4), (True, 8)])
def test_dit_output_shape(learn_sigma, out_channels):
    model = micro_dit(learn_sigma=learn_sigma)
    assert model(*dit_inputs()).shape == (3, out_channels, 8, 8)


def test_dit_non_square_patch_grid_rejected():
    with pytest.raises(ValueError, match="divisible"):
        micro_dit(input_size=9)


def test_adaln_zero_blocks_are_identity_and_output_is_zero_at_init():
    torch.manual_seed(0)
    model = micro_dit().eval()
    x, c = torch.randn(3, 16, 64), torch.randn(3, 64)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    assert torch.count_nonzero(model(*dit_inputs())) == 0


def test_class_dropout_only_in_training_mode():
    model = micro_dit(class_dropout_prob=1.0)
    embedder = model.y_embedder
    y = torch.arange(10)
    null_row = embedder.embedding_table.weight[model.null_class_id]
    model.train()
    assert torch.equal(embedder(y), null_row.expand(10, -1))
    model.eval()
    assert torch.equal(embedder(y), embedder.embedding_table.weight[:10])
    # Labels already set to the null id are valid inputs (the unconditional half of CFG).
    assert torch.equal(embedder(torch.full((2,), model.null_class_id)), null_row.expand(2, -1))
    forced = embedder(y[:3], force_drop_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(forced[0], null_row) and torch.equal(forced[1], embedder.embedding_table.weight[1])


def test_label_conditions_output_after_training_steps():
    torch.manual_seed(0)
    model = micro_dit(class_dropout_prob=0.0, learn_sigma=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, y = dit_inputs(n=8)
    # Under adaLN-Zero the first step can only move the final linear (every other gradient passes
    # through a zero weight), so the label reaches the output from the second step on.
    for _ in range(2):
        loss = F.mse_loss(model(x, t, y), torch.randn_like(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out_a = model(x[:1], t[:1], torch.tensor([0]))
        out_b = model(x[:1], t[:1], torch.tensor([1]))
        out_null = model(x[:1], t[:1], torch.tensor([model.null_class_id]))
    assert not torch.allclose(out_a, out_b)
    assert not torch.allclose(out_a, out_null)


@pytest.mark.parametrize("preset", ["DiT-Micro/2", "DiT-Tiny/2"])
def test_small_presets_build_and_run(preset):
    model = build_dit(preset, input_size=8, num_classes=10)
    assert model(*dit_inputs(n=2)).shape == (2, 8, 8, 8)


def test_dit_xl2_parameter_count_without_allocating():
    with torch.device("meta"):
        model = build_dit("DiT-XL/2")  # ImageNet-256 defaults: 32x32x4 latents, 1000 classes
    n_params = sum(p.numel() for p in model.parameters())
    assert 670e6 < n_params < 680e6  # the paper's 675M
    assert all(p.is_meta for p in model.parameters())


def test_unknown_dit_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="DiT-XL/2"):
        build_dit("DiT-XXL/2")
    assert {"DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2", "DiT-Tiny/2", "DiT-Micro/2"} <= set(DIT_PRESETS)


def test_flop_counter_matches_hand_count_and_torch_counter():
    model = micro_dit(learn_sigma=False)
    tokens, d, mlp, patch_in, out = 16, 64, 256, 16, 16
    macs = tokens * patch_in * d + (256 * d + d * d)  # patch embed, timestep MLP
    macs += 2 * (d * 6 * d + tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d + 2 * tokens * d * mlp)
    macs += d * 2 * d + tokens * d * out  # final adaLN and linear
    assert dit_flops_per_image(model, 8) == 2 * macs == 3_497_984
    counter = FlopCounterMode(display=False)
    # The math SDPA backend decomposes into bmm, which the torch counter sees (the fused CPU kernel is
    # not registered with it).
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(*dit_inputs(n=2))
    assert counter.get_total_flops() == 2 * dit_flops_per_image(model, 8)


# ---------------------------------------------------------------------------------------- autoencoder


class AutoencoderContract:
    """Round-trip contract every autoencoder (KL now, VQ later) satisfies; subclasses set the builder."""

    downsample_factor: int
    latent_channels: int
    image_channels: int = 3

    def build(self):
        raise NotImplementedError

    def test_round_trip_shapes(self):
        model = self.build()
        n, f, size = 2, self.downsample_factor, 16
        x = torch.randn(n, self.image_channels, size, size)
        posterior = model.encode(x)
        assert model.downsample_factor == f
        assert posterior.sample().shape == posterior.mode().shape == (n, self.latent_channels, size // f, size // f)
        recon, posterior = model(x)
        assert recon.shape == x.shape
        assert model.decode(posterior.mode()).shape == x.shape

    def test_steps_reduce_reconstruction_loss(self):
        torch.manual_seed(0)
        model = self.build()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        x = torch.rand(4, self.image_channels, 8, 8) * 2 - 1
        losses = []
        for _ in range(15):
            recon, _ = model(x, sample_posterior=False)
            loss = F.l1_loss(recon, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.8 * losses[0]


class TestAutoencoderKLTiny(AutoencoderContract):
    downsample_factor, latent_channels = 2, 4

    def build(self):
        return build_autoencoder("ae-tiny")


def test_autoencoder_presets_downsample_factors():
    assert build_autoencoder("ae-mnist").downsample_factor == 4
    with torch.device("meta"):
        f8 = build_autoencoder("ae-f8c4")
    assert f8.downsample_factor == 8 and f8.latent_channels == 4
    assert sum(p.numel() for p in f8.parameters()) == 83_653_863  # CompVis kl-f8, parameter for parameter
    with pytest.raises(ValueError, match="ae-tiny"):
        build_autoencoder("ae-huge")
    with torch.device("meta"):
        f2 = build_autoencoder("ae-f2c4")  # the 64 px cascade base: keeps a 32x32x4 latent grid
    assert f2.downsample_factor == 2 and f2.latent_channels == 4
    assert set(AUTOENCODER_PRESETS) == {"ae-tiny", "ae-mnist", "ae-f2c4", "ae-f8c4"}


def test_autoencoder_attention_mid_block_runs():
    model = build_autoencoder("ae-tiny", use_attention=True)
    recon, _ = model(torch.randn(1, 3, 8, 8))
    assert recon.shape == (1, 3, 8, 8)


def test_kl_is_nonnegative_and_zero_for_standard_normal():
    torch.manual_seed(0)
    assert (DiagonalGaussian(torch.randn(4, 8, 3, 3) * 3).kl() >= 0).all()
    standard = DiagonalGaussian(torch.zeros(2, 8, 3, 3))
    assert torch.equal(standard.kl(), torch.zeros(2))
    assert standard.std.eq(1).all()


# ---------------------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_patch_discriminator_output_shape(norm):
    disc = PatchDiscriminator(in_channels=3, base_channels=8, num_layers=3, norm=norm)
    # 64 -> 32 -> 16 -> 8 (strided convs) -> 7 -> 6 (k=4, s=1, p=1 convs)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_hinge_d_loss_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0


def test_adaptive_disc_weight_is_gradient_norm_ratio():
    weight = torch.randn(4, 4, requires_grad=True)
    nll, g_loss = (2.0 * weight).sum(), (4.0 * weight).sum()  # gradients 2 and 4 everywhere
    w = adaptive_disc_weight(nll, g_loss, weight, disc_weight=0.5)
    assert not w.requires_grad
    assert w.item() == pytest.approx(0.5 * 8.0 / (16.0 + 1e-4))
