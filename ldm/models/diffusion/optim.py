"""Optimizer and learning-rate schedule for fine-tuning, built from the model's config keys."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from torch.optim.lr_scheduler import LambdaLR

from ldm.lr_scheduler import warmup_then
from ldm.util import instantiate_from_config


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float,
                    config: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) with the config's ``weight_decay``, ``betas`` and ``eps``.

    ``name: adamw8bit`` keeps the two moments in 8 bits (Dettmers et al. 2022, bitsandbytes): a quarter of the
    optimizer memory. Without bitsandbytes it says so and falls back to the 32-bit AdamW.
    """
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: the UNet and the text encoder are both frozen")
    config = dict(config)
    name = config.pop("name", "adamw")
    kwargs = {"weight_decay": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8}
    unknown = set(config) - set(kwargs)
    if unknown:
        raise ValueError(f"model.params.optimizer_config: unknown keys {sorted(unknown)} "
                         f"(known: name, {', '.join(sorted(kwargs))})")
    kwargs.update({k: tuple(v) if k == "betas" else v for k, v in config.items()})
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            print("optimizer adamw8bit: bitsandbytes is not installed (pip install bitsandbytes); "
                  "using torch's 32-bit AdamW instead")
        else:
            return bnb.optim.AdamW8bit(params, lr=lr, **kwargs)
    elif name != "adamw":
        raise ValueError(f"model.params.optimizer_config.name {name!r}: expected adamw or adamw8bit")
    return torch.optim.AdamW(params, lr=lr, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, scheduler_config: Optional[Mapping[str, Any]],
                    schedule: str, warmup_steps: int, max_steps: int) -> LambdaLR:
    """The original ``scheduler_config`` (e.g. ``LambdaLinearScheduler``) when given, else warm-up + schedule."""
    if scheduler_config is not None:
        return LambdaLR(optimizer, lr_lambda=instantiate_from_config(scheduler_config).schedule)
    return LambdaLR(optimizer, lr_lambda=warmup_then(schedule, warmup_steps, max_steps))
