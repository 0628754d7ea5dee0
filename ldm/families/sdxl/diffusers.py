"""Export a Stable Diffusion XL base checkpoint as a diffusers ``StableDiffusionXLPipeline`` folder.

The shared parts (UNet and VAE through diffusers' converters, the CLIP-L text encoder under transformers' names,
tokenizer files, the atomic folder) are ``ldm.export.diffusers``'s. SDXL adds: the UNet's ``text_time`` added
conditioning (``label_emb`` -> ``add_embedding``), a VAE config with SDXL's scaling factor and
``force_upcast`` (the released VAE overflows in float16), the OpenCLIP bigG tower as transformers'
``CLIPTextModelWithProjection`` (diffusers' own ``convert_open_clip_checkpoint``: packed q/k/v split,
``text_projection`` transposed), a second tokenizer padding with ``"!"`` (id 0, OpenCLIP's padding), SDXL's
``EulerDiscreteScheduler`` and ``force_zeros_for_empty_prompt`` (our empty negative prompt is zeros too; diffusers
gives zeros only when no negative prompt is passed at all).

As in the released SDXL folder, transformers treats the pad token ``"!"`` as special, so a ``!`` typed in a prompt
becomes id 0 in ``tokenizer_2`` where OpenCLIP's tokenizer (and ours) gives ``!</w>`` (diffusers issue #4153):
prompts with ``!`` encode slightly differently in diffusers.

diffusers' pipeline takes the penultimate hidden state of both text encoders and bigG's projected pooled output,
and embeds (original size, crop, target size) with ``addition_time_embed_dim`` channels each: ``pipeline_configs``
refuses (``UnsupportedModel``) a conditioner that differs from that, since the folder would then sample another
model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.export.diffusers import (TEXT_MODEL, UNET, VAE, UnsupportedModel, _build, _with_defaults,
                                  clip_text_config, inference_weights, save_text_model, scheduler_config,
                                  unet_config, vae_config, write_text_encoder, write_tokenizer, write_unet_vae)
from ldm.modules.encoders.conditioner import SIZE_KEYS

CONDITIONER = "conditioner."
TEXT_1 = "conditioner.embedders.0.transformer.text_model."
TEXT_2 = "conditioner.embedders.1.model."


def _embedder(section: Mapping[str, Any], index: int, target: str, **expected: Any) -> dict[str, Any]:
    """Embedder ``index``'s params (defaults filled in), checked for the class and settings diffusers assumes."""
    if not section["target"].endswith(target):
        raise UnsupportedModel(f"conditioner embedder {index} is {section['target']}; diffusers' SDXL pipeline "
                               f"needs {target} there")
    params = _with_defaults(section)
    for key, value in expected.items():
        if params[key] != value:
            raise UnsupportedModel(f"conditioner embedder {index} ({target}): {key} {params[key]!r}; diffusers' "
                                   f"SDXL pipeline reproduces only {value!r}")
    return params


def pipeline_configs(params: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers/transformers configs of an SDXL model config (the second text encoder's comes from the
    loaded model, in ``write_pipeline``); ``UnsupportedModel`` for a conditioner diffusers' pipeline does not
    reproduce."""
    embedders = params["conditioner_config"]["params"]["emb_models"]
    if len(embedders) != 2 + len(SIZE_KEYS):
        raise UnsupportedModel(f"the conditioner has {len(embedders)} embedders; diffusers' SDXL pipeline needs "
                               f"two text encoders and the {len(SIZE_KEYS)} size/crop embedders")
    clip = _embedder(embedders[0], 0, "FrozenCLIPEmbedder", layer="hidden", always_return_pooled=False)
    if clip["layer_idx"] % (clip["layers"] + 1) != clip["layers"] - 1:
        raise UnsupportedModel(f"conditioner embedder 0: layer_idx {clip['layer_idx']}; diffusers' SDXL pipeline "
                               f"takes the penultimate hidden state ({clip['layers'] - 1} of {clip['layers']})")
    bigg = _embedder(embedders[1], 1, "FrozenOpenCLIPEmbedder2", layer="penultimate", legacy=False,
                     always_return_pooled=True)
    sizes = [_embedder(e, i + 2, "ConcatTimestepEmbedderND") for i, e in enumerate(embedders[2:])]
    keys = [e.get("input_key") for e in embedders[2:]]
    if keys != list(SIZE_KEYS) or len({s["outdim"] for s in sizes}) != 1:
        raise UnsupportedModel(f"size embedders read {keys} with widths {[s['outdim'] for s in sizes]}; "
                               f"diffusers' SDXL pipeline embeds {list(SIZE_KEYS)}, in that order, at one width")
    unet = _with_defaults(params["unet_config"])
    return {
        "unet": {**unet_config(params), "use_linear_projection": bool(unet["use_linear_in_transformer"]),
                 "addition_embed_type": "text_time", "addition_time_embed_dim": sizes[0]["outdim"],
                 "projection_class_embeddings_input_dim": unet["adm_in_channels"]},
        "vae": {**vae_config(params), "force_upcast": True},
        "text": clip_text_config(embedders[0]),
        "scheduler": sdxl_scheduler_config(params),
        "clip": clip, "open_clip": bigg,
    }


def sdxl_scheduler_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """SDXL base's ``EulerDiscreteScheduler`` config (its release's ``scheduler_config.json``): the v1 schedule,
    "leading" spacing with offset 1; the DDIM/PNDM keys stay for ``DDIMScheduler.from_config``."""
    return {**scheduler_config(params), "interpolation_type": "linear", "use_karras_sigmas": False,
            "sample_max_value": 1.0}


def open_clip_text_config(tower: torch.nn.Module) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs of our ``OpenCLIPTextModel`` (exact GELU; real bos/eos ids, so transformers
    pools at the end-of-text token as OpenCLIP's argmax does; padding id 0)."""
    block = tower.transformer.resblocks[0]
    return dict(
        vocab_size=tower.token_embedding.num_embeddings, hidden_size=tower.token_embedding.embedding_dim,
        intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=len(tower.transformer.resblocks),
        num_attention_heads=block.attn.heads, max_position_embeddings=tower.positional_embedding.shape[0],
        hidden_act="gelu", layer_norm_eps=tower.ln_final.eps, projection_dim=tower.text_projection.shape[1],
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0)


def write_open_clip_text_encoder(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], folder: Path,
                                 dtype: torch.dtype, safetensors: bool) -> None:
    """``text_encoder_2/``: the bigG tower converted by diffusers' ``convert_open_clip_checkpoint``."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    hf_config = CLIPTextConfig(**config)
    with torch.device("meta"):
        shell = CLIPTextModelWithProjection(hf_config)
    expected = shell.state_dict().keys()
    converted = convert_open_clip_checkpoint(shell, weights, prefix=TEXT_2)
    if not any(k.startswith("text_model.") for k in expected):  # a transformers release without that level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if k in expected or not k.endswith("position_ids")}
    save_text_model(_build(CLIPTextModelWithProjection, converted, dtype, config=hf_config), folder, dtype,
                    safetensors)


def sdxl_model_index() -> dict[str, Any]:
    import diffusers
    return {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None], "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def write_pipeline(folder: Path, configs: Mapping[str, Any], model: torch.nn.Module, dtype: torch.dtype,
               safetensors: bool, prefer_ema: bool) -> None:
    """The components of a ``StableDiffusionXLPipeline`` folder."""
    from diffusers import EulerDiscreteScheduler
    weights = inference_weights(model, prefer_ema, prefixes=(UNET, VAE, CONDITIONER))
    write_unet_vae(folder, weights, configs, dtype, safetensors)
    # The CLIP-L tower has SD v1's text encoder's names under another prefix: the v1 writer takes it as it is.
    clip_l = {TEXT_MODEL + k[len(TEXT_1):]: v for k, v in weights.items() if k.startswith(TEXT_1)}
    write_text_encoder(clip_l, configs["text"], folder / "text_encoder", dtype, safetensors)
    write_open_clip_text_encoder(weights, open_clip_text_config(model.conditioner.embedders[1].model),
                                 folder / "text_encoder_2", dtype, safetensors)
    write_tokenizer(folder / "tokenizer", configs["clip"]["bpe_path"], configs["clip"]["max_length"])
    write_tokenizer(folder / "tokenizer_2", configs["open_clip"]["bpe_path"], configs["open_clip"]["max_length"],
                    pad_token="!")
    EulerDiscreteScheduler.from_config(configs["scheduler"]).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(sdxl_model_index(), indent=2) + "\n")
