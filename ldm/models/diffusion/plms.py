"""PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", Algorithm 2).

A linear multistep method on eps: each step combines the current and up to three previous eps predictions with
Adams-Bashforth weights, then moves with the DDIM (eta = 0) update. The first step uses a pseudo improved-Euler
(Heun) step, which costs one extra model evaluation. It reuses DDIM's timesteps, guidance and step.
"""
from __future__ import annotations

import torch

from ldm.models.diffusion.ddim import DDIMSampler, GuidedRun

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

    def _step(self, img: torch.Tensor, t: torch.Tensor, index: int, next_step: int,
              run: GuidedRun) -> tuple[torch.Tensor, torch.Tensor]:
        e_t = run.eps(self.model, img, t)
        if not run.old_eps:
            # Pseudo improved Euler: average eps at t and at the point a DDIM step lands on.
            x_prev, _ = self._update(img, e_t, index, run)
            e_prime = (e_t + run.eps(self.model, x_prev, torch.full_like(t, next_step))) / 2
        else:
            e_prime = multistep_eps(e_t, run.old_eps)
        run.old_eps = (run.old_eps + [e_t])[-3:]
        return self._update(img, e_prime, index, run)
