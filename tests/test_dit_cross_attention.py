"""Cross-attention to text tokens in the DiT (issue 17): shapes, that the text reaches the output and
padding does not, the zero start, and classifier-free guidance with the text null."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from components.diffusion import make_cfg_model_fn
from components.dit.model import CrossAttention, DiT, DiTBlock, build_dit, dit_flops_per_image
from components.text.config import TextEncoderConfig
from components.text.load import build_text_encoder, tokenizer_from_captions
from components.text.model import drop_captions

CONTEXT_DIM, POOLED_DIM, TOKENS = 12, 10, 5


def text_dit(num_classes: int | None = 3, seed: int = 0):
    torch.manual_seed(seed)
    return build_dit("DiT-Micro/2", input_size=4, in_channels=4, num_classes=num_classes, learn_sigma=False,
                     context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM)


def perturb(model: torch.nn.Module, skip: tuple[str, ...] = (), seed: int = 1) -> None:
    """Every weight (the zero-initialised ones too) drawn at random, except those whose name has a ``skip`` part."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not any(part in name for part in skip):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def inputs(batch: int = 2, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 4, 4, 4, generator=g), t=torch.tensor([10, 500])[:batch],
                y=torch.tensor([0, 2])[:batch], context=torch.randn(batch, TOKENS, CONTEXT_DIM, generator=g),
                context_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:batch],
                pooled=torch.randn(batch, POOLED_DIM, generator=g))


def run(model, x, t, y, **text):
    with torch.no_grad():
        return model.eval()(x, t, y, **text)


def test_cross_attention_and_block_shapes():
    attention = CrossAttention(hidden_size=16, context_dim=CONTEXT_DIM, num_heads=2)
    x, context = torch.randn(3, 7, 16), torch.randn(3, TOKENS, CONTEXT_DIM)
    assert attention(x, context, None).shape == (3, 7, 16)
    block = DiTBlock(16, 2, context_dim=CONTEXT_DIM)
    assert block(x, torch.randn(3, 16), context=context, context_attn_mask=None).shape == (3, 7, 16)
    model = text_dit()
    a = inputs()
    assert model(a["x"], a["t"], a["y"], context=a["context"], context_mask=a["context_mask"],
                 pooled=a["pooled"]).shape == (2, 4, 4, 4)


def test_text_tokens_change_the_output_and_padding_does_not():
    model = text_dit()
    perturb(model)
    a = inputs()
    text = dict(context=a["context"], context_mask=a["context_mask"], pooled=a["pooled"])
    base = run(model, a["x"], a["t"], a["y"], **text)
    changed = a["context"].clone()
    changed[:, 0] += 1.0  # a real token of both rows
    assert (run(model, a["x"], a["t"], a["y"], **{**text, "context": changed}) - base).abs().amax() > 1e-3
    padding = a["context"].clone()
    padding[0, 3:] = torch.randn(2, CONTEXT_DIM) * 100  # row 0's masked-out tokens
    moved = run(model, a["x"], a["t"], a["y"], **{**text, "context": padding})
    torch.testing.assert_close(moved, base, rtol=0, atol=1e-6)
    # and the same caption without its padding gives the same row
    alone = run(model, a["x"][:1], a["t"][:1], a["y"][:1], context=a["context"][:1, :3], pooled=a["pooled"][:1])
    torch.testing.assert_close(alone, base[:1], rtol=1e-5, atol=1e-6)
    # the pooled embedding reaches c
    assert (run(model, a["x"], a["t"], a["y"], **{**text, "pooled": a["pooled"] + 1}) - base).abs().amax() > 1e-3


def test_a_fresh_text_model_outputs_zero_and_ignores_text():
    """adaLN-Zero makes a fresh DiT's output exactly zero; the text entries start at zero too."""
    model = text_dit()
    a = inputs()
    out = run(model, a["x"], a["t"], a["y"], context=a["context"], context_mask=a["context_mask"], pooled=a["pooled"])
    assert torch.equal(out, torch.zeros_like(out))


def test_a_fresh_text_entry_leaves_the_class_conditional_model_as_it_was():
    """With the shared weights trained (perturbed) and the text entries fresh, the text model computes
    exactly what the class-conditional model computes: text starts at zero, whatever it says."""
    text_model = text_dit()
    perturb(text_model, skip=("cross_attn.proj", "pooled_embedder.mlp.2"))
    torch.manual_seed(0)
    class_model = build_dit("DiT-Micro/2", input_size=4, in_channels=4, num_classes=3, learn_sigma=False)
    missing, unexpected = class_model.load_state_dict(text_model.state_dict(), strict=False)
    assert not missing and all("cross" in k or "pooled_embedder" in k for k in unexpected)
    a = inputs()
    expected = run(class_model, a["x"], a["t"], a["y"])
    for context in (a["context"], -3 * a["context"]):
        out = run(text_model, a["x"], a["t"], a["y"], context=context, context_mask=a["context_mask"],
                  pooled=a["pooled"] * 5)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_text_only_model_and_missing_or_unexpected_signals_are_named():
    model = text_dit(num_classes=None)
    assert model.y_embedder is None
    a = inputs()
    assert model(a["x"], a["t"], context=a["context"], pooled=a["pooled"]).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="context_dim: context is required"):
        model(a["x"], a["t"], pooled=a["pooled"])
    with pytest.raises(ValueError, match="without num_classes: it takes no y"):
        model(a["x"], a["t"], a["y"], context=a["context"], pooled=a["pooled"])
    with pytest.raises(ValueError, match="no real token"):
        model(a["x"], a["t"], context=a["context"], context_mask=torch.zeros(2, TOKENS, dtype=torch.bool),
              pooled=a["pooled"])
    class_model = build_dit("DiT-Micro/2", input_size=4, in_channels=4, num_classes=3, learn_sigma=False)
    with pytest.raises(ValueError, match="without context_dim: it takes no context"):
        class_model(a["x"], a["t"], a["y"], context=a["context"])


def test_guidance_doubles_the_text_and_nulls_it_in_the_unconditional_half():
    model = text_dit(num_classes=None)
    perturb(model)
    a = inputs()
    # the null: the empty caption's two tokens (bos, eos), one row, shorter than the prompts
    null = dict(context=torch.randn(1, 2, CONTEXT_DIM), context_mask=torch.ones(1, 2, dtype=torch.bool),
                pooled=torch.randn(1, POOLED_DIM))
    seen = {}

    def model_fn(x, t, y, **cond):
        seen.update(cond, y=y)
        return run(model, x, t, y, **cond)

    text = dict(context=a["context"], context_mask=a["context_mask"], pooled=a["pooled"])
    guided = make_cfg_model_fn(model_fn, None, 2.0, null_text=null)(a["x"], a["t"], **text)
    assert seen["y"] is None and seen["context"].shape == (4, TOKENS, CONTEXT_DIM)
    torch.testing.assert_close(seen["context"][:2], a["context"])
    torch.testing.assert_close(seen["context"][2:, :2], null["context"].expand(2, -1, -1))
    assert seen["context_mask"][2:].tolist() == [[True, True, False, False, False]] * 2
    torch.testing.assert_close(seen["pooled"][2:], null["pooled"].expand(2, -1))
    cond = run(model, a["x"], a["t"], None, **text)
    uncond = run(model, a["x"], a["t"], None, context=null["context"].expand(2, -1, -1),
                 context_mask=null["context_mask"].expand(2, -1), pooled=null["pooled"].expand(2, -1))
    torch.testing.assert_close(guided, 3.0 * cond - 2.0 * uncond, rtol=1e-4, atol=1e-5)  # batched vs alone


def test_guidance_with_class_and_text_nulls_both_and_refuses_nothing_to_null():
    model = text_dit(num_classes=3)
    perturb(model)
    a = inputs()
    null = dict(context=torch.zeros(1, 2, CONTEXT_DIM), pooled=torch.zeros(1, POOLED_DIM))
    seen = {}

    def model_fn(x, t, y, **cond):
        seen.update(cond, y=y)
        return run(model, x, t, y, **cond)

    make_cfg_model_fn(model_fn, 3, 1.5, null_text=null)(a["x"], a["t"], a["y"], context=a["context"],
                                                         context_mask=a["context_mask"], pooled=a["pooled"])
    assert seen["y"].tolist() == [0, 2, 3, 3]
    assert seen["context_mask"][2:].tolist() == [[True, True, False, False, False]] * 2
    with pytest.raises(ValueError, match="a condition to null"):
        make_cfg_model_fn(model_fn, None, 1.5)(a["x"], a["t"], context=a["context"], pooled=a["pooled"])
    with pytest.raises(ValueError, match="'context' needs 2 rows"):
        make_cfg_model_fn(model_fn, None, 1.5, null_text=null)(a["x"], a["t"], context=a["context"][:1],
                                                               pooled=a["pooled"])


def test_flop_count_of_a_text_model_matches_the_torch_counter():
    model = text_dit()
    a = inputs()
    counter = FlopCounterMode(display=False)
    # the math SDPA backend decomposes into bmm, which the torch counter sees
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(a["x"], a["t"], a["y"], context=a["context"], context_mask=a["context_mask"], pooled=a["pooled"])
    assert counter.get_total_flops() == 2 * dit_flops_per_image(model, context_tokens=TOKENS)


def test_text_off_leaves_the_recorded_arguments_as_before():
    class_model = build_dit("DiT-Micro/2", input_size=4, num_classes=3)
    assert not {"context_dim", "pooled_dim"} & set(class_model.arguments)
    text_model = text_dit()
    assert text_model.arguments["context_dim"] == CONTEXT_DIM and text_model.arguments["pooled_dim"] == POOLED_DIM
    rebuilt = DiT(**text_model.arguments)
    assert list(rebuilt.state_dict()) == list(text_model.state_dict())


def test_the_joint_encoder_trains_with_the_dit_and_its_null_guides():
    """tau_theta and the DiT as one model: the text gets gradients once the zero entries move, and the
    encoder's empty-caption null is what guidance's unconditional half computes with."""
    captions = ["a thick seven", "a thin two", "seven leaning right", "two upright"]
    torch.manual_seed(0)
    text_cfg = TextEncoderConfig(width=CONTEXT_DIM, depth=1, heads=2, max_tokens=8, caption_dropout=0.5)
    encoder = build_text_encoder(text_cfg, tokenizer_from_captions(text_cfg, captions))
    model = build_dit("DiT-Micro/2", input_size=4, in_channels=4, num_classes=None, learn_sigma=False,
                      context_dim=encoder.context_dim, pooled_dim=encoder.pooled_dim)
    optimizer = torch.optim.Adam([*model.parameters(), *encoder.parameters()], lr=1e-2)
    before = encoder.token_embedding.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, target = torch.randn(4, 4, 4, 4, generator=g), torch.randn(4, 4, 4, 4, generator=g)
        text = encoder(drop_captions(captions, text_cfg.caption_dropout, g))
        loss = ((model(x, torch.tensor([1, 200, 400, 900]), **text.extra_args()) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = (encoder.token_embedding.weight.detach() - before).abs().sum(dim=1)
    tokenizer = encoder.tokenizer
    assert moved[tokenizer.ids["seven"]] > 0 and moved[tokenizer.bos_id] > 0 and moved[tokenizer.unk_id] == 0

    encoder.eval()
    with torch.no_grad():
        null, prompts = encoder.null(1), encoder(["a thick seven", "two"])
        seen = {}

        def model_fn(x, t, y, **cond):
            seen.update(cond)
            return model.eval()(x, t, y, **cond)

        x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([300, 300])
        make_cfg_model_fn(model_fn, None, 1.0, null_text=null.extra_args())(x, t, **prompts.extra_args())
        expected = encoder.null(2)
    torch.testing.assert_close(seen["context"][2:, :2], expected.tokens)
    assert seen["context_mask"][2:].sum(dim=1).tolist() == [2, 2]
    torch.testing.assert_close(seen["pooled"][2:], expected.pooled)


def test_fp32_text_meets_bf16_weights():
    """DeepSpeed casts the DiT to bf16; the text encoder's fp32 output is cast at the model's entry."""
    model = text_dit().to(torch.bfloat16)
    perturb(model)
    a = inputs()
    out = model(a["x"].bfloat16(), a["t"], a["y"], context=a["context"], context_mask=a["context_mask"],
                pooled=a["pooled"])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
