"""Building a model from its config and filling it from files: the one way every script, the training module and
the exports get a model with real weights.

The model is built on the meta device (no random initialisation of a billion parameters that the file overwrites
anyway) and takes the checkpoint's tensors in place (``ldm.weights.checkpoint``), then a separate VAE file if one
is given (``ldm.weights.vae``).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ldm.weights.checkpoint import load_checkpoint
from ldm.weights.vae import load_vae


def load_model_from_config(config: Mapping[str, Any], ckpt: str | os.PathLike, prefer_ema: bool = True,
                           verbose: bool = True, vae: Optional[str | os.PathLike] = None) -> nn.Module:
    """Build ``config.model`` on the meta device and fill it from ``ckpt`` (no random init, no double copy); then
    put in the separate VAE file ``vae`` (or the config's ``vae_path``) if there is one."""
    from ldm.util import instantiate_from_config
    with torch.device("meta"):
        model = instantiate_from_config(config["model"])
    load_checkpoint(model, ckpt, prefer_ema=prefer_ema, assign=True, verbose=verbose)
    vae = vae or getattr(model, "vae_path", None)
    if vae:
        load_vae(model.first_stage_model, vae, verbose=verbose, scale_factor=_float_or_none(model, "scale_factor"))
    return model.eval()


def _float_or_none(model: nn.Module, name: str) -> Optional[float]:
    value = getattr(model, name, None)
    return float(value) if value is not None else None
