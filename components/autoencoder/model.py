"""The convolutional autoencoders of Latent Diffusion (Rombach et al. 2022, Sec. 3 and App. G):
ResNet encoder -> c-channel latent at 1/f resolution -> ResNet decoder, regularised either by a KL
term (``AutoencoderKL``: a diagonal Gaussian posterior) or by vector quantisation
(``AutoencoderVQ``: a codebook absorbed into the decoder). Plain nn.Modules: no parallelism, no I/O,
no perceptual loss (that lives in training)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from components.autoencoder.quantize import CodeStats, VectorQuantizer

from components.autoencoder.presets import AUTOENCODER_PRESETS



def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    # LDM uses 32 groups; small test models have fewer channels, so take the largest divisor <= 32.
    return nn.GroupNorm(math.gcd(channels, max_groups), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (N, C_out, H, W)
        return self.skip(x) + h  # (N, C_out, H, W)


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2)  # (N, 3, HW, C)
        q, k, v = qkv.unbind(1)  # 3 x (N, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, HW, C)
        return x + self.proj_out(out.transpose(1, 2).reshape(n, c, h, w))  # (N, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding as in LDM, so that H/2 x W/2 comes out exactly for even sizes.
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (N, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, C, 2H, 2W)


def mid_block(channels: int, use_attention: bool) -> nn.Sequential:
    attn = AttnBlock(channels) if use_attention else nn.Identity()
    return nn.Sequential(ResnetBlock(channels, channels), attn, ResnetBlock(channels, channels))


class Encoder(nn.Module):
    def __init__(self, in_channels: int, base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 out_channels: int, use_attention: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        layers: list[nn.Module] = []
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(ch, base_channels * mult))
                ch = base_channels * mult
            if level != len(channel_mult) - 1:
                layers.append(Downsample(ch))
        self.down = nn.Sequential(*layers)
        self.mid = mid_block(ch, use_attention)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))  # (N, C_top, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, out_channels, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, out_channels: int, base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 latent_channels: int, use_attention: bool):
        super().__init__()
        ch = base_channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = mid_block(ch, use_attention)
        layers: list[nn.Module] = []
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks + 1):  # one more than the encoder, as in LDM
                layers.append(ResnetBlock(ch, base_channels * channel_mult[level]))
                ch = base_channels * channel_mult[level]
            if level != 0:
                layers.append(Upsample(ch))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))  # (N, C_base, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, C_img, H, W)


class DiagonalGaussian:
    """Posterior N(mean, diag(exp(logvar))) from (N, 2c, h, w) moments."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # 2 x (N, c, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite early in training
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise  # (N, c, h, w)

    def mode(self) -> torch.Tensor:
        return self.mean  # (N, c, h, w)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions: (N,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, in_channels: int = 3, base_channels: int = 128, channel_mult: tuple[int, ...] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, latent_channels: int = 4, use_attention: bool = True):
        super().__init__()
        channel_mult = tuple(channel_mult)
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.encoder = Encoder(in_channels, base_channels, channel_mult, num_res_blocks, 2 * latent_channels,
                               use_attention)
        # 1x1 convs between the image-space networks and the latent, as in LDM's first stage.
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(in_channels, base_channels, channel_mult, num_res_blocks, latent_channels,
                               use_attention)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # moments (N, 2c, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))  # (N, C_img, H, W)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()  # (N, c, H/f, W/f)
        return self.decode(z), posterior  # (N, C_img, H, W)

    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output conv weight, for the adaptive GAN weight."""
        return self.decoder.conv_out.weight


class DeterministicLatent:
    """A point mass at the VQ encoder's pre-quantisation latent, with the posterior's interface:
    ``mode()`` and ``sample()`` are both the latent, ``kl()`` is zero."""

    def __init__(self, latent: torch.Tensor):
        self.mean = latent  # (N, c, h, w)

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[0])


class AutoencoderVQ(nn.Module):
    """LDM's VQ-regularised first stage (``VQModelInterface``): ``encode`` gives the continuous
    pre-quantisation latent (what the latents step stores and the DiT diffuses); ``decode(z)``
    quantises ``z`` with the codebook, then decodes, so the quantiser belongs to the decoder.
    The codebook's dimension is ``latent_channels`` (LDM's ``embed_dim``)."""

    def __init__(self, in_channels: int = 3, base_channels: int = 128, channel_mult: tuple[int, ...] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, latent_channels: int = 4, use_attention: bool = True,
                 codebook_size: int = 8192, beta: float = 0.25, ema_decay: float = 0.99,
                 dead_code_threshold: float = 1.0, epsilon: float = 1e-5):
        super().__init__()
        channel_mult = tuple(channel_mult)
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.encoder = Encoder(in_channels, base_channels, channel_mult, num_res_blocks, latent_channels,
                               use_attention)
        self.quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(in_channels, base_channels, channel_mult, num_res_blocks, latent_channels,
                               use_attention)
        self.quantizer = VectorQuantizer(codebook_size, latent_channels, beta, ema_decay, dead_code_threshold,
                                         epsilon)

    def encode(self, x: torch.Tensor) -> DeterministicLatent:
        return DeterministicLatent(self.quant_conv(self.encoder(x)))  # (N, c, H/f, W/f)

    def quantize(self, z: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, CodeStats]:
        """(quantised z, β·commitment loss, code statistics); updates the codebook in train mode."""
        return self.quantizer(z, generator)

    def decode_quantized(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quantized))  # (N, C_img, H, W)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_quantized(self.quantize(z)[0])  # (N, C_img, H, W)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DeterministicLatent]:
        latent = self.encode(x)  # deterministic: sample_posterior changes nothing
        return self.decode(latent.mode()), latent  # (N, C_img, H, W)

    def last_layer_weight(self) -> torch.Tensor:
        return self.decoder.conv_out.weight


# autoencoder.regularizer -> the class that implements it
AUTOENCODER_CLASSES: dict[str, type[nn.Module]] = {"kl": AutoencoderKL, "vq": AutoencoderVQ}


def build_autoencoder(preset: str, regularizer: str = "kl", **overrides) -> AutoencoderKL | AutoencoderVQ:
    """Build an autoencoder from an AUTOENCODER_PRESETS key and a regularizer ("kl" or "vq");
    keyword overrides replace preset values (and give a VQ model its codebook arguments). The model
    keeps them as ``model.arguments`` (autoencoder.json records them under ``model``)."""
    if preset not in AUTOENCODER_PRESETS:
        raise ValueError(f"unknown autoencoder preset {preset!r}; valid presets: {', '.join(AUTOENCODER_PRESETS)}")
    if regularizer not in AUTOENCODER_CLASSES:
        raise ValueError(f"unknown regularizer {regularizer!r}; valid: {', '.join(AUTOENCODER_CLASSES)}")
    arguments = {**AUTOENCODER_PRESETS[preset], **overrides}
    arguments["channel_mult"] = list(arguments["channel_mult"])  # as JSON gives it back
    model = AUTOENCODER_CLASSES[regularizer](**arguments)
    model.arguments = arguments
    return model
