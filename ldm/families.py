"""The model families this project reads and writes, recognised from a checkpoint's keys and shapes.

A family names its inference config (what ``--config`` defaults to when it is not given) and the ``modelspec``
architecture string that saved ``.safetensors`` files carry in their metadata, so other tools (and ours) know what
a file is without guessing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    config: str  # relative to the repository's configs/ folder
    architecture: str  # modelspec.architecture
    #: How kohya's sd-scripts names the UNet's modules in LoRA files: by diffusers' blocks (``down_blocks_0_...``,
    #: it trains SD v1 on diffusers' UNet) or by the original ones (``input_blocks_4_1_...``, its SDXL UNet is sgm's).
    lora_unet_names: Literal["diffusers", "original"] = "diffusers"


FAMILIES = {
    "sd-v1": Family("sd-v1", "Stable Diffusion v1", "stable-diffusion/v1-inference.yaml", "stable-diffusion-v1"),
    "sd-v1-inpainting": Family("sd-v1-inpainting", "Stable Diffusion v1 inpainting (9-channel UNet)",
                               "stable-diffusion/v1-inpainting-inference.yaml", "stable-diffusion-v1/inpaint"),
    "sdxl-base": Family("sdxl-base", "Stable Diffusion XL base", "stable-diffusion/sdxl-base-inference.yaml",
                        "stable-diffusion-xl-v1-base", lora_unet_names="original"),
}


def detect_family(shapes: Mapping[str, Sequence[int]]) -> Optional[str]:
    """The family of a state dict given as ``key -> shape``, or None when it is none of ours (SD 2.x, a LoRA, a
    diffusers file...). Decided by what each family alone has: SDXL's ``conditioner.*`` and label embedding, the
    v1 text encoder at ``cond_stage_model.transformer``, and the UNet's input channels (9 for inpainting)."""
    if UNET_IN not in shapes:
        return None
    channels = int(shapes[UNET_IN][1]) if len(shapes[UNET_IN]) > 1 else 0
    if any(k.startswith("conditioner.embedders.") for k in shapes) and \
            "model.diffusion_model.label_emb.0.0.weight" in shapes:
        return "sdxl-base" if channels == 4 else None
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return {4: "sd-v1", 9: "sd-v1-inpainting"}.get(channels)
    return None


def family_config(name: str) -> Path:
    return REPO / "configs" / FAMILIES[name].config


def config_family(config: Mapping) -> Optional[str]:
    """The family a model config builds (the same rules, applied to the config's settings)."""
    params = config["model"]["params"]
    unet = params["unet_config"]["params"]
    if "conditioner_config" in params:
        return "sdxl-base" if unet.get("in_channels", 4) == 4 else None
    return {4: "sd-v1", 9: "sd-v1-inpainting"}.get(unet.get("in_channels", 4))
