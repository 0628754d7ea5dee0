"""Stable Diffusion XL 1.0 base: sgm's conditioner at ``conditioner.embedders`` (CLIP ViT-L's hidden state 11, the
OpenCLIP ViT-bigG/14 text tower with its pooled projection, and the size/crop embedders), a UNet with the 2816-wide
vector condition (``label_emb``), the SD VAE with ``scale_factor`` 0.13025, and no schedule buffers in the file
(the released ``sd_xl_base_1.0.safetensors`` layout, ``ldm/reference``).

Its parts: the configs ``configs/stable-diffusion/sdxl-*.yaml`` (and ``tiny-sdxl-*`` for tests); the conditioner
and the bigG text tower in ``ldm/modules/encoders`` (``conditioner.py``, ``open_clip.py``), shared with any
family that conditions the sgm way; the diffusers export ``diffusers.py``; LoRA files under sd-scripts' SDXL names
(the UNet by the original block names, ``lora_te1_`` / ``lora_te2_`` for the two text encoders).
"""
from __future__ import annotations

from ldm.families.base import UNET, Family, unet_in_channels

CONDITIONER = "conditioner."


def _keys(shapes) -> bool:
    return any(k.startswith("conditioner.embedders.") for k in shapes) and \
        "model.diffusion_model.label_emb.0.0.weight" in shapes and unet_in_channels(shapes) == 4


def _config(params) -> bool:
    unet = params["unet_config"]
    return "conditioner_config" in params and str(unet["target"]).endswith("UNetModel") and \
        unet.get("params", {}).get("in_channels", 4) == 4


FAMILIES = (
    Family("sdxl-base", "Stable Diffusion XL base", "stable-diffusion/sdxl-base-inference.yaml",
           "stable-diffusion-xl-v1-base", package="sdxl", matches_keys=_keys, matches_config=_config,
           lora_prefixes={UNET: "lora_unet_", "conditioner.embedders.0.transformer.": "lora_te1_",
                          "conditioner.embedders.1.model.": "lora_te2_"},
           lora_unet_names="original", inference_prefixes=(UNET, "first_stage_model.", CONDITIONER),
           schedule_in_file=False),
)
