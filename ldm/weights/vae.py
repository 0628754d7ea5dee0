"""A separate VAE file in place of a checkpoint's own first stage (``--vae FILE`` / ``model.params.vae_path``).

SDXL users replace the released VAE, which overflows in float16, with a re-trained float16-safe one published in
the diffusers layout (``sdxl-vae-fp16-fix``); SD v1 users swap in ``vae-ft-mse-840000-ema-pruned.ckpt`` (original
layout). Both layouts are read here: the original one (bare or under ``first_stage_model.``) as it is, the
diffusers one renamed to the original names by :func:`diffusers_vae_to_ldm` (written here; diffusers is not
needed at run time).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ldm.weights.checkpoint import CheckpointError, audit, read_checkpoint, refuse_nonfinite

PREFIX = "first_stage_model."
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # the second half: diffusers < 0.15
_RESNET = {"conv_shortcut": "nin_shortcut"}


def _resnet_part(part: str) -> str:
    head, _, leaf = part.partition(".")
    return f"{_RESNET.get(head, head)}.{leaf}"


def _rename(key: str, levels: int) -> str:
    """One diffusers ``AutoencoderKL`` key -> the original name (``encoder.down_blocks.1.resnets.0.conv1.weight``
    -> ``encoder.down.1.block.0.conv1.weight``; the decoder's ``up_blocks`` run in the opposite order)."""
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        side, kind, level, part, index, rest = m.groups()
        level = int(level) if kind == "down" else levels - 1 - int(level)
        if part == "resnets":
            return f"{side}.{kind}.{level}.block.{index}.{_resnet_part(rest)}"
        return f"{side}.{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_resnet_part(m.group(3))}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
    if m:
        return f"{m.group(1)}.mid.attn_1.{_ATTN[m.group(2)]}.{m.group(3)}"
    return key.replace("conv_norm_out", "norm_out")


def diffusers_vae_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict under the original key names; the mid-block attention's linear
    projections become the original's 1x1 convolutions."""
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in sd.items():
        name = _rename(key, levels)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[name] = value
    return out


#: The latent scale (``scale_factor``) each family's VAE was trained for: the SD v1 and SDXL VAEs share one layout,
#: key for key and shape for shape, but not their latent space, so this is what tells them apart.
FAMILY_SCALES = {"sd-v1": 0.18215, "sd-v1-inpainting": 0.18215, "sdxl-base": 0.13025}


def stated_family(path: str | os.PathLike, sd: Mapping[str, torch.Tensor], meta: Mapping[str, object]
                  ) -> tuple[Optional[str], str]:
    """``(family, how the file says so)`` of a VAE file, or ``(None, "")`` when it does not say: a full
    checkpoint by its keys and shapes, our and other tools' safetensors by ``modelspec.architecture``, a file of a
    diffusers folder by the ``scaling_factor`` of the ``config.json`` beside it."""
    from ldm.families import FAMILIES, detect_family
    family = detect_family({k: tuple(v.shape) for k, v in sd.items()})
    if family is not None:
        return family, f"a {FAMILIES[family].label} checkpoint"
    architecture = str(meta.get("modelspec.architecture", ""))
    for name, f in FAMILIES.items():
        if architecture and architecture.split("/")[0] == f.architecture.split("/")[0]:
            return name, f"its metadata says modelspec.architecture {architecture}"
    config = Path(path).with_name("config.json")
    if Path(path).stem.startswith("diffusion_pytorch_model") and config.is_file():
        try:
            scale = float(json.loads(config.read_text()).get("scaling_factor"))
        except (OSError, ValueError, TypeError):
            return None, ""
        family = next((name for name, s in FAMILY_SCALES.items() if math.isclose(s, scale, rel_tol=1e-4)), None)
        return family, f"its {config} says scaling_factor {scale}"
    return None, ""


def check_vae_family(path: str | os.PathLike, stated: tuple[Optional[str], str], scale_factor: Optional[float]
                     ) -> str:
    """Refuse (one line) a VAE that says it belongs to a family whose latent scale differs from the model's;
    returns what to say about it when it loads."""
    from ldm.families import FAMILIES
    family, how = stated
    if scale_factor is None:
        return ""
    wanted = [name for name, s in FAMILY_SCALES.items() if math.isclose(s, scale_factor, rel_tol=1e-4)]
    if family is not None and wanted and family not in wanted:
        raise CheckpointError(
            f"--vae {path}: a VAE of {FAMILIES[family].label} ({how}), but this model is "
            f"{FAMILIES[wanted[0]].label} (scale_factor {scale_factor}): the two VAEs share one layout but not "
            f"their latent space, so its pictures would be wrong; use a VAE made for {FAMILIES[wanted[0]].label}")
    if family is not None:
        return f" ({FAMILIES[family].label}: {how})"
    if wanted:
        return (f" (its keys and shapes fit; the file does not say which model it was made for, and SD v1 and SDXL "
                f"VAEs share one layout: it must be one for {FAMILIES[wanted[0]].label})")
    return ""


def read_vae(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], tuple[Optional[str], str]]:
    """``(its first-stage tensors under the original names, the family the file states)`` of a VAE file in any of
    the layouts (see :func:`stated_family`)."""
    sd, meta = read_checkpoint(path)
    return _first_stage(path, sd), stated_family(path, sd, meta)


def _first_stage(path: str | os.PathLike, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith(PREFIX) for k in sd):
        return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        return diffusers_vae_to_ldm(sd)
    if any(k.startswith("encoder.down.") for k in sd):
        return dict(sd)
    raise CheckpointError(f"{path}: not a VAE file (no encoder.down.*, encoder.down_blocks.* or first_stage_model.* "
                          f"keys)")


def load_vae(first_stage: nn.Module, path: str | os.PathLike, verbose: bool = True,
             scale_factor: Optional[float] = None) -> None:
    """Replace ``first_stage``'s weights with the VAE in ``path`` (cast to the module's dtypes), after checking
    every key and shape and, given the model's ``scale_factor``, the family the file says it belongs to;
    ``model_ema``-style extras and the training loss's weights in the file are ignored."""
    sd, stated = read_vae(path)
    own = first_stage.state_dict()
    problem = audit({k: v.shape for k, v in own.items()}, sd)
    if problem:
        latent = sd.get("encoder.conv_out.weight")
        if latent is not None and latent.shape[0] == 32:
            problem = f"a 16-channel autoencoder (FLUX.1's?), this model's latents have " \
                      f"{own['encoder.conv_out.weight'].shape[0] // 2} channels"
        raise CheckpointError(f"--vae {path}: not a VAE for this model: {problem}")
    said = check_vae_family(path, stated, scale_factor)
    weights = {k: sd[k].to(own[k].dtype) for k in own}
    refuse_nonfinite(weights, path)
    first_stage.load_state_dict(weights, strict=True, assign=any(v.is_meta for v in own.values()))
    if verbose:
        print(f"Loaded VAE {path}{said}")
