"""The samplers by name, for scripts and configs that choose one: ``make_sampler("dpmpp_2m", model)``.

All take ``(model)`` and share ``sample(S, batch_size, shape, conditioning=..., unconditional_guidance_scale=...,
unconditional_conditioning=..., x_T=..., generator=..., ...) -> (samples, intermediates)``; the per-step
``callback`` differs (DDIM/PLMS: ``callback(i)``; Euler/DPM++: ``callback(i, x, sigma_next)``, see k_samplers).
"""
from __future__ import annotations

from typing import Any, Literal

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.k_samplers import DPMPP2MSampler, EulerSampler
from ldm.models.diffusion.plms import PLMSSampler

SamplerName = Literal["ddim", "plms", "euler", "dpmpp_2m"]

SAMPLERS: dict[str, type] = {"ddim": DDIMSampler, "plms": PLMSSampler, "euler": EulerSampler,
                             "dpmpp_2m": DPMPP2MSampler}


def make_sampler(name: SamplerName, model: Any) -> Any:
    """The sampler called ``name`` for ``model`` (anything with ``apply_model`` and ``alphas_cumprod``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (expected one of {', '.join(SAMPLERS)})")
    return SAMPLERS[name](model)
