"""What a ``LatentDiffusion`` learns to predict, and from which noisy input: one object per parameterization, chosen
once from the config, so the training step, validation and the samplers never ask which kind of model they hold.

* :class:`EpsObjective`, Stable Diffusion v1/XL (Ho et al. 2020): integer timesteps t uniform in [0, T), the
  latent noised as x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4), the target eps, optional min-SNR-gamma
  weights (Hang et al. 2023).
* :class:`FlowObjective`, FLUX.1 (rectified flow, Liu et al. 2023; Esser et al. 2024, "Scaling Rectified Flow
  Transformers", sec. 2): t in [0, 1], x_t = (1 - t) x_0 + t eps, the target the velocity eps - x_0. Training draws
  t from the densities users of sd-scripts, SimpleTuner and diffusers rely on (:data:`TIMESTEP_SAMPLING`); the
  samplers run the resolution-dependent shifted schedule of Black Forest Labs' reference code
  (:func:`flux_schedule`).
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch

from ldm.models.diffusion.losses import min_snr_weights
from ldm.models.diffusion.schedule import q_sample

TimestepSampling = Literal["uniform", "sigmoid", "shift", "flux_shift"]
#: How training draws t for a flow model. ``sigmoid``: sigmoid(s * n), n ~ N(0, 1) (the logit-normal density of
#: Esser et al. 2024, sec. 3.1, with scale s). ``shift``: that t moved by the fixed shift of SD3/FLUX schedulers,
#: t' = a t / (1 + (a - 1) t). ``flux_shift``: moved by the resolution-dependent shift the FLUX samplers use
#: (:func:`time_shift` with mu from the image's token count), sd-scripts' ``flux_shift``. ``uniform``: U(0, 1).
TIMESTEP_SAMPLING = ("uniform", "sigmoid", "shift", "flux_shift")


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    """exp(mu) / (exp(mu) + (1/t - 1)^sigma): t moved towards 1 (more noise) for large images (Esser et al. 2024,
    eq. 23, as Black Forest Labs' ``time_shift``). t = 0 stays 0 and t = 1 stays 1."""
    t = t.double()
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)  # float64: 1/0 is inf, and the result 0


def shift_mu(image_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15, base_tokens: int = 256,
             max_tokens: int = 4096) -> float:
    """The shift's mu, linear in the image's token count (256 tokens: ``base_shift``, 4096: ``max_shift``); a
    1024 px FLUX image has 4096 tokens."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (image_tokens - base_tokens)


def flux_schedule(steps: int, image_tokens: int, shift: bool = True, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> torch.Tensor:
    """The ``steps + 1`` times a FLUX sampler visits, from 1 (pure noise) to 0: linspace(1, 0), shifted by
    ``time_shift(mu(image_tokens), 1, t)`` when ``shift`` (dev; schnell runs it unshifted). Float64."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return time_shift(shift_mu(image_tokens, base_shift, max_shift), 1.0, t) if shift else t


class EpsObjective:
    """eps-prediction on the discrete DDPM schedule of ``model`` (its ``alphas_cumprod`` buffers)."""

    parameterization = "eps"

    def __init__(self, min_snr_gamma: Optional[float] = None):
        self.min_snr_gamma = min_snr_gamma

    def sample_t(self, model: Any, n: int, latent_shape: tuple[int, ...], device: torch.device,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.randint(0, model.num_timesteps, (n,), device=device, generator=generator).long()

    def noised(self, model: Any, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return q_sample(model.sqrt_alphas_cumprod, model.sqrt_one_minus_alphas_cumprod, z, t, noise)

    def target(self, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def weights(self, model: Any, t: torch.Tensor) -> Optional[torch.Tensor]:
        return min_snr_weights(model.alphas_cumprod[t], self.min_snr_gamma) if self.min_snr_gamma else None

    def fixed_timesteps(self, model: Any, n: int, device: torch.device) -> torch.Tensor:
        """``n`` timesteps spread over the schedule, for a loss comparable from one validation to the next."""
        return torch.linspace(50, model.num_timesteps - 50, n).long().to(device)


class FlowObjective:
    """Velocity prediction of a rectified flow; ``timestep_sampling`` as in :data:`TIMESTEP_SAMPLING`, with
    ``sigmoid_scale`` (s), ``discrete_flow_shift`` (a) and the resolution shift's ``base_shift``/``max_shift``.
    The latent's token count for ``flux_shift`` is its (h/2)(w/2) 2x2 patches."""

    parameterization = "flow"

    def __init__(self, timestep_sampling: TimestepSampling = "flux_shift", sigmoid_scale: float = 1.0,
                 discrete_flow_shift: float = 3.0, base_shift: float = 0.5, max_shift: float = 1.15):
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling {timestep_sampling!r}: one of {', '.join(TIMESTEP_SAMPLING)}")
        self.timestep_sampling, self.sigmoid_scale = timestep_sampling, sigmoid_scale
        self.discrete_flow_shift, self.base_shift, self.max_shift = discrete_flow_shift, base_shift, max_shift

    def sample_t(self, model: Any, n: int, latent_shape: tuple[int, ...], device: torch.device,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
        if self.timestep_sampling == "uniform":
            return torch.rand(n, device=device, generator=generator)
        t = torch.sigmoid(self.sigmoid_scale * torch.randn(n, device=device, generator=generator))
        if self.timestep_sampling == "shift":
            a = self.discrete_flow_shift
            t = a * t / (1 + (a - 1) * t)
        elif self.timestep_sampling == "flux_shift":
            tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
            t = time_shift(shift_mu(tokens, self.base_shift, self.max_shift), 1.0, t).to(t.dtype)
        return t

    def noised(self, model: Any, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        t = t.to(z.dtype).view(-1, *([1] * (z.ndim - 1)))
        return (1 - t) * z + t * noise

    def target(self, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - z

    def weights(self, model: Any, t: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def fixed_timesteps(self, model: Any, n: int, device: torch.device) -> torch.Tensor:
        return torch.linspace(0.1, 0.9, n, device=device)
