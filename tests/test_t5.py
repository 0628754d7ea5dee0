"""FLUX.1's T5 v1.1 text encoder and tokenizer, checked against transformers: token ids of its T5 tokenizer on
the same SentencePiece file (one trained here), hidden states of a tiny ``T5EncoderModel`` loaded strictly with
our weights, and the XXL encoder's key layout from ../shared/reference."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import randomize_, reference_layout, rel_err
from helpers import train_spiece
from ldm.families.flux.modules.t5 import FrozenT5Embedder, T5Config, T5Encoder, T5Tokenizer, t5_state_dict
from ldm.util import instantiate_from_config

#: The reduced T5 of the comparisons; its vocabulary is the test tokenizer's 300 pieces + 100 sentinels.
TINY = dict(vocab_size=400, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4)
#: Longer than relative_attention_max_distance (128), so the far offsets' shared last bucket is used too.
LENGTH = 160

# Punctuation, digits, accents, unknown characters (emoji, CJK, upper case the corpus never has), odd whitespace,
# special tokens and sentinels written in the text, a prompt longer than the context, and an empty one.
PROMPTS = [
    "a photo of sks dog",
    "a painting of sks dog by van gogh, on the beach!",
    "2024, 12! 99? mountain-lake: sunset; forest",
    "café naïve résumé, Ærø Zürich",
    "emoji 🐶🔥 and 東京 unknowns",
    "   leading and   multiple   spaces\tand\nnewlines   ",
    "ＦＵＬＬ width and UPPER case",
    "a <extra_id_0> b and x<extra_id_5>y",
    "text </s> with eos, <pad> <unk> and <extra_id_100> (not a sentinel)",
    "sks " * 100,
    "",
]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> Path:
    return train_spiece(tmp_path_factory.mktemp("t5-tokenizer"))


@pytest.fixture(scope="module")
def hf_tokenizer(spiece):
    from transformers import T5TokenizerFast
    return T5TokenizerFast.from_pretrained(spiece.parent)


def hf_ids(hf_tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    return hf_tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")


@pytest.fixture(scope="module")
def tiny_pair():
    """Our tiny T5 with seeded random weights everywhere, and transformers' T5EncoderModel loaded strictly with
    its state dict."""
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel
    ours = randomize_(T5Encoder(T5Config(**TINY)), seed=5, std=0.3).eval()
    config = HFT5Config(**TINY, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
    theirs = T5EncoderModel(config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("max_length", [24, 77])
def test_token_ids_match_transformers(spiece, hf_tokenizer, max_length):
    ours = T5Tokenizer(spiece)(PROMPTS, max_length)
    assert torch.equal(ours, hf_ids(hf_tokenizer, max_length).input_ids)
    assert T5Tokenizer(spiece.parent).vocab_size == len(hf_tokenizer)  # a folder holding spiece.model works too
    # Not vacuous: the sentinels became their ids (400 - 1 - N), and the long prompt was cut before </s>.
    assert {399, 394} <= set(ours[7].tolist()) and ours[9, -1] == 1


@pytest.mark.parametrize("masked", [False, True])
def test_hidden_states_match_transformers(tiny_pair, hf_tokenizer, masked):
    ours, theirs = tiny_pair
    batch = hf_ids(hf_tokenizer, LENGTH)
    mask = batch.attention_mask if masked else None
    with torch.no_grad():
        expected = theirs(input_ids=batch.input_ids, attention_mask=mask).last_hidden_state
        got = ours(batch.input_ids, mask)
        unmasked = ours(batch.input_ids)
    assert got.shape == (len(PROMPTS), LENGTH, TINY["d_model"])
    assert rel_err(got, expected) <= 1e-4
    if masked:  # the mask changed the result: the comparison above saw it
        assert rel_err(unmasked, got) > 1e-2


def test_embedder_from_config_matches_transformers_without_mask(tiny_pair, spiece, hf_tokenizer):
    ours, theirs = tiny_pair
    config = {"target": "ldm.families.flux.modules.t5.FrozenT5Embedder",
              "params": {"tokenizer_path": str(spiece), "max_length": LENGTH, **TINY}}
    embedder = instantiate_from_config(config)
    embedder.load_state_dict({f"transformer.{k}": v for k, v in ours.state_dict().items()}, strict=True)
    assert not any(p.requires_grad for p in embedder.parameters()) and not embedder.transformer.training
    with torch.no_grad():
        got = embedder(PROMPTS)
        expected = theirs(input_ids=hf_ids(hf_tokenizer, LENGTH).input_ids).last_hidden_state
    assert got.shape == (len(PROMPTS), LENGTH, TINY["d_model"])
    assert rel_err(got, expected) <= 1e-4


def test_fp8_encoder_equals_transformers_on_its_dequantized_weights(tiny_pair, hf_tokenizer):
    """text_encoder_fp8: every linear weight in float8 with a per-tensor scale. The encoder then computes what
    transformers' T5EncoderModel computes with those weights (float8 times scale) loaded in float32."""
    import copy

    from ldm.modules.lowmem import quantize_fp8_
    ours, theirs = tiny_pair
    fp8 = copy.deepcopy(ours).requires_grad_(False)
    assert quantize_fp8_(fp8) == 4 * 3 + 3 * 3  # q, k, v, o and wi_0, wi_1, wo in each of the 3 blocks
    reference = copy.deepcopy(theirs)
    reference.load_state_dict(fp8.state_dict(), strict=True)  # the state dict holds the dequantized weights
    ids = hf_ids(hf_tokenizer, LENGTH).input_ids
    with torch.no_grad():
        got, expected, exact = fp8(ids), reference(input_ids=ids).last_hidden_state, ours(ids)
    assert rel_err(got, expected) <= 1e-4
    assert rel_err(got, exact) > 1e-4  # float8 rounding moved it (the random weights amplify it)


def test_xxl_layout_on_meta():
    layout = reference_layout("t5xxl-encoder-state-dict.tsv")
    with torch.device("meta"):
        model = T5Encoder(T5Config())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(layout) == 220 and shapes == {k: shape for k, (shape, _) in layout.items()}
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 4_762_310_656


@pytest.mark.parametrize("names", [("shared.weight",), ("encoder.embed_tokens.weight",),
                                   ("shared.weight", "encoder.embed_tokens.weight")])
def test_files_with_either_embedding_name_load_strictly(tiny_pair, tmp_path, names):
    ours, _ = tiny_pair
    sd = {k: v for k, v in ours.state_dict().items() if k not in ("shared.weight", "encoder.embed_tokens.weight")}
    sd.update({name: ours.shared.weight.detach().clone() for name in names})  # safetensors stores no aliases
    save_file(sd, tmp_path / "t5.safetensors")
    loaded = load_file(tmp_path / "t5.safetensors")
    fresh = T5Encoder(T5Config(**TINY))
    fresh.load_state_dict(t5_state_dict(loaded), strict=True)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in fresh.state_dict().items())
    embedder = FrozenT5Embedder(**TINY)  # the same file under a prefix, without the helper
    embedder.load_state_dict({f"transformer.{k}": v for k, v in loaded.items()}, strict=True)
    assert torch.equal(embedder.transformer.encoder.embed_tokens.weight, ours.shared.weight)


def one_line_error(exc_info, *words: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and all(word in message for word in words), message
    return message


def test_one_line_errors(spiece, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        T5Tokenizer(tmp_path / "missing" / "spiece.model")
    one_line_error(e, str(tmp_path / "missing" / "spiece.model"))
    not_a_model = tmp_path / "spiece.model"
    not_a_model.write_text("<pad>\n</s>\n")
    with pytest.raises(ValueError) as e:
        T5Tokenizer(not_a_model)
    one_line_error(e, str(not_a_model), "not a SentencePiece model")
    with pytest.raises(ValueError) as e:
        FrozenT5Embedder(tokenizer_path=spiece, **{**TINY, "vocab_size": 399})
    one_line_error(e, str(spiece), "400", "399", "another model")
    other = train_spiece(tmp_path / "other", pad_id=-1, bos_id=0)
    with pytest.raises(ValueError) as e:
        T5Tokenizer(other)
    one_line_error(e, str(other), "another model")
    with pytest.raises(ValueError) as e:
        FrozenT5Embedder(tokenizer_path=None, **TINY)(["a photo of sks dog"])
    one_line_error(e, "tokenizer_path", "spiece.model")
