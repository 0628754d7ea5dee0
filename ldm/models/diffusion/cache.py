"""Caches that take the frozen parts out of the training step: VAE posteriors of every training image (both
flips), and text embeddings of every caption when the text encoder is frozen.

The cache keeps the posterior's parameters, not one sample of it, so each step still draws a fresh latent as the
uncached path does: caching changes where the numbers come from, not what is trained.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ldm.data.image_loading import uint8_to_tensor
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class LatentCache:
    """(role, image id, flipped) -> posterior parameters ``[2C, h, w]``; roles are "image" and "reg_image"."""

    def __init__(self) -> None:
        self.params: dict[tuple[str, int, bool], torch.Tensor] = {}

    @torch.no_grad()
    def build(self, encode, dataset: Any, device: torch.device, batch_size: int = 8) -> None:
        flips = (False, True) if dataset.flip_p > 0 else (False,)
        for role, images in (("image", dataset.images), ("reg_image", dataset.reg_images)):
            if images is None:
                continue
            for start in range(0, len(images), batch_size):
                x = torch.stack([uint8_to_tensor(a) for a in images[start:start + batch_size]]).to(device)
                for flip in flips:
                    params = encode(x.flip(-1) if flip else x).parameters
                    for k in range(params.shape[0]):
                        self.params[(role, start + k, flip)] = params[k]

    def posterior(self, batch: Mapping[str, Any], roles: Sequence[str]) -> DiagonalGaussianDistribution:
        rows = []
        for role in roles:
            ids, flips = batch[f"{role}_id"], batch[f"{role}_flip"]
            rows += [self.params[(role, int(i), bool(f))] for i, f in zip(ids, flips)]
        return DiagonalGaussianDistribution(torch.stack(rows))


class TextCache:
    """caption -> ``[77, D]`` embedding, for a frozen text encoder."""

    def __init__(self) -> None:
        self.embeddings: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def build(self, embed, captions: Sequence[str]) -> None:
        unique = list(dict.fromkeys(captions))
        for start in range(0, len(unique), 16):
            chunk = unique[start:start + 16]
            for caption, e in zip(chunk, embed(chunk)):
                self.embeddings[caption] = e

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.embeddings[c] for c in captions])
