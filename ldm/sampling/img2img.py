"""Image-to-image (SDEdit, Meng et al. 2022): noise an encoded image part of the way and denoise it with a prompt.

``denoise_part_way`` is the one place where a sampler starts part-way, for ``scripts/img2img.py`` and
``scripts/inpaint.py``: ``strength`` in [0, 1] says how much of the schedule is run again.

* DDIM, as the original ``scripts/img2img.py``: ``t_enc = int(strength * S)``; the latent is noised to position
  ``t_enc`` of the DDIM schedule (``stochastic_encode``: timestep ``ddim_timesteps[t_enc]``) and ``decode`` runs
  ``ddim_timesteps[t_enc - 1] .. ddim_timesteps[0]``. (The original's quirk, kept: it noises one DDIM step
  further than the first step it denoises.)
* Euler and DPM++ 2M, as diffusers' img2img pipelines: the last ``int(S * strength)`` steps of the S-step
  schedule, from ``x0 + sigmas[start] * noise`` (``KSampler.start_sigma`` / ``denoise_from``).
* PLMS cannot start part-way (nor could the original's): only strength 1.
* Flow Euler (FLUX.1), as diffusers' FLUX img2img pipeline: the steps from ``int(S - S * strength)`` on, from
  ``t noise + (1 - t) x0`` at that step's time t (``FlowEulerSampler.start`` / ``noised``).

Strength 0 (or any strength that leaves no whole step) returns the encoded latent unchanged. At strength 1 the
k-samplers start from pure noise and run all S steps, as txt2img does; so does DDIM wherever ``t_enc`` reaches the
end of the DDIM schedule (``stochastic_encode`` takes that index as pure noise; the original indexed past the
schedule there and crashed). For the step counts whose DDIM schedule holds more than S timesteps (S = 3 selects 4,
see ``make_ddim_timesteps``) ``t_enc = S`` stays inside it and the original's behaviour is kept.

With ``keep`` (a ``[1, 1, h, w]`` latent mask, 1 = known) the known region is put back after every step: the
original DDIMSampler's ``mask``/``x0`` (before each DDIM step, x0 noised to that step), or, for the k-samplers,
``x0 + sigma_next * noise`` with the starting noise (diffusers' inpainting pipeline for 4-channel models), for flow
Euler ``t_next noise + (1 - t_next) x0`` (diffusers' FLUX inpainting pipeline). After the last step the known
region is ``x0`` exactly.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.sampling.flow import FlowEulerSampler
from ldm.sampling.k_samplers import KSampler
from ldm.sampling.k_schedules import init_noise_sigma


def encode_images(model: Any, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[B, 3, H, W]`` pixels in [-1, 1] -> scaled latents, one posterior sample each (the original img2img)."""
    return model.get_first_stage_encoding(model.encode_first_stage(images), generator)


def ddim_start(steps: int, strength: float) -> int:
    """The original img2img's ``t_enc = int(strength * ddim_steps)``: how many DDIM steps are run."""
    return int(strength * steps)


def steps_run(sampler: Any, steps: int, strength: float) -> int:
    """How many of the ``steps`` are run at ``strength`` (0: the encoded image comes back unchanged)."""
    if isinstance(sampler, KSampler):
        return min(int(steps * strength), steps)
    if isinstance(sampler, FlowEulerSampler):
        return steps - sampler.start(steps, strength)
    return steps if isinstance(sampler, PLMSSampler) and strength == 1 else ddim_start(steps, strength)


@torch.no_grad()
def denoise_part_way(sampler: Any, x0: torch.Tensor, steps: int, strength: float, cond: Any, uncond: Any,
                     scale: float, noise: torch.Tensor, generator: Optional[torch.Generator] = None,
                     keep: Optional[torch.Tensor] = None, eta: float = 0.0,
                     disable_progress: bool = False) -> torch.Tensor:
    """Noise the latents ``x0`` with unit ``noise`` to where ``strength`` starts on ``sampler``'s ``steps``-step
    schedule and denoise them with guidance ``scale``; see the module docstring. Returns the final latents."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if isinstance(sampler, PLMSSampler) and strength != 1:
        raise ValueError(f"PLMS cannot start part-way (strength {strength}); use DDIM, Euler or DPM++ 2M")
    if steps_run(sampler, steps, strength) == 0:
        return x0  # strength 0: nothing to denoise, so the encoded latent itself (the input up to the VAE)
    if isinstance(sampler, KSampler):
        out = _k_sampler(sampler, x0, steps, strength, cond, uncond, scale, noise, keep, disable_progress)
    elif isinstance(sampler, FlowEulerSampler):
        out = _flow(sampler, x0, steps, strength, cond, uncond, scale, noise, keep, disable_progress)
    elif isinstance(sampler, PLMSSampler):
        out, _ = sampler.sample(steps, x0.shape[0], x0.shape[1:], cond, unconditional_guidance_scale=scale,
                                unconditional_conditioning=uncond, x_T=noise, generator=generator, verbose=False,
                                mask=None if keep is None else keep, x0=None if keep is None else x0,
                                disable_progress=disable_progress)
    elif isinstance(sampler, DDIMSampler):
        sampler.make_schedule(ddim_num_steps=steps, ddim_eta=eta, verbose=False)
        t_enc = ddim_start(steps, strength)
        z = sampler.stochastic_encode(x0, torch.full((x0.shape[0],), t_enc, device=x0.device), noise=noise)
        out = sampler.decode(z, cond, t_enc, scale, uncond, generator=generator, disable_progress=disable_progress,
                             mask=keep, x0=None if keep is None else x0)
    else:
        raise TypeError(f"{type(sampler).__name__} cannot denoise part-way")
    return out if keep is None else keep * x0 + (1 - keep) * out


def _k_sampler(sampler: KSampler, x0: torch.Tensor, steps: int, strength: float, cond: Any, uncond: Any,
               scale: float, noise: torch.Tensor, keep: Optional[torch.Tensor],
               disable_progress: bool) -> torch.Tensor:
    start, sigma = sampler.start_sigma(steps, strength)
    # Strength 1: pure noise at the schedule's start, as txt2img (and diffusers' inpainting pipeline) begin.
    x = noise * init_noise_sigma(sampler.make_schedule(steps)) if strength == 1 else x0 + sigma * noise

    def paste(i: int, x: torch.Tensor, sigma_next: float) -> torch.Tensor:
        return keep * (x0 + sigma_next * noise) + (1 - keep) * x

    out, _ = sampler.denoise_from(x, steps, start, cond, scale, uncond, callback=None if keep is None else paste,
                                  disable_progress=disable_progress)
    return out


def _flow(sampler: FlowEulerSampler, x0: torch.Tensor, steps: int, strength: float, cond: Any, uncond: Any,
          scale: float, noise: torch.Tensor, keep: Optional[torch.Tensor], disable_progress: bool) -> torch.Tensor:
    start = sampler.start(steps, strength)

    def paste(i: int, x: torch.Tensor, t_next: float) -> torch.Tensor:
        return keep * (t_next * noise + (1 - t_next) * x0) + (1 - keep) * x

    return sampler.denoise_from(sampler.noised(x0, noise, steps, start), steps, start, cond, scale, uncond,
                                callback=None if keep is None else paste, disable_progress=disable_progress)
