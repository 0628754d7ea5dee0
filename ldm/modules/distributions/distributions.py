"""The diagonal Gaussian posterior q(z|x) of the KL autoencoder.

Reproduces CompVis latent-diffusion's ``DiagonalGaussianDistribution``: the encoder's output is split along
channels into mean and log-variance, the log-variance is clamped to [-30, 20], and samples use the
reparameterisation z = mu + sigma * eps (Kingma & Welling, "Auto-Encoding Variational Bayes", 2014).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) over (B, C, H, W) latents, built from ``parameters`` of shape (B, 2C, H, W).

    With ``deterministic=True`` the variance is zero: ``sample()`` returns the mean and ``kl()`` / ``nll()``
    are zero.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # The clamp keeps exp() finite in both directions (exp(20) ~ 4.9e8, exp(-30) ~ 9.4e-14); the
        # released weights were trained with it, so it is part of the model.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw z = mean + std * eps with eps ~ N(0, I) on the distribution's own device and dtype.

        ``generator`` (optional) must live on that device; it makes the draw reproducible.
        """
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per batch element, summed over C, H, W; ``other`` defaults to N(0, I).

        Closed form for diagonal Gaussians:
        0.5 * sum((mu1 - mu2)^2 / var2 + var1 / var2 - 1 - logvar1 + logvar2).
        """
        if self.deterministic:
            # The original returns a 1-element tensor on the CPU; a per-sample zero on the right device
            # broadcasts the same way and does not move a loss across devices.
            return self.mean.new_zeros(self.mean.shape[0])
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``:
        0.5 * sum(log(2 pi) + logvar + (x - mu)^2 / var)."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
            dim=list(dims),
        )

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean
