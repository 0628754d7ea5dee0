"""PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", Algorithm 2).

A linear multistep method on eps: each step combines the current and up to three previous eps predictions with
Adams-Bashforth weights, then moves with the DDIM (eta = 0) update. The first step uses a pseudo improved-Euler
(Heun) step, which costs one extra model evaluation. It reuses DDIM's timesteps, guidance and step.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from ldm.models.diffusion.ddim import DDIMSampler, ddim_step, guided_eps

#: Adams-Bashforth coefficients on (e_t, e_{t-1}, e_{t-2}, e_{t-3}) for orders 2, 3 and 4.
ADAMS_BASHFORTH = {1: ((3, -1), 2), 2: ((23, -16, 5), 12), 3: ((55, -59, 37, -9), 24)}


def multistep_eps(e_t: torch.Tensor, old_eps: list[torch.Tensor]) -> torch.Tensor:
    """Combine the newest eps with up to three earlier ones (newest last in ``old_eps``)."""
    weights, denom = ADAMS_BASHFORTH[min(len(old_eps), 3)]
    history = [e_t] + old_eps[::-1]
    return sum(w * e for w, e in zip(weights, history)) / denom


class PLMSSampler(DDIMSampler):
    """Same interface as ``DDIMSampler``; ``eta`` must be 0."""

    progress_label = "PLMS Sampler"

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def _loop(self, img: torch.Tensor, c: Any, uc: Any, scale: float, temperature: float,
              generator: Optional[torch.Generator], callback: Optional[Callable], img_callback: Optional[Callable],
              log_every_t: int, disable_progress: bool) -> tuple[torch.Tensor, dict[str, list]]:
        intermediates: dict[str, list] = {"x_inter": [img], "pred_x0": [img]}
        time_range = np.flip(self.ddim_timesteps)
        total = len(time_range)
        old_eps: list[torch.Tensor] = []

        def step_from(x: torch.Tensor, e: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            return ddim_step(x, e, self.ddim_alphas[index], self.ddim_alphas_prev[index],
                             self.ddim_sigmas[index], self._noise(x, generator, temperature))

        for i, step in enumerate(tqdm(time_range, desc=self.progress_label, total=total, disable=disable_progress)):
            index = total - i - 1
            t = torch.full((img.shape[0],), int(step), device=img.device, dtype=torch.long)
            e_t = guided_eps(self.model, img, t, c, uc, scale)
            if not old_eps:
                # Pseudo improved Euler: average eps at t and at the point a DDIM step lands on.
                next_step = time_range[min(i + 1, total - 1)]
                t_next = torch.full_like(t, int(next_step))
                x_prev, _ = step_from(img, e_t, index)
                e_prime = (e_t + guided_eps(self.model, x_prev, t_next, c, uc, scale)) / 2
            else:
                e_prime = multistep_eps(e_t, old_eps)
            img, pred_x0 = step_from(img, e_prime, index)
            old_eps = (old_eps + [e_t])[-3:]
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates
