"""Sampling a rectified-flow model (FLUX.1): Euler's method on the flow's ODE dx/dt = v(x, t), from t = 1 (pure
noise) to t = 0, over the schedule of Black Forest Labs' reference sampler (``flux_schedule``: linspace(1, 0), shifted
by resolution for FLUX.1-dev, unshifted for schnell), step x <- x + (t_next - t) v(x, t).

FLUX.1-dev is guidance-distilled: the guidance strength is an input of the network (``model.with_guidance``, which
the scripts apply to the conditioning), so it samples with one pass per step and no unconditional branch
(``--scale 1``). A scale above 1 adds classifier-free guidance on top ("true CFG": v_uc + scale (v_c - v_uc)).

The interface is ``DDIMSampler``'s (``sample(S, batch_size, shape, conditioning=..., ...)``), plus, for img2img and
inpainting, ``start(steps, strength)`` and ``denoise_from`` (the last steps of the schedule from a latent already
noised to their first time, as diffusers' FLUX img2img and inpainting pipelines do).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from tqdm import tqdm

from ldm.models.diffusion.ddim import guided_eps
from ldm.models.diffusion.objectives import flux_schedule

#: Called after each step as ``hook(i, x, t_next)``; a returned tensor replaces x (inpainting's paste).
StepHook = Callable[[int, torch.Tensor, float], Optional[torch.Tensor]]


class FlowEulerSampler:
    progress_label = "Flow Euler Sampler"

    def __init__(self, model: Any):
        if getattr(model, "parameterization", "eps") != "flow":
            raise ValueError("flow_euler samples a flow model (FLUX.1); this model predicts eps: use ddim, plms, "
                             "euler or dpmpp_2m")
        self.model = model

    def schedule(self, steps: int, latent_hw: Sequence[int]) -> torch.Tensor:
        """The ``steps + 1`` times for a latent of ``latent_hw`` (its (h/2)(w/2) tokens set the shift)."""
        tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        return flux_schedule(steps, tokens, shift=self.model.time_shift, base_shift=self.model.base_shift,
                             max_shift=self.model.max_shift)

    @staticmethod
    def start(steps: int, strength: float) -> int:
        """The schedule index img2img starts at: diffusers' ``int(max(steps - steps * strength, 0))``, so
        ``steps - start`` steps are run (all of them at strength 1, none at 0)."""
        return int(max(steps - steps * strength, 0))

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
               x_T: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None, verbose: bool = True,
               disable_progress: bool = False, eta: float = 0.0, **unsupported: Any) -> tuple[torch.Tensor, None]:
        """``batch_size`` latents of ``shape`` (C, H, W) from noise ``x_T`` (drawn with ``generator`` if None)."""
        unsupported = {k: v for k, v in unsupported.items() if v not in (None, False)}
        if unsupported or eta:
            raise NotImplementedError(f"{type(self).__name__}.sample: unsupported options "
                                      f"{sorted(unsupported) + ['eta'] * bool(eta)}")
        device = self.model.betas.device
        x = x_T if x_T is not None else torch.randn((batch_size, *shape), generator=generator, device=device)
        return self.denoise_from(x, S, 0, conditioning, unconditional_guidance_scale, unconditional_conditioning,
                                 disable_progress=disable_progress or not verbose), None

    @torch.no_grad()
    def denoise_from(self, x: torch.Tensor, steps: int, start: int, cond: Any, scale: float = 1.0,
                     uncond: Any = None, callback: Optional[StepHook] = None,
                     disable_progress: bool = False) -> torch.Tensor:
        """Steps ``start .. steps - 1`` of the ``steps``-step schedule from ``x`` (at time ``schedule[start]``)."""
        times = self.schedule(steps, x.shape[-2:]).tolist()
        for i in tqdm(range(start, steps), desc=self.progress_label, disable=disable_progress):
            t = torch.full((x.shape[0],), times[i], device=x.device, dtype=x.dtype)
            v = guided_eps(self.model, x, t, cond, uncond, scale)  # the same linear guidance, on the velocity
            x = x + (times[i + 1] - times[i]) * v
            if callback is not None:
                out = callback(i, x, times[i + 1])
                x = x if out is None else out
        return x

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, steps: int, start: int) -> torch.Tensor:
        """``x0`` noised to the time ``start`` begins at: t noise + (1 - t) x0."""
        t = float(self.schedule(steps, x0.shape[-2:])[start])
        return t * noise + (1 - t) * x0
