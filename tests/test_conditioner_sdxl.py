"""SDXL's OpenCLIP bigG text tower checked against transformers' CLIP."""
from __future__ import annotations

import pytest
import torch

from conftest import randomize_, rel_err
from ldm.modules.encoders.open_clip import FrozenOpenCLIPEmbedder2
from ldm.modules.encoders.tokenizer import CLIPTokenizer

PREFIX = "conditioner.embedders.1.model."


def _diffusers_open_clip(embedder: FrozenOpenCLIPEmbedder2, width: int, layers: int, heads: int, mlp_dim: int):
    """transformers' CLIPTextModelWithProjection with exact GELU, holding ``embedder``'s weights as converted by
    diffusers' own OpenCLIP converter (it reads the projection size from the checkpoint, so it works at toy size)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=mlp_dim, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
        projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
        attn_implementation="eager",  # explicit softmax with an additive causal mask, unlike our fused SDPA
    )
    reference = CLIPTextModelWithProjection(config).eval()
    checkpoint = {PREFIX + k: v for k, v in embedder.model.state_dict().items()}
    converted = convert_open_clip_checkpoint(reference, checkpoint, prefix=PREFIX)
    reference.load_state_dict(converted, strict=True)
    return reference


def test_open_clip_tower_matches_transformers() -> None:
    width, layers, heads, mlp_dim = 32, 3, 4, 80
    ours = FrozenOpenCLIPEmbedder2(width=width, layers=layers, heads=heads, mlp_dim=mlp_dim, layer="penultimate",
                                   always_return_pooled=True, legacy=False)
    randomize_(ours, seed=5, std=0.1)
    reference = _diffusers_open_clip(ours, width, layers, heads, mlp_dim)
    prompts = ["a photo of a sks dog", "A photo of sks dog, in the style of Van Gogh!!!", "", "東京の夜景",
               "a <|endoftext|> inside", "sks " * 100]
    ids = CLIPTokenizer(pad_token_id=0)(prompts)
    with torch.no_grad():
        expected = reference(input_ids=ids, output_hidden_states=True)
        z, pooled = ours.encode(prompts)
    assert z.shape == (len(prompts), 77, width) and pooled.shape == (len(prompts), width)
    # float32 agreement is ~3e-7; 1e-5 also tells exact GELU from its tanh approximation (~1.5e-4 here).
    assert rel_err(z, expected.hidden_states[-2]) < 1e-5
    assert rel_err(pooled, expected.text_embeds) < 1e-5
    # The legacy (SD 2.x) output is ln_final of the chosen layer: transformers' final_layer_norm of the same state.
    ours.legacy, ours.return_pooled = True, False
    with torch.no_grad():
        legacy = ours(prompts)
        expected_legacy = reference.text_model.final_layer_norm(expected.hidden_states[-2])
    assert rel_err(legacy, expected_legacy) < 1e-4


def test_open_clip_gradient_checkpointing_gives_same_gradients() -> None:
    ours = FrozenOpenCLIPEmbedder2(width=32, layers=2, heads=4, freeze=False, layer="penultimate",
                                   always_return_pooled=True, legacy=False)
    grads = []
    for enable in (False, True):
        ours.zero_grad()
        ours.set_grad_checkpointing(enable)
        z, pooled = ours(["a photo of a dog", "sks"])
        (z.square().mean() + pooled.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-7)
