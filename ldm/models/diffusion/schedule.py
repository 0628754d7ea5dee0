"""The DDPM noise schedule (Ho et al. 2020) as named coefficient buffers, and the maths that only needs them.

Everything is computed in float64 and stored as float32, which is how the original
``DDPM.register_schedule`` produced the buffers saved in every Stable Diffusion v1 checkpoint.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

BetaSchedule = Literal["linear", "cosine", "sqrt_linear", "sqrt"]

#: Buffers that the original DDPM registers (and saves) at the top level of the state dict.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def make_beta_schedule(schedule: BetaSchedule, n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """Betas in float64. SD v1 uses "linear", which is linear in sqrt(beta) space."""
    if schedule == "linear":
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "cosine":  # Nichol & Dhariwal 2021, eq. 17
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    raise ValueError(f"unknown beta_schedule {schedule!r} (expected linear, cosine, sqrt_linear or sqrt)")


def schedule_coefficients(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every named coefficient of Ho et al. 2020 (eqs. 4, 6, 7) from the betas, in float64."""
    alphas = 1.0 - betas
    acp = np.cumprod(alphas, axis=0)
    acp_prev = np.append(1.0, acp[:-1])
    # v_posterior = 0: the posterior variance is beta-tilde of eq. 7.
    posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
    return {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": np.sqrt(acp),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
        "log_one_minus_alphas_cumprod": np.log(1.0 - acp),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1),
        "posterior_variance": posterior_variance,
        # log(0) at t=0 is clipped, as in the original, so the buffer stays finite.
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
    }


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Gather ``a[t]`` per batch element and shape it to broadcast against ``x_shape``."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def register_schedule(module: nn.Module, beta_schedule: BetaSchedule = "linear", timesteps: int = 1000,
                      linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3,
                      given_betas: Optional[np.ndarray] = None, persistent: bool = True) -> None:
    """Register the twelve schedule buffers on ``module`` under their original names (float32); ``persistent``
    puts them in the state dict, as SD v1 files have them (SDXL files do not)."""
    betas = np.asarray(given_betas, dtype=np.float64) if given_betas is not None else make_beta_schedule(
        beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
    coefs = schedule_coefficients(betas)
    for name in SCHEDULE_BUFFERS:
        # On the CPU even inside ``torch.device("meta")``: a model built on the meta device and filled from a file
        # that has no schedule (SDXL) must still have real buffers; files that have them replace these.
        module.register_buffer(name, torch.tensor(coefs[name], dtype=torch.float32, device="cpu"),
                               persistent=persistent)
    module.num_timesteps = int(betas.shape[0])
    module.linear_start, module.linear_end = linear_start, linear_end


def q_sample(sqrt_alphas_cumprod: torch.Tensor, sqrt_one_minus_alphas_cumprod: torch.Tensor,
             x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0) (Ho et al. 2020, eq. 4): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return (extract_into_tensor(sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """x_0 from x_t and the predicted noise, inverting eq. 4 of Ho et al. 2020:
    x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t). ``alpha_cumprod`` broadcasts against ``x_t``."""
    return (x_t - (1 - alpha_cumprod).sqrt() * eps) / alpha_cumprod.sqrt()
