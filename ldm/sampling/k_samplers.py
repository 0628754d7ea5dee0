"""Euler and DPM-Solver++(2M) in the k-diffusion form (Karras et al. 2022), for eps-prediction models.

Three parts with one job each, after k-diffusion:

* ``EpsDenoiser`` turns ``model.apply_model`` (eps prediction at a discrete timestep) into the denoiser
  D(x; sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma)), with classifier-free guidance (``guided_eps``).
  Here x is the latent in k-diffusion form, x = x_0 + sigma * noise; the variance-preserving latent the UNet
  sees is x / sqrt(sigma^2 + 1).
* ``sample_euler`` and ``sample_dpmpp_2m``: stateless loops of (denoiser, x, sigmas); the schedule comes from
  ``k_schedules``. Running them on ``sigmas[k:]`` starts part-way (img2img, inpainting).
* ``EulerSampler`` and ``DPMPP2MSampler``: ``DDIMSampler``'s ``sample(S, batch_size, shape, ...)`` interface
  over a fixed schedule, plus ``denoise_from`` for a latent already noised to ``sigmas[start_step]``.

Reproduced diffusers (0.42) configurations, step for step (see tests/test_k_samplers.py):

* ``EulerSampler``: ``EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
  timestep_spacing="leading", steps_offset=1, prediction_type="epsilon", interpolation_type="linear")`` stepped
  with ``s_churn=0`` (SDXL's default scheduler).
* ``DPMPP2MSampler``: ``DPMSolverMultistepScheduler(same betas, use_karras_sigmas=True)`` with its defaults
  ``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``, ``lower_order_final=True``,
  ``euler_at_final=False``, ``final_sigmas_type="zero"``, no thresholding. diffusers keeps its latent in the
  variance-preserving form, x_vp = x / sqrt(sigma^2 + 1); the two agree at sigma = 0, i.e. on the final sample.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm import trange

from ldm.models.diffusion.ddim import guided_eps
from ldm.sampling.k_schedules import (img2img_start_step, init_noise_sigma, leading_sigmas,
                                              model_karras_sigmas, model_sigmas, sigma_to_t)

#: D(x; sigma) with the conditioning already bound.
Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
#: Called after each step as ``hook(i, x, denoised, sigma_next)``; a returned tensor replaces x.
StepHook = Callable[[int, torch.Tensor, torch.Tensor, float], Optional[torch.Tensor]]


class EpsDenoiser:
    """k-diffusion's denoiser for an eps-prediction DDPM (Karras et al. 2022, Table 1, VP column).

    The UNet's timestep for a sigma is ``sigma_to_t(sigma)``, rounded when ``quantize`` (the default): that is the
    integer timestep both reproduced diffusers schedulers pass to the UNet (leading spacing selects training
    timesteps; DPM++ rounds the timesteps of its Karras sigmas). ``quantize=False`` passes the fractional one.
    """

    def __init__(self, model: Any, quantize: bool = True):
        self.model = model
        self.quantize = quantize
        self.sigmas = model_sigmas(model.alphas_cumprod)  # float64 on the CPU, ascending in t
        self.log_sigmas = self.sigmas.log()

    def timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The UNet timestep for each sigma (float64)."""
        t = sigma_to_t(sigmas, self.log_sigmas)
        return t.round() if self.quantize else t

    def __call__(self, x: torch.Tensor, sigma: float, cond: Any = None, uncond: Any = None,
                 scale: float = 1.0) -> torch.Tensor:
        t = float(self.timesteps(torch.tensor([sigma])))
        t = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if self.quantize else torch.float32)
        eps = guided_eps(self.model, x / math.sqrt(sigma ** 2 + 1), t, cond, uncond, scale)
        return x - sigma * eps


def _after_step(hook: Optional[StepHook], i: int, x: torch.Tensor, denoised: torch.Tensor,
                sigma_next: float) -> torch.Tensor:
    out = hook(i, x, denoised, sigma_next) if hook is not None else None
    return x if out is None else out


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022,
    Algorithm 2, lines 7-8, with gamma = 0)."""
    d = (x - denoised) / sigma
    return x + d * (sigma_next - sigma)


def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, hook: Optional[StepHook] = None,
                 disable: bool = True, desc: str = "Euler") -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2 with S_churn = 0: deterministic Euler steps from sigmas[0] to sigmas[-1]."""
    for i in trange(len(sigmas) - 1, disable=disable, desc=desc):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        x = _after_step(hook, i, euler_step(x, denoised, sigma, sigma_next), denoised, sigma_next)
    return x


def dpmpp_2m_step(x: torch.Tensor, denoised: torch.Tensor, old_denoised: Optional[torch.Tensor],
                  sigma_prev: Optional[float], sigma: float, sigma_next: float) -> torch.Tensor:
    """One step of DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) in k-diffusion form.

    With lambda = -log sigma and h = lambda_next - lambda (eq. 8 in the data-prediction form):
        x_next = (sigma_next / sigma) x - (e^{-h} - 1) D,   D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},
    r = h_{i-1} / h. Without a previous prediction D = x0_i (first order, DPM-Solver++(1) = DDIM). To sigma = 0
    (h infinite) the step lands on x0_i, the first-order step that diffusers takes with final_sigmas_type "zero".
    """
    if sigma_next == 0:
        return denoised
    h = math.log(sigma / sigma_next)
    if old_denoised is None:
        d = denoised
    else:
        r = math.log(sigma_prev / sigma) / h
        d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (sigma_next / sigma) * x - math.expm1(-h) * d


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, hook: Optional[StepHook] = None,
                    disable: bool = True, desc: str = "DPM++ 2M") -> torch.Tensor:
    """DPM-Solver++(2M): a first-order first step, then second-order multistep steps; the history starts empty,
    so running on ``sigmas[k:]`` starts part-way exactly as diffusers does with ``set_begin_index(k)``."""
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable, desc=desc):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        sigma_prev = float(sigmas[i - 1]) if i > 0 else None
        x = dpmpp_2m_step(x, denoised, old_denoised, sigma_prev, sigma, sigma_next)
        x = _after_step(hook, i, x, denoised, sigma_next)
        old_denoised = denoised
    return x


class KSampler:
    """``DDIMSampler``'s interface over a sigma schedule (``make_schedule``) and a stateless loop (``loop``)."""

    progress_label = "k-sampler"
    loop: Callable[..., torch.Tensor]

    def __init__(self, model: Any, **kwargs: Any):
        self.model = model
        self.denoiser = EpsDenoiser(model)

    def make_schedule(self, S: int) -> torch.Tensor:
        """The S + 1 descending sigmas, ending at 0."""
        raise NotImplementedError

    def start_sigma(self, S: int, strength: float) -> tuple[int, float]:
        """(start_step, sigma) for img2img at ``strength`` (diffusers' convention, see ``img2img_start_step``):
        noise the encoded image as ``x0 + sigma * noise`` and pass it to ``denoise_from(x, S, start_step, ...)``."""
        start = img2img_start_step(S, strength)
        return start, float(self.make_schedule(S)[start])

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Optional[Callable] = None, img_callback: Optional[Callable] = None, eta: float = 0.,
               temperature: float = 1., verbose: bool = True, x_T: Optional[torch.Tensor] = None,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.,
               unconditional_conditioning: Any = None, generator: Optional[torch.Generator] = None,
               disable_progress: bool = False, **unsupported: Any) -> tuple[torch.Tensor, dict[str, list]]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) from unit noise ``x_T`` (drawn with ``generator``
        if not given), scaled by ``init_noise_sigma`` as diffusers' pipelines do. Returns ``(samples,
        intermediates)``. ``callback``, ``img_callback`` and ``intermediates`` are as in ``denoise_from``."""
        # The original scripts pass some options at their neutral values (mask=None, quantize_x0=False, ...).
        unsupported = {k: v for k, v in unsupported.items()
                       if v is not None and (isinstance(v, torch.Tensor) or v not in (False, 0., 1.))}
        if eta != 0.:
            unsupported["eta"] = eta
        if temperature != 1.:
            unsupported["temperature"] = temperature
        if unsupported:
            raise NotImplementedError(f"{type(self).__name__}.sample: unsupported options {sorted(unsupported)}")
        if verbose:
            print(f"Data shape for {self.progress_label} sampling is {(batch_size, *shape)}")
        sigmas = self.make_schedule(S)
        noise = x_T if x_T is not None else torch.randn(
            (batch_size, *shape), generator=generator, device=self.model.alphas_cumprod.device)
        return self.denoise_from(noise * init_noise_sigma(sigmas), S, 0, conditioning, unconditional_guidance_scale,
                                 unconditional_conditioning, callback, img_callback, log_every_t, disable_progress)

    @torch.no_grad()
    def denoise_from(self, x: torch.Tensor, S: int, start_step: int = 0, conditioning: Any = None,
                     unconditional_guidance_scale: float = 1., unconditional_conditioning: Any = None,
                     callback: Optional[Callable[[int, torch.Tensor, float], Optional[torch.Tensor]]] = None,
                     img_callback: Optional[Callable[[torch.Tensor, int], None]] = None, log_every_t: int = 100,
                     disable_progress: bool = False) -> tuple[torch.Tensor, dict[str, list]]:
        """Run steps ``start_step .. S-1`` of the S-step schedule on ``x``, a k-diffusion-form latent at noise level
        ``sigmas[start_step]`` (``x0 + sigma * noise``; at step 0 that is unit noise times ``init_noise_sigma``).

        After step i (counted in the full S-step schedule) ``img_callback(denoised, i)`` sees the predicted x0,
        then ``callback(i, x, sigma_next)`` sees the new latent at noise level ``sigma_next``; if it returns a
        tensor, that replaces x (inpainting pastes back ``x0_known + sigma_next * noise`` there). Unlike
        ``DDIMSampler``'s ``callback(i)``, it takes three arguments. ``intermediates`` holds the start latent and
        then the latent after the first step and after every step i with ``(S - 1 - i) % log_every_t == 0``
        ("x_inter", in k-diffusion form) with the matching predicted x0 ("pred_x0").
        """
        sigmas = self.make_schedule(S)
        if not 0 <= start_step < S:
            raise ValueError(f"start_step must be in [0, {S}), got {start_step}")
        intermediates: dict[str, list] = {"x_inter": [x], "pred_x0": [x]}

        def hook(j: int, x: torch.Tensor, denoised: torch.Tensor, sigma_next: float) -> Optional[torch.Tensor]:
            i = start_step + j
            if img_callback:
                img_callback(denoised, i)
            out = callback(i, x, sigma_next) if callback else None
            x = x if out is None else out
            if j == 0 or (S - 1 - i) % log_every_t == 0:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(denoised)
            return x

        denoiser = functools.partial(self.denoiser, cond=conditioning, uncond=unconditional_conditioning,
                                     scale=unconditional_guidance_scale)
        x = type(self).loop(denoiser, x, sigmas[start_step:], hook, disable_progress, self.progress_label)
        return x, intermediates


class EulerSampler(KSampler):
    """Euler (s_churn = 0) on the "leading" schedule: diffusers' ``EulerDiscreteScheduler`` as SDXL configures it."""

    progress_label = "Euler"
    loop = staticmethod(sample_euler)

    def make_schedule(self, S: int) -> torch.Tensor:
        return leading_sigmas(self.denoiser.sigmas, S, steps_offset=1)


class DPMPP2MSampler(KSampler):
    """DPM-Solver++(2M) on the Karras schedule: ``DPMSolverMultistepScheduler(use_karras_sigmas=True)``."""

    progress_label = "DPM++ 2M Karras"
    loop = staticmethod(sample_dpmpp_2m)

    def make_schedule(self, S: int) -> torch.Tensor:
        return model_karras_sigmas(self.denoiser.sigmas, S)
