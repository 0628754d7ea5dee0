"""The samplers by name, for scripts and configs that choose one: ``make_sampler("dpmpp_2m", model)``.

All take ``(model)`` and share ``sample(S, batch_size, shape, conditioning=..., unconditional_guidance_scale=...,
unconditional_conditioning=..., x_T=..., generator=..., ...) -> (samples, intermediates)``; the per-step
``callback`` differs (DDIM/PLMS: ``callback(i)``; Euler/DPM++: ``callback(i, x, sigma_next)``, see k_samplers).
``guided_images`` is the one guided sample-and-decode that class images, the training grids, validation and the
toy evaluator share.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.sampling.flow import FlowEulerSampler
from ldm.sampling.k_samplers import DPMPP2MSampler, EulerSampler

SamplerName = Literal["ddim", "plms", "euler", "dpmpp_2m", "flow_euler"]

SAMPLERS: dict[str, type] = {"ddim": DDIMSampler, "plms": PLMSSampler, "euler": EulerSampler,
                             "dpmpp_2m": DPMPP2MSampler, "flow_euler": FlowEulerSampler}
#: The samplers of each parameterization (``LatentDiffusion.parameterization``): the first is the default.
FOR_PARAMETERIZATION = {"eps": ("ddim", "plms", "euler", "dpmpp_2m"), "flow": ("flow_euler",)}


class NonFiniteSample(ValueError):
    """A sample that came out NaN or Inf (it would be saved as a black picture); the message is one line."""


def check_finite(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """``images`` (``[N, ...]``) unchanged when every value is finite; else :class:`NonFiniteSample` naming the
    first bad sample's prompt. NaN/Inf come from broken weights or from float16 overflow (the SDXL VAE's, say)."""
    bad = [k for k in range(len(images)) if not bool(torch.isfinite(images[k]).all())]
    if bad:
        raise NonFiniteSample(f"{len(bad)} of {len(images)} samples came out NaN or Inf (the first for "
                              f"{prompts[bad[0]]!r}); not saved: the weights hold NaN/Inf, or float16 overflowed "
                              f"(try --precision full, or for SDXL an fp16-safe --vae)")
    return images


def make_sampler(name: SamplerName, model: Any) -> Any:
    """The sampler called ``name`` for ``model`` (anything with ``apply_model`` and ``alphas_cumprod``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (expected one of {', '.join(SAMPLERS)})")
    fits = FOR_PARAMETERIZATION[getattr(model, "parameterization", "eps")]
    if name not in fits:
        raise ValueError(f"sampler {name!r} cannot sample this model (it predicts "
                         f"{getattr(model, 'parameterization', 'eps')}): use {', '.join(fits)}")
    return SAMPLERS[name](model)


def default_sampler(model: Any) -> str:
    return FOR_PARAMETERIZATION[getattr(model, "parameterization", "eps")][0]


def guided_images(model: Any, sampler: Any, prompts: Sequence[str], shape: Sequence[int], steps: int, scale: float,
                  generator: torch.Generator, sizes: Any = None) -> torch.Tensor:
    """``prompts`` sampled with classifier-free guidance against the empty prompt (``scale``), ``steps`` steps of
    ``sampler`` from noise drawn with ``generator``, then decoded: ``[N, 3, H, W]`` float in [-1, 1] on the CPU.
    ``sizes``: SDXL's size inputs (``model.default_sizes``); None for the model's native ones. A guidance-distilled
    model (FLUX.1-dev) takes ``scale`` as its guidance input and runs one pass per step, no unconditional branch."""
    c = model.get_learned_conditioning(list(prompts), sizes)
    if getattr(model, "guidance_distilled", False):
        c, uc, scale = model.with_guidance(c, scale), None, 1.0
    else:
        uc = model.get_unconditional_conditioning(len(prompts) * [""], sizes)
    z, _ = sampler.sample(steps, len(prompts), shape, conditioning=c, unconditional_conditioning=uc,
                          unconditional_guidance_scale=scale, generator=generator, verbose=False,
                          disable_progress=True)
    return check_finite(model.decode_first_stage(z).float(), prompts).clamp(-1, 1).cpu()
