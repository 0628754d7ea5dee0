"""Building blocks shared by the denoiser UNet (Ho et al. 2020; Rombach et al. 2022).

Sinusoidal timestep embeddings, zero-initialised layers, float32 group norm and gradient checkpointing.
Names and numerics follow the CompVis latent-diffusion code so that its checkpoints load by name.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import repeat


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in Ho et al. 2020 (after Vaswani et al. 2017).

    Returns ``[N, dim]`` with ``cos(t * f_i)`` in the first half and ``sin(t * f_i)`` in the second, where
    ``f_i = max_period ** (-i / (dim // 2))``. The cos-first order is what SD v1 weights were trained with.
    """
    if repeat_only:
        return repeat(timesteps, "b -> b d", d=dim)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        # Odd widths get one zero column so the output has exactly `dim` features.
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it.

    Residual branches end in a zeroed layer so that every block starts as the identity (stable early training).
    """
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that computes its statistics in float32 even when the model runs in half precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The affine parameters are upcast too, so a model cast wholesale with .half()/.to(bfloat16) works
        # (CPU group norm rejects float32 input with low-precision weights). `.float()` is a no-op for float32
        # tensors, so the common path pays no copy.
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's normalisation layer: 32 groups, float32 statistics."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-, 2- or 3-D convolution."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args: Any, **kwargs: Any) -> nn.Module:
    """A linear layer (kept as a function so the UNet reads like the original)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-, 2- or 3-D average pooling layer."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def checkpoint(
    func: Callable[..., Any], inputs: Sequence[Any], params: Iterable[torch.Tensor], flag: bool
) -> Any:
    """Evaluate ``func(*inputs)``, discarding its intermediate activations and recomputing them in backward.

    Gradient checkpointing (Chen et al. 2016) trades one extra forward per block for activation memory.
    It only applies when ``flag`` is set and autograd is recording; in inference it would only cost time.
    ``params`` is accepted for signature compatibility with the original; the non-reentrant implementation
    tracks parameters by itself, and, unlike the reentrant one, also works when the inputs do not require grad.
    """
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
