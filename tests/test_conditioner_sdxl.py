"""SDXL's conditioner checked against transformers' CLIP (OpenCLIP bigG tower), diffusers' timestep embedding and
the released SDXL base key layout."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import randomize_, reference_layout, rel_err
from ldm.modules.encoders.conditioner import ConcatTimestepEmbedderND, GeneralConditioner, sdxl_batch
from ldm.modules.encoders.open_clip import FrozenOpenCLIPEmbedder2
from ldm.modules.encoders.tokenizer import CLIPTokenizer
from ldm.util import instantiate_from_config

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
PREFIX = "conditioner.embedders.1.model."

# sd_xl_base.yaml's conditioner_config with our targets (the full size).
SDXL_BASE = """
target: ldm.modules.encoders.conditioner.GeneralConditioner
params:
  emb_models:
    - {is_trainable: False, input_key: txt, target: ldm.modules.encoders.modules.FrozenCLIPEmbedder,
       params: {layer: hidden, layer_idx: 11}}
    - {is_trainable: False, input_key: txt, target: ldm.modules.encoders.open_clip.FrozenOpenCLIPEmbedder2,
       params: {arch: ViT-bigG-14, version: laion2b_s39b_b160k, freeze: True, layer: penultimate,
                always_return_pooled: True, legacy: False}}
    - {is_trainable: False, input_key: original_size_as_tuple,
       target: ldm.modules.encoders.conditioner.ConcatTimestepEmbedderND, params: {outdim: 256}}
    - {is_trainable: False, input_key: crop_coords_top_left,
       target: ldm.modules.encoders.conditioner.ConcatTimestepEmbedderND, params: {outdim: 256}}
    - {is_trainable: False, input_key: target_size_as_tuple,
       target: ldm.modules.encoders.conditioner.ConcatTimestepEmbedderND, params: {outdim: 256}}
"""


def tiny_config(ucg_rate: float = 0.0) -> list[dict]:
    """SDXL's five embedders at toy size: CLIP-L-like width 32 (3 blocks, hidden 2), bigG-like width 48, outdim 8."""
    clip = dict(width=32, layers=3, heads=2, mlp_dim=64, layer="hidden", layer_idx=2)
    bigg = dict(width=48, layers=3, heads=4, layer="penultimate", always_return_pooled=True, legacy=False)
    size = [dict(target="ldm.modules.encoders.conditioner.ConcatTimestepEmbedderND", input_key=key,
                 params=dict(outdim=8)) for key in SIZE_KEYS]
    return [dict(target="ldm.modules.encoders.modules.FrozenCLIPEmbedder", input_key="txt", params=clip,
                 ucg_rate=ucg_rate),
            dict(target="ldm.modules.encoders.open_clip.FrozenOpenCLIPEmbedder2", input_key="txt", params=bigg,
                 ucg_rate=ucg_rate), *size]


@pytest.fixture(scope="module")
def tiny() -> GeneralConditioner:
    torch.manual_seed(0)
    conditioner = GeneralConditioner(tiny_config())
    for i in (0, 1):
        randomize_(conditioner.embedders[i], seed=i)
    return conditioner


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


@pytest.mark.parametrize("numbers", [[[1024, 768], [0, 64]], [[512.0, 0.0, 1024.0]], [[7], [1344]]])
def test_size_embedding_matches_diffusers(numbers: list) -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    x = torch.tensor(numbers)
    got = ConcatTimestepEmbedderND(outdim=256)(x)
    assert got.shape == (x.shape[0], x.shape[1] * 256)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            expected = get_timestep_embedding(x[b, i : i + 1], 256, flip_sin_to_cos=True, downscale_freq_shift=0)
            assert torch.allclose(got[b, i * 256 : (i + 1) * 256], expected[0], atol=1e-6)
    assert torch.equal(ConcatTimestepEmbedderND(256)(x[:, 0]), got[:, :256])  # 1-D input is one number per row


def test_full_size_layout_matches_sdxl_base() -> None:
    with torch.device("meta"):
        conditioner = instantiate_from_config(OmegaConf.create(SDXL_BASE))
    ours = {"conditioner." + k: v for k, v in conditioner.state_dict().items()}
    reference = {k: v for k, v in reference_layout("sdxl-base-state-dict.tsv").items() if k.startswith("conditioner.")}
    assert len(reference) == 587
    assert sorted(set(ours) ^ set(reference)) == []
    assert {k: tuple(v.shape) for k, v in ours.items() if tuple(v.shape) != reference[k][0]} == {}
    position_ids = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
    assert ours[position_ids].dtype == torch.int64  # float16 in the released file: converted on load
    assert {v.dtype for k, v in ours.items() if k != position_ids} == {torch.float32}
    assert not any(p.requires_grad for p in conditioner.parameters())
    assert [e.input_key for e in conditioner.embedders] == ["txt", "txt", *SIZE_KEYS]


def _size_embeddings(batch: dict, outdim: int = 8) -> torch.Tensor:
    from diffusers.models.embeddings import get_timestep_embedding

    numbers = torch.cat([batch[k] for k in SIZE_KEYS], dim=1)  # [B, 6] in embedder order
    per_number = get_timestep_embedding(numbers.flatten(), outdim, flip_sin_to_cos=True, downscale_freq_shift=0)
    return per_number.reshape(numbers.shape[0], -1)


def test_output_layout(tiny: GeneralConditioner) -> None:
    prompts = ["a photo of a sks dog", "a cat"]
    batch = sdxl_batch(prompts, original_size=[(1024, 768), (512, 512)], crop_coords_top_left=(32, 0),
                       target_size=(1024, 1024))
    out = tiny(batch)
    assert set(out) == {"crossattn", "vector"}
    assert out["crossattn"].shape == (2, 77, 32 + 48) and out["vector"].shape == (2, 48 + 6 * 8)
    with torch.no_grad():
        clip, (bigg, pooled) = tiny.embedders[0](prompts), tiny.embedders[1](prompts)
    assert torch.equal(out["crossattn"], torch.cat([clip, bigg], dim=2))
    assert torch.equal(out["vector"][:, :48], pooled)
    assert torch.allclose(out["vector"][:, 48:], _size_embeddings(batch), atol=1e-6)
    assert batch["crop_coords_top_left"].tolist() == [[32, 0], [32, 0]]


def test_force_zero_embeddings(tiny: GeneralConditioner) -> None:
    batch = sdxl_batch(["a photo of a sks dog", ""], original_size=(768, 1024))
    c, uc = tiny.get_unconditional_conditioning(batch, force_uc_zero_embeddings=["txt"])
    assert c["crossattn"].abs().amin(dim=(1, 2)).gt(0).all() and c["vector"][:, :48].abs().amax(dim=1).gt(0).all()
    assert uc["crossattn"].shape == c["crossattn"].shape and not uc["crossattn"].any()
    assert not uc["vector"][:, :48].any()
    # The micro-conditioning stays: SDXL's unconditional input keeps the real sizes.
    assert torch.allclose(uc["vector"][:, 48:], _size_embeddings(batch), atol=1e-6)
    assert torch.equal(uc["vector"][:, 48:], c["vector"][:, 48:])
    zeroed = tiny(batch, force_zero_embeddings=["crop_coords_top_left"])
    assert not zeroed["vector"][:, 48 + 16 : 48 + 32].any() and zeroed["vector"][:, 48:48 + 16].any()


def test_ucg_dropout_zeroes_whole_captions() -> None:
    torch.manual_seed(0)
    conditioner = GeneralConditioner(tiny_config(ucg_rate=0.5))
    batch = sdxl_batch(["a photo of a sks dog"] * 64, original_size=(512, 768))
    conditioner.eval()
    assert tiny_dropped(conditioner(batch)).sum() == 0  # no dropout outside training
    conditioner.train()
    assert not conditioner.embedders[0].training  # frozen embedders stay in eval mode
    out = conditioner(batch)
    dropped = tiny_dropped(out)
    assert 16 <= dropped.sum() <= 48
    # A dropped caption is dropped everywhere: both encoders' tokens and the pooled vector; sizes are kept.
    assert torch.equal(~out["crossattn"][..., :32].flatten(1).any(dim=1), dropped)
    assert torch.equal(~out["crossattn"][..., 32:].flatten(1).any(dim=1), dropped)
    assert torch.allclose(out["vector"][:, 48:], _size_embeddings(batch), atol=1e-6)
    c, uc = conditioner.get_unconditional_conditioning(batch, force_uc_zero_embeddings=["txt"])
    assert tiny_dropped(c).sum() == 0 and tiny_dropped(uc).all() and conditioner.training
    conditioner.embedders[0].ucg_rate = conditioner.embedders[1].ucg_rate = 1.0
    assert tiny_dropped(conditioner(batch)).all()


def tiny_dropped(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rows whose pooled text vector is all zeros."""
    return ~out["vector"][:, :48].any(dim=1)


def test_trainable_embedder_keeps_gradients() -> None:
    config = tiny_config()
    config[1]["is_trainable"] = True
    config[1]["params"] = dict(config[1]["params"], freeze=False)
    conditioner = GeneralConditioner(config)
    out = conditioner(sdxl_batch(["a dog"]))
    assert out["crossattn"].requires_grad and out["vector"].requires_grad
    (out["crossattn"].sum() + out["vector"].sum()).backward()
    tower = conditioner.embedders[1].model
    assert tower.token_embedding.weight.grad.abs().sum() > 0 and tower.text_projection.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in conditioner.embedders[0].parameters())
    with pytest.raises(KeyError, match="input_key"):
        GeneralConditioner([dict(target="ldm.modules.encoders.conditioner.ConcatTimestepEmbedderND",
                                 params=dict(outdim=8))])
