"""CLIP tokenizer and text encoder checked against known ids, the SD v1 key layout, and transformers' CLIP."""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch

from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizer import CLIPTokenizer, default_bpe_path
from conftest import rel_err

BOS, EOS = 49406, 49407

# Varied prompts for the cross-check: punctuation, digits, accents (composed and decomposed), emoji,
# contractions, CJK, long words, odd whitespace, and special-token text.
PROMPTS = [
    "a photo of a sks dog",
    "A photo of sks dog, in the style of Van Gogh!!!",
    "it's a dog's life; they're here, we've gone, I'm sure, you'll see, he'd go",
    "3.14159 apples and 42nd street, 1,000,000 $ 99.9%",
    "café naïve résumé façade Ærø",
    "cafe\u0301 with a decomposed accent",
    "emoji 😀🐶🔥 and ❤️ hearts",
    "東京の夜景, 서울, Москва",
    "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "   leading and   trailing\twhitespace\n\nlines   ",
    "UPPER lower MiXeD CaSe",
    "hyphen-ated under_scored slash/path back\\slash",
    "quotes \"double\" 'single' `tick` (parens) [brackets] {braces}",
    "a <|endoftext|> inside and <|startoftext|> too",
    "trending on artstation, 8k, octane render, highly detailed, by greg rutkowski",
    "#hashtag @mention email@example.com https://example.com/a?b=c",
    "ellipsis... and -- dashes — en–dash",
    "",
    "sks " * 100,
    "Zürich ß straße İstanbul",
]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def test_known_ids(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer("a photo of a sks dog")
    expected = [BOS, 320, 1125, 539, 320, 48136, 1929, EOS] + [EOS] * (77 - 8)
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0].tolist() == expected
    assert tokenizer.encode("a photo of a sks dog") == expected[1:7]


def test_truncation_keeps_bos_and_eos(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer(["a very long prompt " * 40, "short"])
    assert ids.shape == (2, 77)
    assert ids[0, 0].item() == BOS and ids[0, -1].item() == EOS
    assert EOS not in ids[0, 1:-1].tolist()  # 75 real tokens, no padding
    assert ids[0, 1:-1].tolist() == tokenizer.encode("a very long prompt " * 40)[:75]


def test_cleaning(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.encode("A  Photo&amp;") == tokenizer.encode("a photo&")
    # CLIP unescapes twice: double-escaped captions were common in its training data.
    assert tokenizer.encode("fish &amp;amp; chips") == tokenizer.encode("fish & chips")
    assert tokenizer.encode("  Two\n\tLines  ") == tokenizer.encode("two lines")


def test_decode_round_trip(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.decode(tokenizer.encode("A Photo of sks dog!")) == "a photo of sks dog !"


def test_bpe_path_lookup_does_not_import_open_clip(tmp_path: Path) -> None:
    # Importing open_clip needs torchvision; finding its data file must not execute the package.
    assert default_bpe_path().is_file()
    assert "open_clip" not in sys.modules
    with pytest.raises(FileNotFoundError, match="open_clip_torch --no-deps"):
        CLIPTokenizer(bpe_path=tmp_path / "missing.txt.gz")


def _hf_tokenizer_files(directory: Path) -> Path:
    """Write vocab.json / merges.txt from the gz merge table the way the HF CLIP files were made."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(default_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def test_matches_transformers_tokenizer(tokenizer: CLIPTokenizer, tmp_path: Path) -> None:
    # transformers 5 only has the Rust-backed CLIPTokenizer (NFC + whitespace + lowercase, no ftfy/html);
    # the prompts avoid HTML entities and mojibake, where the two cleaners legitimately differ.
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    hf = HFCLIPTokenizer.from_pretrained(str(_hf_tokenizer_files(tmp_path)), pad_token="<|endoftext|>")
    expected = hf(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    ours = tokenizer(PROMPTS)
    for prompt, a, b in zip(PROMPTS, ours, expected):
        assert a.tolist() == b.tolist(), prompt


def test_zero_padding_matches_transformers_tokenizer(tmp_path: Path) -> None:
    # SDXL's OpenCLIP encoder pads with id 0 (open_clip.tokenize); in the CLIP vocabulary id 0 is "!".
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    # Pad token "!" set by id after loading: `from_pretrained(pad_token="!")` would register "!" as a special
    # added token and split "!!!" into three pad ids, which OpenCLIP's tokenizer does not do.
    hf = HFCLIPTokenizer.from_pretrained(str(_hf_tokenizer_files(tmp_path)))
    hf.pad_token_id = 0
    assert hf.pad_token == "!"
    expected = hf(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    ours = CLIPTokenizer(pad_token_id=0)(PROMPTS)
    assert (ours == 0).any(dim=1).sum() >= len(PROMPTS) - 1  # all but the 100-word prompt are padded
    for prompt, a, b in zip(PROMPTS, ours, expected):
        assert a.tolist() == b.tolist(), prompt


def _reference_layout() -> dict[str, tuple[list[int], str]]:
    from conftest import reference_layout
    prefix = "cond_stage_model."
    return {k[len(prefix):]: (list(shape), dtype) for k, (shape, dtype) in reference_layout().items()
            if k.startswith(prefix + "transformer.")}


def test_state_dict_layout_matches_sd_v1() -> None:
    with torch.device("meta"):
        model = FrozenCLIPEmbedder()
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    reference = _reference_layout()
    assert len(reference) == 197
    assert sorted(set(ours) ^ set(reference)) == []
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}
    assert not any(p.requires_grad for p in model.parameters()) and not model.transformer.training


def _tiny_pair(layers: int = 2, **options: object) -> tuple[torch.nn.Module, FrozenCLIPEmbedder]:
    """A seeded random transformers CLIPTextModel and our tiny embedder (built with ``options``) holding its weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
        attn_implementation="eager",  # explicit softmax with an additive causal mask, unlike our fused SDPA
    )
    torch.manual_seed(0)
    reference = CLIPTextModel(config).eval()
    with torch.no_grad():  # HF inits LayerNorms to 1/0 and biases to 0: perturb everything so all of it is tested
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = FrozenCLIPEmbedder(width=32, layers=layers, heads=2, mlp_dim=64, **options)
    # transformers 5 names keys without the `text_model.` level and does not save position_ids.
    hf_state = reference.state_dict()
    assert not any(k.startswith("text_model.") or k.endswith("position_ids") for k in hf_state)
    ours.load_state_dict({"transformer.text_model." + k: v for k, v in hf_state.items()}, strict=True)
    return reference, ours


def test_matches_transformers_text_model(tokenizer: CLIPTokenizer) -> None:
    reference, ours = _tiny_pair()
    prompts = PROMPTS[:6] + ["sks " * 100]
    ids = tokenizer(prompts)
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        got = ours(prompts)
    assert got.shape == expected.shape == (len(prompts), 77, 32)
    # All 77 positions, padding included: SD's cross-attention sees the EOS padding states too.
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < 1e-4
    assert torch.equal(ours.encode(prompts), got)


@pytest.mark.parametrize("layer_idx", [1, 2, -2])
def test_hidden_layer_matches_transformers(tokenizer: CLIPTokenizer, layer_idx: int) -> None:
    # SDXL's CLIP-L output (sgm's layer "hidden"): transformers' hidden_states[layer_idx], i.e. the state after
    # layer_idx blocks and without final_layer_norm; pooled is pooler_output (final-normed state at the EOS).
    reference, ours = _tiny_pair(layers=3, layer="hidden", layer_idx=layer_idx, always_return_pooled=True)
    prompts = PROMPTS[:4] + ["a <|endoftext|> inside", "sks " * 100]
    with torch.no_grad():
        expected = reference(input_ids=tokenizer(prompts), output_hidden_states=True)
        z, pooled = ours(prompts)
    assert z.shape == (len(prompts), 77, 32) and pooled.shape == (len(prompts), 32)
    assert rel_err(z, expected.hidden_states[layer_idx]) < 1e-4
    assert rel_err(pooled, expected.pooler_output) < 1e-4
    # The unnormed state differs from the v1 output, so a hidden-layer mix-up cannot pass.
    assert rel_err(z, expected.last_hidden_state) > 1e-2


def test_pooled_layer_and_options(tokenizer: CLIPTokenizer) -> None:
    reference, ours = _tiny_pair(layer="pooled")
    with torch.no_grad():
        expected = reference(input_ids=tokenizer(PROMPTS[:3])).pooler_output
        got = ours.encode(PROMPTS[:3])
    assert got.shape == (3, 1, 32) and rel_err(got[:, 0], expected) < 1e-4
    ours.layer = "pooler_output"  # FLUX.1's vector input: the same numbers, [B, width]
    with torch.no_grad():
        assert torch.equal(ours.encode(PROMPTS[:3]), got[:, 0])
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(width=32, layers=2, heads=2, mlp_dim=64, layer="hidden")
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(width=32, layers=2, heads=2, mlp_dim=64, layer="hidden", layer_idx=3)


def test_load_without_position_ids() -> None:
    model = FrozenCLIPEmbedder(width=32, layers=2, heads=2, mlp_dim=64)
    embeddings = model.transformer.text_model.embeddings
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    embeddings.position_ids.zero_()
    model.load_state_dict(state, strict=True)
    assert embeddings.position_ids.dtype == torch.long
    assert embeddings.position_ids.tolist() == [list(range(77))]
    # Some merged community checkpoints store the ids as inexact floats: they are reset, not truncated.
    state["transformer.text_model.embeddings.position_ids"] = torch.arange(77.0).unsqueeze(0) - 1e-3
    model.load_state_dict(state, strict=True)
    assert embeddings.position_ids.tolist() == [list(range(77))]
