"""Stable Diffusion v1 (and its 9-channel inpainting variant): one CLIP ViT-L text encoder at
``cond_stage_model.transformer``, the UNet at ``model.diffusion_model``, the VAE at ``first_stage_model``, and
the twelve schedule buffers at the top level (the released ``sd-v1-4.ckpt`` layout, ``ldm/reference``).

Its parts: the configs ``configs/stable-diffusion/v1-*.yaml`` (and the tiny ones for tests), the diffusers export
``diffusers.py``; the model is the original's ``LatentDiffusion`` with ``FrozenCLIPEmbedder`` (``ldm/modules``).
"""
from __future__ import annotations

from ldm.families.base import UNET, Family, unet_in_channels

TEXT = "cond_stage_model.transformer."


def _keys(channels: int):
    return lambda shapes: any(k.startswith(TEXT) for k in shapes) and unet_in_channels(shapes) == channels


def _config(channels: int):
    return lambda params: "cond_stage_config" in params and \
        params["unet_config"]["params"].get("in_channels", 4) == channels


COMMON = dict(package="sd_v1", lora_prefixes={UNET: "lora_unet_", TEXT: "lora_te_"}, lora_unet_names="diffusers",
              inference_prefixes=(UNET, "first_stage_model.", "cond_stage_model."), schedule_in_file=True)
FAMILIES = (
    Family("sd-v1", "Stable Diffusion v1", "stable-diffusion/v1-inference.yaml", "stable-diffusion-v1",
           matches_keys=_keys(4), matches_config=_config(4), **COMMON),
    Family("sd-v1-inpainting", "Stable Diffusion v1 inpainting (9-channel UNet)",
           "stable-diffusion/v1-inpainting-inference.yaml", "stable-diffusion-v1/inpaint",
           matches_keys=_keys(9), matches_config=_config(9), **COMMON),
)
