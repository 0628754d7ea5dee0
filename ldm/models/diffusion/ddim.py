"""DDIM sampling (Song et al. 2021, eq. 12) with classifier-free guidance (Ho & Salimans 2022).

The sampler needs only ``model.apply_model`` and the schedule buffer ``alphas_cumprod``; its device comes from
that buffer. Timestep selection reproduces the original CompVis code exactly, so the same step count gives the
same trajectory, including its quirks: ``range(0, 1000, 1000 // S) + 1`` can hold more than S steps
(S=3 gives 4), and for some S it reaches timestep 1000, past the end of the schedule, where the original
crashes. We clamp that step to 999 and say so.

Image-to-image and inpainting use the original's ``stochastic_encode`` (noise an encoded image to a step of the
DDIM schedule) and ``decode`` (denoise from there), and ``sample``'s ``mask``/``x0`` (paste the known region,
noised to the current step, before every step).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ldm.models.diffusion.schedule import extract_into_tensor, predict_x0, q_sample

Discretize = Literal["uniform", "quad"]


def make_ddim_timesteps(num_ddim_timesteps: int, num_ddpm_timesteps: int = 1000,
                        discretize: Discretize = "uniform") -> np.ndarray:
    """The DDPM timesteps visited by DDIM, ascending, as the original ``make_ddim_timesteps`` selects them."""
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"ddim_steps must be between 1 and {num_ddpm_timesteps}, got {num_ddim_timesteps}")
    if discretize == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        steps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif discretize == "quad":
        steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * .8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise ValueError(f"unknown ddim_discretize {discretize!r} (uniform or quad)")
    # The original adds one so the final alpha is alphas_cumprod[1] rather than [0].
    steps = steps + 1
    if steps[-1] >= num_ddpm_timesteps:
        warnings.warn(f"DDIM with {num_ddim_timesteps} steps selects timestep {steps[-1]}, beyond the "
                      f"schedule's last ({num_ddpm_timesteps - 1}); the original code fails here, we use "
                      f"{num_ddpm_timesteps - 1} instead", stacklevel=2)
        steps = np.minimum(steps, num_ddpm_timesteps - 1)
    return steps


def ddim_coefficients(alphas_cumprod: torch.Tensor, timesteps: np.ndarray,
                      eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha_t, alpha_{t-1} and sigma_t(eta) of Song et al. 2021, eq. 16, for the selected timesteps (float32).

    Computed in float64 from the float32 ``alphas_cumprod`` buffer, as the original did through numpy.
    """
    acp = alphas_cumprod.detach().cpu().double()
    alphas = acp[torch.as_tensor(timesteps)]
    alphas_prev = torch.cat([acp[:1], alphas[:-1]])
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return alphas.float(), alphas_prev.float(), sigmas.float()


def concat_conditioning(uc: Any, c: Any) -> Any:
    """``uc`` and ``c`` as one batch, unconditional first: tensors are concatenated along dim 0, dicts key by key
    and lists/tuples item by item, so a conditioning such as ``{"c_crossattn": [ctx], "y": vec}`` stays opaque."""
    if isinstance(c, torch.Tensor):
        return torch.cat([uc, c])
    if isinstance(c, Mapping):
        if set(uc) != set(c):
            raise ValueError(f"conditioning keys differ: unconditional {sorted(uc)}, conditional {sorted(c)}")
        return {k: concat_conditioning(uc[k], c[k]) for k in c}
    if isinstance(c, (list, tuple)):
        if len(uc) != len(c):
            raise ValueError(f"conditioning lists differ in length: {len(uc)} and {len(c)}")
        return type(c)(concat_conditioning(u, v) for u, v in zip(uc, c))
    raise TypeError(f"cannot batch conditioning of type {type(c).__name__} for guidance")


def guided_eps(model: Any, x: torch.Tensor, t: torch.Tensor, c: Any, uc: Any, scale: float) -> torch.Tensor:
    """eps with classifier-free guidance: eps(x, uc) + scale * (eps(x, c) - eps(x, uc)), in one batch."""
    if uc is None or scale == 1.0:
        return model.apply_model(x, t, c)
    e_uncond, e_cond = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), concat_conditioning(uc, c)).chunk(2)
    return e_uncond + scale * (e_cond - e_uncond)


def ddim_step(x: torch.Tensor, e_t: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor, sigma_t: torch.Tensor,
              noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Song et al. 2021, eq. 12: returns (x_{t-1}, predicted x_0)."""
    pred_x0 = predict_x0(x, e_t, a_t)
    dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * e_t
    return a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * noise, pred_x0


class DDIMSampler:
    """The original ``DDIMSampler`` interface: ``DDIMSampler(model).sample(S, batch_size, shape, ...)``."""

    progress_label = "DDIM Sampler"

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any):
        # ``schedule`` is accepted for the original signature; the DDPM schedule comes from the model's buffers.
        del schedule
        self.model = model
        self.ddpm_num_timesteps = int(model.num_timesteps)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: Discretize = "uniform", ddim_eta: float = 0.,
                      verbose: bool = True) -> None:
        self.ddim_timesteps = make_ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps, ddim_discretize)
        device = self.model.alphas_cumprod.device
        alphas, alphas_prev, sigmas = ddim_coefficients(self.model.alphas_cumprod, self.ddim_timesteps, ddim_eta)
        self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas = (
            alphas.to(device), alphas_prev.to(device), sigmas.to(device))
        if verbose:
            print(f"Selected timesteps for ddim sampler: {self.ddim_timesteps}")

    def _noise(self, x: torch.Tensor, generator: Optional[torch.Generator], temperature: float) -> torch.Tensor:
        # Drawn at every step even when sigma is 0, as the original does, so that the random stream (and so the
        # next image of a multi-image run) stays the same as the original's for the same seed.
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * temperature

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Optional[Callable[[int], None]] = None, img_callback: Optional[Callable] = None,
               eta: float = 0., temperature: float = 1., verbose: bool = True, x_T: Optional[torch.Tensor] = None,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.,
               unconditional_conditioning: Any = None, generator: Optional[torch.Generator] = None,
               disable_progress: bool = False, mask: Optional[torch.Tensor] = None,
               x0: Optional[torch.Tensor] = None, **unsupported: Any) -> tuple[torch.Tensor, dict[str, list]]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W). Returns ``(samples, intermediates)``.

        ``mask`` and ``x0`` as in the original: where ``mask`` is 1 the latent is replaced, before every step, by
        ``x0`` noised to that step's timestep (fresh noise from ``generator``), so only ``mask == 0`` is
        generated. Note the original's convention: 1 = keep, the opposite of an inpainting mask."""
        unsupported = {k: v for k, v in unsupported.items() if v not in (None, False, 0., 1.)}
        if unsupported:
            raise NotImplementedError(f"{type(self).__name__}.sample: unsupported options {sorted(unsupported)}")
        if isinstance(conditioning, torch.Tensor) and conditioning.shape[0] != batch_size:
            print(f"Warning: Got {conditioning.shape[0]} conditionings but batch-size is {batch_size}")
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=False)
        C, H, W = shape
        if verbose:
            print(f"Data shape for {self.progress_label.split()[0]} sampling is {(batch_size, C, H, W)}, eta {eta}")
        device = self.model.alphas_cumprod.device
        img = x_T if x_T is not None else torch.randn(
            (batch_size, C, H, W), generator=generator, device=device)
        run = GuidedRun(conditioning, unconditional_conditioning, unconditional_guidance_scale, generator, temperature,
                        _known(mask, x0))
        return self._loop(img, run, callback, img_callback, log_every_t, disable_progress, self.ddim_timesteps)

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False,
                          noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise ``x0`` to position ``t`` (a tensor of indices) of the DDIM schedule made by ``make_schedule``:
        sqrt(ddim_alphas[t]) x0 + sqrt(1 - ddim_alphas[t]) noise (eq. 4 of Ho et al. 2020 at timestep
        ``ddim_timesteps[t]``); ``use_original_steps`` indexes the 1000-step schedule instead.

        The original img2img passes ``t = int(strength * S)``, which is S at strength 1 and indexes past the
        schedule (the original crashes there). Index S here means pure noise (alpha 0), the start of txt2img."""
        if use_original_steps:
            alphas = self.model.alphas_cumprod.float()
        else:
            alphas = torch.cat([self.ddim_alphas, self.ddim_alphas.new_zeros(1)])
        noise = torch.randn_like(x0) if noise is None else noise
        a_t = extract_into_tensor(alphas.to(x0.device), t.to(x0.device), x0.shape)
        return a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False,
               callback: Optional[Callable[[int], None]] = None, generator: Optional[torch.Generator] = None,
               mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
               disable_progress: bool = False) -> torch.Tensor:
        """Denoise ``x_latent`` over the first ``t_start`` steps of the DDIM schedule, reversed: the timesteps
        ``ddim_timesteps[t_start - 1] .. ddim_timesteps[0]`` (the original's ``decode``; call ``make_schedule``
        first, with the eta to use). ``t_start = 0`` runs nothing and returns ``x_latent``. ``mask``/``x0`` as in
        ``sample``; ``generator`` feeds eta's noise and the mask's."""
        if use_original_steps:
            raise NotImplementedError("decode(use_original_steps=True): only the DDIM schedule of make_schedule")
        if not 0 <= t_start <= len(self.ddim_timesteps):
            raise ValueError(f"t_start must be in [0, {len(self.ddim_timesteps)}], got {t_start}")
        run = GuidedRun(cond, unconditional_conditioning, unconditional_guidance_scale, generator, 1.0,
                        _known(mask, x0))
        img, _ = self._loop(x_latent, run, callback, None, 100, disable_progress, self.ddim_timesteps[:t_start])
        return img

    def _loop(self, img: torch.Tensor, run: "GuidedRun", callback: Optional[Callable],
              img_callback: Optional[Callable], log_every_t: int, disable_progress: bool,
              timesteps: np.ndarray) -> tuple[torch.Tensor, dict[str, list]]:
        """Steps at ``timesteps`` (ascending, a prefix of ``ddim_timesteps``), from the last one down."""
        intermediates: dict[str, list] = {"x_inter": [img], "pred_x0": [img]}
        time_range = np.flip(timesteps)
        total = len(time_range)
        for i, step in enumerate(tqdm(time_range, desc=self.progress_label, total=total, disable=disable_progress)):
            index = total - i - 1
            t = torch.full((img.shape[0],), int(step), device=img.device, dtype=torch.long)
            next_step = int(time_range[min(i + 1, total - 1)])
            if run.known is not None:
                img = self._paste_known(img, t, run)
            img, pred_x0 = self._step(img, t, index, next_step, run)
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    def _paste_known(self, img: torch.Tensor, t: torch.Tensor, run: "GuidedRun") -> torch.Tensor:
        """The original's ``img = q_sample(x0, t) * mask + (1 - mask) * img``, its noise from the run's generator."""
        keep, x0 = run.known
        acp = self.model.alphas_cumprod.to(img.device)
        noise = torch.randn(x0.shape, generator=run.generator, device=x0.device, dtype=x0.dtype)
        return q_sample(acp.sqrt(), (1 - acp).sqrt(), x0, t, noise) * keep + (1. - keep) * img

    def _update(self, x: torch.Tensor, e_t: torch.Tensor, index: int,
                run: "GuidedRun") -> tuple[torch.Tensor, torch.Tensor]:
        return ddim_step(x, e_t, self.ddim_alphas[index], self.ddim_alphas_prev[index], self.ddim_sigmas[index],
                         self._noise(x, run.generator, run.temperature))

    def _step(self, img: torch.Tensor, t: torch.Tensor, index: int, next_step: int,
              run: "GuidedRun") -> tuple[torch.Tensor, torch.Tensor]:
        """x_t -> (x_{t-1}, predicted x_0) for the step at schedule position ``index``."""
        return self._update(img, run.eps(self.model, img, t), index, run)


def _known(mask: Optional[torch.Tensor], x0: Optional[torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    if (mask is None) != (x0 is None):
        raise ValueError("mask and x0 go together: x0 is what mask == 1 keeps")
    return None if mask is None else (mask, x0)


@dataclass
class GuidedRun:
    """What stays fixed over one sampling run: conditioning, guidance, and the random stream."""
    c: Any
    uc: Any
    scale: float
    generator: Optional[torch.Generator]
    temperature: float
    known: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (mask, x0): 1 = paste x0 back (sample's mask)
    old_eps: list = field(default_factory=list)  # PLMS's eps history

    def eps(self, model: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_eps(model, x, t, self.c, self.uc, self.scale)
