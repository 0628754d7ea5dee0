"""Export a Stable Diffusion v1 checkpoint as a diffusers ``StableDiffusionPipeline`` folder (its inpainting variant
for a 9-channel UNet): the UNet and VAE through diffusers' own converters, the CLIP text encoder under transformers'
names, the tokenizer files from our BPE table, a ``PNDMScheduler`` with the training schedule. The shared parts are
``ldm.export.diffusers``'s; ``export_diffusers`` there calls ``pipeline_configs`` and ``write_pipeline`` here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.export.diffusers import (_with_defaults, inference_weights, scheduler_config, text_encoder_config,
                                  unet_config, vae_config, write_text_encoder, write_tokenizer, write_unet_vae)


def pipeline_configs(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"unet": unet_config(params), "vae": vae_config(params), "text": text_encoder_config(params),
            "scheduler": scheduler_config(params), "clip": _with_defaults(params["cond_stage_config"])}


def model_index(inpainting: bool = False) -> dict[str, Any]:
    """``model_index.json``: a ``StableDiffusionPipeline``, or its inpainting variant for a 9-channel UNet (so
    ``DiffusionPipeline.from_pretrained`` builds the right pipeline)."""
    import diffusers
    return {
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None], "safety_checker": [None, None],
        "requires_safety_checker": False, "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def write_pipeline(folder: Path, configs: Mapping[str, Any], model: torch.nn.Module, dtype: torch.dtype,
                safetensors: bool, prefer_ema: bool) -> None:
    """The components of a ``StableDiffusionPipeline`` folder."""
    from diffusers import PNDMScheduler
    weights = inference_weights(model, prefer_ema)
    write_unet_vae(folder, weights, configs, dtype, safetensors)
    write_text_encoder(weights, configs["text"], folder / "text_encoder", dtype, safetensors)
    write_tokenizer(folder / "tokenizer", configs["clip"]["bpe_path"], configs["clip"]["max_length"])
    PNDMScheduler.from_config(configs["scheduler"]).save_pretrained(folder / "scheduler")
    inpainting = configs["unet"]["in_channels"] == 9
    (folder / "model_index.json").write_text(json.dumps(model_index(inpainting), indent=2) + "\n")
