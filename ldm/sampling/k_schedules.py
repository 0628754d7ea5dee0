"""Noise-level (sigma) schedules for the k-diffusion samplers, kept apart from the samplers that step them.

An eps-prediction DDPM seen the way of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based
Generative Models", Table 1, VP column) has, at training timestep t, the noise level
``sigma_t = sqrt((1 - abar_t) / abar_t)``. A schedule here is a descending float32 tensor of S + 1 sigmas that ends
with 0 (k-diffusion's convention): step i of a sampler goes from ``sigmas[i]`` to ``sigmas[i + 1]``.

The two schedules reproduce diffusers (0.42) exactly for Stable Diffusion's betas:

* ``leading_sigmas``: ``EulerDiscreteScheduler`` with ``timestep_spacing="leading"``, ``steps_offset=1``,
  ``interpolation_type="linear"``, no Karras/exponential/beta sigmas, ``final_sigmas_type="zero"`` (SDXL's config).
* ``karras_sigmas``: ``use_karras_sigmas=True`` (rho = 7, sigma_min/max from the model's schedule,
  ``final_sigmas_type="zero"``), as ``DPMSolverMultistepScheduler`` builds it; with scaled_linear betas diffusers
  rounds the timestep it gives the UNet for each sigma, which ``sigma_to_t(...).round()`` reproduces.
"""
from __future__ import annotations

import warnings

import torch


def model_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep t, ascending in t (float64, CPU)."""
    acp = alphas_cumprod.detach().cpu().double()
    return ((1 - acp) / acp).sqrt()


def sigma_to_t(sigmas: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of each sigma: linear interpolation of log sigma between the two neighbouring
    training timesteps, clamped to [0, T - 1] (diffusers' ``_sigma_to_t``, k-diffusion's ``sigma_to_t``).

    ``log_sigmas`` is ``model_sigmas(...).log()``, ascending in t. Rounding the result gives the timestep whose
    log sigma is nearest, since the interpolation is linear in log sigma.
    """
    log_sigma = sigmas.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return low + w


def leading_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> torch.Tensor:
    """Descending timesteps with "leading" spacing: ``arange(S) * (T // S) + steps_offset``, reversed.

    With ``steps_offset=1`` the one selection that passes the end of the schedule (S = T gives timestep T) is
    clamped to T - 1 with a warning; diffusers' interpolation clamps the sigma there in the same way.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, got {num_steps}")
    steps = torch.arange(num_steps - 1, -1, -1) * (num_train_timesteps // num_steps) + steps_offset
    if int(steps[0]) >= num_train_timesteps:
        warnings.warn(f"{num_steps} leading steps select timestep {int(steps[0])}, beyond the schedule's last "
                      f"({num_train_timesteps - 1}); using {num_train_timesteps - 1}", stacklevel=2)
        steps = steps.clamp(max=num_train_timesteps - 1)
    return steps


def leading_sigmas(sigmas_t: torch.Tensor, num_steps: int, steps_offset: int = 1) -> torch.Tensor:
    """The sigmas of the "leading" timesteps, then 0: diffusers' ``EulerDiscreteScheduler`` for SD/SDXL."""
    sigmas = sigmas_t[leading_timesteps(num_steps, len(sigmas_t), steps_offset)]
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: ``(sigma_max^(1/rho) + i/(S-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for i = 0 .. S-1 (a single step takes sigma_max), then 0. Computed in float64, returned as float32."""
    if num_steps < 1:
        raise ValueError(f"steps must be at least 1, got {num_steps}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def model_karras_sigmas(sigmas_t: torch.Tensor, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """``karras_sigmas`` between the model's smallest and largest sigma (diffusers' ``use_karras_sigmas=True``)."""
    return karras_sigmas(float(sigmas_t[0]), float(sigmas_t[-1]), num_steps, rho)


def init_noise_sigma(sigmas: torch.Tensor) -> float:
    """Standard deviation of the starting latent in k-diffusion form: sqrt(sigma_0^2 + 1).

    A data point with unit variance noised to sigma_0 has this spread. It is diffusers' ``init_noise_sigma`` for
    the "leading" Euler scheduler, and what ``DPMSolverMultistepScheduler``'s unit start latent (in the
    variance-preserving form, x_vp = x / sqrt(sigma^2 + 1)) becomes in k-diffusion form.
    """
    return float(sigmas[0].double() ** 2 + 1) ** 0.5


def img2img_start_step(num_steps: int, strength: float) -> int:
    """Index of the first of ``num_steps`` steps that img2img runs for ``strength`` in [0, 1] (diffusers'
    ``StableDiffusionImg2ImgPipeline.get_timesteps``): ``S - min(int(S * strength), S)``. The encoded image is
    noised to ``sigmas[start]`` and the last ``int(S * strength)`` steps are run."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    start = num_steps - min(int(num_steps * strength), num_steps)
    if start >= num_steps:
        raise ValueError(f"strength {strength} with {num_steps} steps leaves no step to run")
    return start
