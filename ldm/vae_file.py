"""A separate VAE file in place of a checkpoint's own first stage (``--vae FILE`` / ``model.params.vae_path``).

SDXL users replace the released VAE, which overflows in float16, with a re-trained float16-safe one published in
the diffusers layout (``sdxl-vae-fp16-fix``); SD v1 users swap in ``vae-ft-mse-840000-ema-pruned.ckpt`` (original
layout). Both layouts are read here: the original one (bare or under ``first_stage_model.``) as it is, the
diffusers one renamed to the original names by :func:`diffusers_vae_to_ldm` (written here; diffusers is not
needed at run time).
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import torch
from torch import nn

from ldm.checkpoint import CheckpointError, audit, read_checkpoint, refuse_nonfinite

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


def vae_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The first-stage tensors of a VAE file in any of the layouts, under the original names (no prefix)."""
    sd, _ = read_checkpoint(path)
    if any(k.startswith(PREFIX) for k in sd):
        return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        return diffusers_vae_to_ldm(sd)
    if any(k.startswith("encoder.down.") for k in sd):
        return dict(sd)
    raise CheckpointError(f"{path}: not a VAE file (no encoder.down.*, encoder.down_blocks.* or first_stage_model.* "
                          f"keys)")


def load_vae(first_stage: nn.Module, path: str | os.PathLike, verbose: bool = True) -> None:
    """Replace ``first_stage``'s weights with the VAE in ``path`` (cast to the module's dtypes), after checking
    every key and shape; ``model_ema``-style extras and the training loss's weights in the file are ignored."""
    sd = vae_state_dict(path)
    own = first_stage.state_dict()
    problem = audit({k: v.shape for k, v in own.items()}, sd)
    if problem:
        raise CheckpointError(f"{path}: not a VAE for this model: {problem}")
    weights = {k: sd[k].to(own[k].dtype) for k in own}
    refuse_nonfinite(weights, path)
    first_stage.load_state_dict(weights, strict=True, assign=any(v.is_meta for v in own.values()))
    if verbose:
        print(f"Loaded VAE {path}")
