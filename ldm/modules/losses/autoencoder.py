"""The training objective of the KL autoencoder, without learned parts (so the first stage's state dict keeps
exactly the keys of the released checkpoints).

Rombach et al. 2022 (sec. 3, appendix G) train the first stage with a reconstruction term (L1 + LPIPS), a patch
discriminator and a small KL penalty towards N(0, I). For the toy world (flat colours, 64 px) the L1 term and the
KL penalty are enough: the penalty keeps the latent's scale near 1, which ``scale_factor`` then fixes exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class ReconstructionKL(nn.Module):
    """``l1_weight * |x - x_rec| + l2_weight * (x - x_rec)^2`` (means over pixels) ``+ kl_weight * KL(q(z|x) || N(0, I))``
    (summed over the latent, averaged over the batch, as the original's ``kl_loss``)."""

    def __init__(self, kl_weight: float = 1e-6, l1_weight: float = 1.0, l2_weight: float = 0.0) -> None:
        super().__init__()
        if min(kl_weight, l1_weight, l2_weight) < 0 or l1_weight + l2_weight == 0:
            raise ValueError("ReconstructionKL: weights must be >= 0 and l1_weight + l2_weight > 0")
        self.kl_weight, self.l1_weight, self.l2_weight = kl_weight, l1_weight, l2_weight

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                posterior: DiagonalGaussianDistribution) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        diff = inputs.float() - reconstructions.float()
        rec = self.l1_weight * diff.abs().mean() + self.l2_weight * diff.pow(2).mean()
        kl = posterior.kl().mean()
        loss = rec + self.kl_weight * kl
        return loss, {"loss": loss.detach(), "rec_loss": rec.detach(), "kl_loss": kl.detach()}
