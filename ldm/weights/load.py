"""Building a model from its config and filling it from files: the one way every script, the training module and
the exports get a model with real weights.

The model is built on the meta device (no random initialisation of a billion parameters that the file overwrites
anyway) and takes the checkpoint's tensors in place (``ldm.weights.checkpoint``), then a separate VAE file if one
is given (``ldm.weights.vae``). A family released as several files (FLUX.1: the transformer, ``ae``, ``t5``,
``clip``) is assembled first (:func:`assemble`): each part's file under the prefix its family's record gives it,
so the one audit sees the whole model and names what is missing, file by file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ldm.families import FAMILIES, config_family, detect_family
from ldm.families.base import Family
from ldm.weights.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from ldm.weights.vae import load_vae

Components = Mapping[str, Optional[str | os.PathLike]]


def load_model_from_config(config: Mapping[str, Any], ckpt: str | os.PathLike, prefer_ema: bool = True,
                           verbose: bool = True, vae: Optional[str | os.PathLike] = None,
                           components: Optional[Components] = None) -> nn.Module:
    """Build ``config.model`` on the meta device and fill it from ``ckpt`` (no random init, no double copy) and,
    for a family of several files, its ``components`` (flag name -> file, e.g. ``{"t5": "t5xxl.safetensors"}``;
    default: the config's ``model.params.component_paths``); then put in the separate VAE file ``vae`` (or the
    config's ``vae_path``) if there is one."""
    from ldm.util import instantiate_from_config
    with torch.device("meta"):
        model = instantiate_from_config(config["model"])
    components = components if components is not None else getattr(model, "component_paths", None) or {}
    family = FAMILIES.get(config_family(config) or "")
    state = assemble(family, ckpt, components, verbose) if family is not None and family.components else None
    load_checkpoint(model, ckpt, prefer_ema=prefer_ema, assign=True, verbose=verbose, state=state)
    vae = vae or getattr(model, "vae_path", None)
    if vae:
        load_vae(model.first_stage_model, vae, verbose=verbose, scale_factor=_float_or_none(model, "scale_factor"))
    return model.eval()


def assemble(family: Family, ckpt: str | os.PathLike, components: Components, verbose: bool = True
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of a family released as several files: ``ckpt`` (the whole model, or its network alone
    without ``family.bare_prefix``, as the released transformer files are) plus each given component file under
    its prefix. A part the checkpoint already holds needs no file; one it lacks and no file gives is reported by
    the audit that follows, with the flag that would give it."""
    sd, meta = read_checkpoint(ckpt)
    sd = dequantize_scaled_fp8(sd, ckpt, verbose)
    found = detect_family({k: tuple(v.shape) for k, v in sd.items()})
    if found is not None and FAMILIES[found].package != family.package:
        f = FAMILIES[found]
        raise CheckpointError(f"{ckpt}: it is a {f.label} checkpoint, but the config builds {family.label} (use "
                              f"--config configs/{f.config})")
    if family.bare_prefix and not any(k.startswith(family.bare_prefix) for k in sd):
        sd = {family.bare_prefix + k: v for k, v in sd.items()}  # the network alone, as released
    unknown = sorted(set(components) - set(family.components))
    if unknown:
        raise CheckpointError(f"--{unknown[0]}: {family.label} has no such part (its parts: "
                              f"{', '.join('--' + n for n in family.components)})")
    for name, path in components.items():
        if path is None:
            continue
        prefix = family.components[name]
        part, _ = read_checkpoint(path)
        if any(k.startswith(prefix) for k in part):  # a whole model's file: take the part from it
            part = {k[len(prefix):]: v for k, v in part.items() if k.startswith(prefix)}
        sd.update({prefix + k: v for k, v in part.items()})
        if verbose:
            print(f"Read --{name} {Path(path).name}: {len(part)} tensors for {prefix}*")
    missing = [f"--{name}" for name, prefix in family.components.items() if not any(k.startswith(prefix) for k in sd)]
    if missing:
        raise CheckpointError(f"{ckpt}: {family.label} needs its other files: {', '.join(missing)} (the checkpoint "
                              f"holds no {', no '.join(family.components[m[2:]] + '*' for m in missing)} keys)")
    for a, b in family.tied_keys.items():  # one tensor saved under either name (T5's tied embedding)
        if a not in sd and b in sd:
            sd[a] = sd[b]
        elif b not in sd and a in sd:
            sd[b] = sd[a]
    return sd, meta


def dequantize_scaled_fp8(sd: Mapping[str, torch.Tensor], path: str | os.PathLike, verbose: bool = True
                          ) -> dict[str, torch.Tensor]:
    """ComfyUI's ``scaled_fp8`` files (an empty ``scaled_fp8`` marker tensor; each linear weight stored in
    float8_e4m3fn with its float32 ``<name>.scale_weight``, the weight being their product; sometimes an
    ``<name>.scale_input`` for fp8 matmuls) as the plain bfloat16 weights of the released layout. Other files pass
    unchanged."""
    if "scaled_fp8" not in sd and not any(k.endswith(".scale_weight") for k in sd):
        return dict(sd)
    out = {}
    for key, value in sd.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale = sd.get(key[:-len("weight")] + "scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            value = (value.float() * scale.float()).to(torch.bfloat16)
        out[key] = value
    if verbose:
        print(f"{path}: a ComfyUI scaled_fp8 file (float8 weights times per-tensor scale_weight): read as "
              f"bfloat16 weights")
    return out


def _float_or_none(model: nn.Module, name: str) -> Optional[float]:
    value = getattr(model, name, None)
    return float(value) if value is not None else None
