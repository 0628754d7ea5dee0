"""The SDXL options of the denoiser UNet: checkpoint layout, fidelity to diffusers, the vector condition y."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from conftest import randomize_, reference_layout, rel_err
from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel
from ldm.util import instantiate_from_config

PREFIX = "model.diffusion_model."

# sgm's configs/inference/sd_xl_base.yaml, network_config.params, in this codebase's signature: sgm's
# `spatial_transformer_attn_type` is dropped (attention is always SDPA); image_size (unused) and
# use_spatial_transformer are this constructor's; legacy False is sgm's head arithmetic.
SDXL = dict(
    image_size=128, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2],
    num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
    use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048, num_classes="sequential",
    adm_in_channels=2816, use_checkpoint=True, legacy=False,
)
# The same shape in miniature. Widths differ on purpose (context 80, pooled 24, y 24 + 6 * 8 = 72) so a swapped
# input cannot pass; depths 2 and 3 at the attention levels (and 3 in the middle block) so a depth ignored
# anywhere changes the layout.
POOLED, TIME_ID_DIM = 24, 8
TINY_XL = dict(
    SDXL, image_size=16, model_channels=32, num_head_channels=8, transformer_depth=[1, 2, 3], context_dim=80,
    adm_in_channels=POOLED + 6 * TIME_ID_DIM, use_checkpoint=False,
)


def tiny_unet(seed: int = 0, **override: Any) -> UNetModel:
    torch.manual_seed(seed)
    return randomize_(UNetModel(**{**TINY_XL, **override}), seed=seed).eval()


def sdxl_inputs(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # (original h, w, crop top, left, target h, w): the six numbers SDXL's size and crop conditioning embeds.
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 32.0, 16.0, 832.0, 1216.0]])
    return dict(
        x=torch.randn(batch, 4, 16, 16, generator=g),
        t=torch.tensor([17, 803])[:batch],
        context=torch.randn(batch, 7, TINY_XL["context_dim"], generator=g),
        pooled=torch.randn(batch, POOLED, generator=g),
        time_ids=time_ids[:batch],
    )


def vector_condition(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's y: pooled text embedding ++ a cos-first sinusoidal embedding of each time id (sgm's
    ConcatTimestepEmbedderND), computed with diffusers' embedding function as an independent reference."""
    from diffusers.models.embeddings import get_timestep_embedding
    emb = get_timestep_embedding(time_ids.flatten(), TIME_ID_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
    return torch.cat([pooled, emb.reshape(len(time_ids), -1)], dim=1)


def diffusers_sdxl_unet(unet: UNetModel):
    """diffusers' UNet2DConditionModel in the SDXL configuration, holding ``unet``'s weights as converted by
    diffusers' own single-file converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    widths = [TINY_XL["model_channels"] * m for m in TINY_XL["channel_mult"]]
    config = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=tuple(widths),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=tuple(TINY_XL["transformer_depth"]),
        # diffusers' SD/SDXL naming: "attention_head_dim" holds the head count per level.
        attention_head_dim=tuple(w // TINY_XL["num_head_channels"] for w in widths),
        cross_attention_dim=TINY_XL["context_dim"], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_DIM,
        projection_class_embeddings_input_dim=TINY_XL["adm_in_channels"],
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    )
    reference = UNet2DConditionModel(**config).eval()
    converted = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in unet.state_dict().items()}, config)
    reference.load_state_dict(converted, strict=True)
    return reference


def test_sdxl_layout_matches_reference_checkpoint() -> None:
    # Built the way a YAML config builds it (lists arrive as OmegaConf ListConfig).
    config = OmegaConf.create({"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": SDXL})
    with torch.device("meta"):
        unet = instantiate_from_config(config)
    ours = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    reference = {k[len(PREFIX):]: shape for k, (shape, _) in reference_layout("sdxl-base-state-dict.tsv").items()
                 if k.startswith(PREFIX)}
    assert len(reference) == 1680
    assert sorted(set(reference) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(reference)) == [], "unexpected keys"
    assert {k: s for k, s in ours.items() if s != reference[k]} == {}, "shape mismatch"
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


def test_matches_diffusers_sdxl_unet() -> None:
    unet = tiny_unet()
    reference = diffusers_sdxl_unet(unet)
    inp = sdxl_inputs()
    y = vector_condition(inp["pooled"], inp["time_ids"])
    with torch.no_grad():
        ours = unet(inp["x"], inp["t"], inp["context"], y)
        theirs = reference(inp["x"], inp["t"], encoder_hidden_states=inp["context"],
                           added_cond_kwargs={"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}).sample
        # The vector condition must matter: the same call with other sizes gives a clearly different answer.
        other = unet(inp["x"], inp["t"], inp["context"], vector_condition(inp["pooled"], inp["time_ids"].flip(0)))
    assert theirs.abs().max() > 0.1
    assert rel_err(ours, theirs) < 1e-4
    assert rel_err(other, theirs) > 1e-2


def test_transformer_depth_middle_overrides_last_level() -> None:
    with torch.device("meta"):
        default, override = UNetModel(**SDXL), UNetModel(**SDXL, transformer_depth_middle=1)
    assert len(default.middle_block[1].transformer_blocks) == 10
    assert len(override.middle_block[1].transformer_blocks) == 1
    assert [len(b[1].transformer_blocks) for b in default.input_blocks if len(b) > 1] == [2, 2, 10, 10]


def test_gradient_checkpointing_keeps_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    unet = tiny_unet().train()
    inp = sdxl_inputs(batch=1)
    y = vector_condition(inp["pooled"], inp["time_ids"])
    blocks = [m for m in unet.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))

    def grads(flag: bool) -> dict[str, torch.Tensor]:
        unet.set_gradient_checkpointing(flag)
        unet.zero_grad(set_to_none=True)
        unet(inp["x"], inp["t"], inp["context"], y).square().mean().backward()
        return {name: p.grad.clone() for name, p in unet.named_parameters()}

    plain = grads(False)
    assert calls == []
    checkpointed = grads(True)
    # ResBlocks: 2 per encoder level, 2 in the middle, 3 per decoder level. Transformer blocks at the two lower
    # levels (depths 2 and 3): 2 + 3 transformers per level, and the middle one of depth 3.
    assert len(calls) == len(blocks) == (3 * 2 + 2 + 3 * 3) + (5 * 2 + 5 * 3 + 3)
    assert plain["label_emb.0.0.weight"].abs().max() > 0
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_vector_condition_errors_are_one_line() -> None:
    unet = tiny_unet()
    inp = sdxl_inputs(batch=1)
    args = (inp["x"], inp["t"], inp["context"])
    with pytest.raises(ValueError, match=r"needs the vector condition y of shape \[1, 72\]; got y=None") as missing:
        unet(*args)
    with pytest.raises(ValueError, match=r"y must have shape \[1, 72\].*got \[1, 71\]") as wrong:
        unet(*args, y=torch.zeros(1, 71))
    plain = UNetModel(**{**TINY_XL, "num_classes": None, "adm_in_channels": None})
    with pytest.raises(ValueError, match="vector condition y was given but this UNet has none") as refused:
        plain(*args, y=torch.zeros(1, 72))
    for error in (missing, wrong, refused):
        assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "override, error",
    [({"adm_in_channels": None}, ValueError), ({"num_classes": None}, ValueError),
     ({"transformer_depth": [1, 2]}, ValueError), ({"num_classes": 10, "adm_in_channels": None}, NotImplementedError)],
)
def test_inconsistent_options_raise(override: dict, error: type) -> None:
    with torch.device("meta"), pytest.raises(error):
        UNetModel(**{**TINY_XL, **override})


def test_runs_in_parameter_dtype() -> None:
    """A bfloat16 UNet takes float32 latents, context and y, and answers in float32."""
    unet = tiny_unet(channel_mult=[1, 2], transformer_depth=[1, 1]).to(torch.bfloat16)
    inp = sdxl_inputs(batch=1)
    with torch.no_grad():
        out = unet(inp["x"], inp["t"], inp["context"], vector_condition(inp["pooled"], inp["time_ids"]))
    assert out.dtype == torch.float32 and out.shape == inp["x"].shape and out.isfinite().all()
