"""The FLUX.1 transformer against independent references: diffusers' ``FluxTransformer2DModel`` loaded through
diffusers' own single-file converter (at reduced width, full depth), diffusers' pipeline packing helpers, and the
released checkpoints' key/shape layouts in ../shared/reference."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from conftest import reference_layout, rel_err
from ldm.families.flux.modules.transformer import (Flux, FluxParams, image_ids, pack, text_ids,
                                                   timestep_embedding, unpack)

# Reduced width, the released depth: 19 double + 38 single blocks, head dim 32 = 8 + 12 + 12 rotary channels.
TINY = FluxParams(in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=32, hidden_size=64, mlp_ratio=4.0,
                  num_heads=2, depth=19, depth_single_blocks=38, axes_dim=[8, 12, 12], theta=10_000, qkv_bias=True)


def seeded_flux(guidance_embed: bool, seed: int = 0) -> Flux:
    """A tiny ``Flux`` with seeded random values in every parameter: RMSNorm scales around 1 but not 1, biases
    non-zero, weights at 1/sqrt(fan_in) so 57 residual blocks stay finite."""
    torch.manual_seed(seed)
    flux = Flux(replace(TINY, guidance_embed=guidance_embed)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in flux.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(".scale"):
                p.copy_(1.0 + 0.3 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return flux


class _TorchAtWidth:
    """``torch`` as diffusers' FLUX converter sees it. The converter splits ``linear1`` with FLUX.1's width
    hard-coded (3072 x 3 + 12288); this ``split`` keeps the converter's proportions at the tensor's own width,
    so the rest of the conversion stays diffusers' own."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def split(tensor: torch.Tensor, sizes, dim: int = 0):
        total = tensor.shape[dim]
        return torch.split(tensor, [s * total // sum(sizes) for s in sizes], dim=dim)


def diffusers_flux(flux: Flux, monkeypatch: pytest.MonkeyPatch):
    """``flux``'s weights, under the ComfyUI prefix, converted by diffusers' single-file converter and loaded
    strictly into diffusers' ``FluxTransformer2DModel`` of the same sizes."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_utils
    p = flux.params
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.hidden_size // p.num_heads, num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
        guidance_embeds=p.guidance_embed, axes_dims_rope=tuple(p.axes_dim)).eval()
    sd = {f"model.diffusion_model.{k}": v.clone() for k, v in flux.state_dict().items()}
    monkeypatch.setattr(single_file_utils, "torch", _TorchAtWidth())
    converted = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(sd)
    model.load_state_dict(converted, strict=True)
    return model


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev", "schnell"])
def test_velocity_matches_diffusers(guidance_embed, monkeypatch):
    """Our latent-level velocity == diffusers' transformer fed the way ``FluxPipeline`` feeds it (its packing,
    its ids without a batch dim, t in [0, 1] and the raw guidance scale: it multiplies both by 1000 itself)."""
    from diffusers import FluxPipeline
    flux = seeded_flux(guidance_embed)
    reference = diffusers_flux(flux, monkeypatch)
    b, h, w, length = 2, 8, 12, 7  # non-square, so rows and columns cannot be swapped unnoticed
    g = torch.Generator().manual_seed(5)
    x = torch.randn(b, 16, h, w, generator=g)
    t = torch.tensor([0.25, 0.9])
    context = torch.randn(b, length, TINY.context_in_dim, generator=g)
    y = torch.randn(b, TINY.vec_in_dim, generator=g)
    guidance = torch.tensor([3.5, 1.5]) if guidance_embed else None

    with torch.no_grad():
        ours = flux.velocity(x, t, context, y, guidance)
        theirs = reference(
            hidden_states=FluxPipeline._pack_latents(x, b, 16, h, w), encoder_hidden_states=context,
            pooled_projections=y, timestep=t, guidance=guidance,
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype),
            txt_ids=torch.zeros(length, 3), return_dict=False)[0]
    theirs = FluxPipeline._unpack_latents(theirs, h * 8, w * 8, vae_scale_factor=8)
    assert ours.shape == x.shape
    assert theirs.abs().max() > 1e-2  # a real signal, not a zeroed output
    assert rel_err(ours, theirs) <= 1e-4


def test_dev_requires_guidance():
    flux = seeded_flux(guidance_embed=True)
    x, context, y = torch.randn(1, 16, 4, 4), torch.randn(1, 3, 32), torch.randn(1, 16)
    with pytest.raises(ValueError, match="guidance"):
        flux.velocity(x, torch.tensor([0.5]), context, y)


def test_guidance_and_time_change_the_output():
    """The conditioning reaches the output: a different guidance scale or time gives a different velocity."""
    flux = seeded_flux(guidance_embed=True)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 3, 32, generator=g)
    y = torch.randn(1, 16, generator=g)
    with torch.no_grad():
        base = flux.velocity(x, torch.tensor([0.5]), context, y, 3.5)
        assert rel_err(flux.velocity(x, torch.tensor([0.5]), context, y, 1.0), base) > 1e-3
        assert rel_err(flux.velocity(x, torch.tensor([0.2]), context, y, 3.5), base) > 1e-3


def test_timestep_embedding_closed_form():
    """t scaled by 1000; cosines of t*1000*10000^(-i/half) first, then sines."""
    t = torch.tensor([0.0, 0.3])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10_000 ** (-i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(300 * freqs), torch.sin(300 * freqs)])
    assert torch.allclose(emb[0], torch.cat([torch.ones(4), torch.zeros(4)]))
    assert torch.allclose(emb[1], expected, atol=1e-5)


def test_pack_unpack_and_ids_match_the_pipeline():
    from diffusers import FluxPipeline
    b, c, h, w = 2, 16, 6, 10
    x = torch.randn(b, c, h, w)
    packed = pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, b, c, h, w))
    assert torch.equal(unpack(packed, h, w), x)
    assert torch.equal(unpack(packed, h, w), FluxPipeline._unpack_latents(packed, h * 8, w * 8, vae_scale_factor=8))
    ids = image_ids(b, h, w, x.device)
    expected = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, torch.float32)
    assert ids.shape == (b, h // 2 * w // 2, 3)
    assert all(torch.equal(ids[i], expected) for i in range(b))
    assert torch.equal(text_ids(b, 5, x.device), torch.zeros(b, 5, 3))
    with pytest.raises(ValueError, match="even"):
        pack(torch.randn(1, 16, 5, 4))


@pytest.mark.parametrize("variant, tensors, parameters", [
    ("dev", 780, 11_901_408_320), ("schnell", 776, 11_891_178_560)])
def test_full_size_layout_matches_the_release(variant, tensors, parameters):
    """FLUX.1 [dev] / [schnell] built on the meta device have the released checkpoints' keys and shapes."""
    with torch.device("meta"):
        flux = Flux(getattr(FluxParams, variant)())
    ours = {k: tuple(v.shape) for k, v in flux.state_dict().items()}
    released = {k: shape for k, (shape, _) in reference_layout(f"flux1-{variant}-state-dict.tsv").items()}
    assert sorted(set(ours) ^ set(released)) == []
    assert {k for k in ours if ours[k] != released[k]} == set()
    assert len(ours) == len(released) == tensors
    assert sum(p.numel() for p in flux.parameters()) == parameters
