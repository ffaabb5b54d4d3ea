"""The text encoder tau_theta (issue 17.2): the word tokenizer, the jointly trained encoder, caption
dropout, and the frozen local CLIP / T5 path with tiny models the test builds (nothing downloaded)."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch
from pydantic import ValidationError

from components.text.config import TextEncoderConfig
from components.text.load import TOKENIZER_FILE, build_text_encoder, load_tokenizer, tokenizer_from_captions
from components.text.model import NULL_CAPTION, JointTextEncoder, drop_captions
from components.text.tokenizer import BoundedCounter, WordTokenizer, build_tokenizer, normalise

CAPTIONS = ["A thick seven, leaning right!", "7, thin, upright", "a thin two leaning left", "It's 17."]


def test_tokenizer_round_trip_normalises_and_maps_unknown_words_to_unk():
    tokenizer = build_tokenizer(iter(CAPTIONS), max_tokens=16, max_vocabulary=64)
    for caption in CAPTIONS:
        assert tokenizer.decode(tokenizer.encode(caption)) == normalise(caption)
    assert normalise("It's 17.") == "it's 1 7 ."  # digits are their own tokens, punctuation split off
    ids = tokenizer.encode("a ZEBRA seven")
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and ids[2] == tokenizer.unk_id
    assert tokenizer.decode(ids) == "a <unk> seven"
    assert len(tokenizer.encode("a " * 40)) == 16 and tokenizer.encode("a " * 40)[-1] == tokenizer.eos_id
    assert tokenizer.encode(NULL_CAPTION) == [tokenizer.bos_id, tokenizer.eos_id]


def test_tokenizer_vocabulary_bounds_and_frequency():
    captions = ["seven seven seven two two one"] * 3 + ["rare"]
    tokenizer = build_tokenizer(captions, max_tokens=8, max_vocabulary=6, min_frequency=2)
    assert tokenizer.vocabulary[4:] == ["seven", "two"]  # most frequent first, capped, "rare" below min
    counter = BoundedCounter(capacity=4)
    for index in range(50):
        counter.update(["common", f"once{index}"])
    assert len(counter.counts) <= 4 and counter.counts["common"] > 1


def test_tokenizer_saves_and_loads_as_json(tmp_path):
    tokenizer = build_tokenizer(CAPTIONS, max_tokens=12, max_vocabulary=64)
    digest = tokenizer.save(tmp_path / TOKENIZER_FILE)
    assert digest == hashlib.sha256((tmp_path / TOKENIZER_FILE).read_bytes()).hexdigest()
    loaded = load_tokenizer(tmp_path)
    assert loaded.vocabulary == tokenizer.vocabulary and loaded.max_tokens == 12
    assert json.loads((tmp_path / TOKENIZER_FILE).read_text())["format"].startswith("latentflow-word-tokenizer")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="bad.json"):
        WordTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match=TOKENIZER_FILE):
        load_tokenizer(tmp_path / "nowhere")


def joint_encoder(seed: int = 0) -> JointTextEncoder:
    torch.manual_seed(seed)
    cfg = TextEncoderConfig(width=16, depth=2, heads=2, max_tokens=12)
    return build_text_encoder(cfg, tokenizer_from_captions(cfg, CAPTIONS))


def test_joint_encoder_triple_padding_and_null():
    encoder = joint_encoder().eval()
    tokens, mask, pooled = encoder(["a thick seven", "two", NULL_CAPTION])
    assert tokens.shape == (3, 5, 16) and mask.dtype == torch.bool and pooled.shape == (3, 16)
    assert mask.sum(dim=1).tolist() == [5, 3, 2]
    # padding changes nothing: a caption alone equals it in a batch padded to a longer one
    alone = encoder(["two"])
    torch.testing.assert_close(alone.tokens[0], tokens[1, :3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone.pooled[0], pooled[1], rtol=1e-5, atol=1e-6)
    # pooled is the masked mean of the real tokens
    torch.testing.assert_close(pooled[1], tokens[1, :3].mean(dim=0))
    null = encoder.null(2)
    torch.testing.assert_close(null.tokens, tokens[2:, :2].expand(2, -1, -1))
    # the null is learned: it has a gradient into the bos/eos embeddings
    encoder.train().null(1).pooled.sum().backward()
    grad = encoder.token_embedding.weight.grad
    assert grad[encoder.tokenizer.bos_id].abs().sum() > 0 and grad[encoder.tokenizer.unk_id].abs().sum() == 0


def test_caption_dropout_is_a_fraction_p_and_deterministic_given_a_generator():
    captions = [f"caption {i}" for i in range(2000)]
    first = drop_captions(captions, 0.25, torch.Generator().manual_seed(3))
    again = drop_captions(captions, 0.25, torch.Generator().manual_seed(3))
    assert first == again
    dropped = [i for i, c in enumerate(first) if c == NULL_CAPTION]
    assert 0.22 < len(dropped) / len(captions) < 0.28
    assert all(first[i] == captions[i] for i in range(len(captions)) if i not in set(dropped))
    assert drop_captions(captions, 0.0) == captions
    assert drop_captions(captions[:5], 1.0) == [NULL_CAPTION] * 5


def test_config_refuses_unknown_keys_and_a_frozen_kind_without_path():
    with pytest.raises(ValidationError, match="widht"):
        TextEncoderConfig(widht=8)
    with pytest.raises(ValidationError, match="set path"):
        TextEncoderConfig(kind="frozen_t5")
    with pytest.raises(ValidationError, match="drop path"):
        TextEncoderConfig(kind="joint", path="/somewhere")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        build_text_encoder(TextEncoderConfig())


# ---------------------------------------------------------------- the frozen path, tiny local models
# transformers comes with the 'dev' extra (and the 'text' extra): these tests fail, not skip, without it.

WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "thick", "seven", "thin", "two"]


def save_tiny_tokenizer(directory, template: str) -> None:
    """A word-level fast tokenizer written locally (the tokenizers library), bos/eos by template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<bos>", 2), ("<eos>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(directory)


def save_tiny_model(directory, kind: str) -> None:
    import transformers

    torch.manual_seed(0)
    if kind == "frozen_clip":
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    else:
        model = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
            eos_token_id=3, decoder_start_token_id=0))
    model.save_pretrained(directory)
    save_tiny_tokenizer(directory, "<bos> $A <eos>" if kind == "frozen_clip" else "$A <eos>")


@pytest.mark.parametrize("kind", ["frozen_clip", "frozen_t5"])
def test_frozen_encoder_loads_locally_frozen_with_the_same_triple(tmp_path, kind):
    save_tiny_model(tmp_path / kind, kind)
    encoder = build_text_encoder(TextEncoderConfig(kind=kind, path=str(tmp_path / kind), max_tokens=8))
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training  # stays in eval mode inside a model in training
    tokens, mask, pooled = encoder(["a thick seven", NULL_CAPTION, "zebra"])
    assert tokens.shape == (3, mask.shape[1], 16) and pooled.shape == (3, 16) and mask.dtype == torch.bool
    assert encoder.context_dim == encoder.pooled_dim == 16
    null = encoder.null(1)
    assert null.mask.sum() == (2 if kind == "frozen_clip" else 1)  # bos, eos / eos alone
    torch.testing.assert_close(null.pooled[0], pooled[1], rtol=1e-5, atol=1e-6)
    if kind == "frozen_clip":  # CLIP pools at its eos token
        torch.testing.assert_close(pooled[0], tokens[0, int(mask[0].sum()) - 1])
    else:  # T5 has no pooled token: the masked mean
        torch.testing.assert_close(pooled[2], tokens[2, : int(mask[2].sum())].mean(dim=0))
    assert not tokens.requires_grad


def test_frozen_encoder_directory_missing_or_not_a_model_names_it(tmp_path):
    missing = tmp_path / "no-clip-here"
    with pytest.raises(FileNotFoundError, match=r"dit\.text\.path: .*no-clip-here"):
        build_text_encoder(TextEncoderConfig(kind="frozen_clip", path=str(missing)), section="dit.text")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"text\.path: .*empty.* not a loadable frozen_t5"):
        build_text_encoder(TextEncoderConfig(kind="frozen_t5", path=str(tmp_path / "empty")))


def test_frozen_encoder_without_transformers_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'latentflow\[text\]'"):
        build_text_encoder(TextEncoderConfig(kind="frozen_clip", path=str(tmp_path)))
