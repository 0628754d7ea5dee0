"""The model families this project reads and writes, and what each one adds: one folder per family.

A family is recognised from a checkpoint's keys and shapes (and a model config from its settings), names its
inference config (what ``--config`` defaults to), the ``modelspec.architecture`` string saved ``.safetensors``
files carry, the key prefixes its LoRA files use for each sub-model (sd-scripts' names), and what a pruned file
keeps. Everything a family adds lives in ``ldm/families/<package>/``: its record (the folder's ``__init__``, here
in the registry), and its other parts, each in the layer its file name says (``diffusers.py``: the diffusers
export, ``ldm.export``'s layer). The generic code asks the registry and never tests a family's name.

This package's records are plain data: they import nothing from the rest of ``ldm``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from ldm.families import flux, sd_v1, sdxl
from ldm.families.base import Family, Shapes

REPO = Path(__file__).resolve().parents[2]

FAMILIES: dict[str, Family] = {f.name: f for f in (*sd_v1.FAMILIES, *sdxl.FAMILIES, *flux.FAMILIES)}


def detect_family(shapes: Shapes) -> Optional[str]:
    """The family of a state dict given as ``key -> shape``, or None when it is none of ours (SD 2.x, a LoRA, a
    diffusers file...)."""
    return next((name for name, f in FAMILIES.items() if f.matches_keys(shapes)), None)


def family_config(name: str) -> Path:
    return REPO / "configs" / FAMILIES[name].config


def config_family(config: Mapping) -> Optional[str]:
    """The family a model config builds (the same rules, applied to the config's ``model.params``); None for a
    model without a denoiser (a first stage trained on its own: ``configs/toy/autoencoder.yaml``)."""
    if "unet_config" not in config["model"]["params"]:
        return None
    return next((name for name, f in FAMILIES.items() if f.matches_config(config["model"]["params"])), None)


def lora_prefixes() -> dict[str, str]:
    """Every family's LoRA prefixes together (sub-model prefix -> sd-scripts' key prefix)."""
    return {prefix: kohya for f in FAMILIES.values() for prefix, kohya in f.lora_prefixes.items()}


def apply_part_settings(config: Any, values: Mapping[str, Optional[str]]) -> Any:
    """Write the settings of the family's parts that were given (``--t5_tokenizer``: ``Family.config_flags``) into
    the config ``config`` builds; the others are left alone. Returns ``config``."""
    from omegaconf import OmegaConf
    family = FAMILIES.get(config_family(config) or "")
    for flag, key in (family.config_flags if family else {}).items():
        if values.get(flag) is not None:
            OmegaConf.update(config, key, values[flag], force_add=True)
    return config
