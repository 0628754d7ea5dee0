"""Caches that take the frozen parts out of the training step: VAE posteriors of every training image (both
flips), and text embeddings of every caption when the text encoder is frozen.

The cache keeps the posterior's parameters, not one sample of it, so each step still draws a fresh latent as the
uncached path does: caching changes where the numbers come from, not what is trained.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class LatentCache:
    """(role, image id, flipped) -> posterior parameters ``[2C, h, w]``. A role is the batch key the images are
    served under (the model's ``first_stage_key`` and ``reg_`` + it); ``<role>_id`` and ``<role>_flip`` in a
    batch name the entry."""

    def __init__(self) -> None:
        self.params: dict[tuple[str, int, bool], torch.Tensor] = {}

    @torch.no_grad()
    def build(self, encode: Callable[[torch.Tensor], Any], images: Mapping[str, Sequence[Any]],
              to_tensor: Callable[[Any], torch.Tensor], flips: bool, device: torch.device,
              batch_size: int = 8) -> None:
        """Encode every image of every role (``to_tensor`` turns one stored image into ``[3, H, W]`` in [-1, 1]),
        as it is and, with ``flips``, mirrored."""
        for role, stored in images.items():
            by_shape: dict[tuple, list[int]] = {}
            for k in range(len(stored)):  # images of one shape are encoded together (aspect-ratio buckets)
                by_shape.setdefault(tuple(stored[k].shape), []).append(k)
            for ids in by_shape.values():
                for start in range(0, len(ids), batch_size):
                    chunk = ids[start:start + batch_size]
                    x = torch.stack([to_tensor(stored[k]) for k in chunk]).to(device)
                    for flip in ((False, True) if flips else (False,)):
                        params = encode(x.flip(-1) if flip else x).parameters
                        for row, k in enumerate(chunk):
                            self.params[(role, k, flip)] = params[row]

    def posterior(self, batch: Mapping[str, Any], roles: Sequence[str]) -> DiagonalGaussianDistribution:
        rows = []
        for role in roles:
            ids, flips = batch[f"{role}_id"], batch[f"{role}_flip"]
            rows += [self.params[(role, int(i), bool(f))] for i, f in zip(ids, flips)]
        return DiagonalGaussianDistribution(torch.stack(rows))


def _row(parts: Any, i: int) -> Any:
    """Sample ``i`` of a text-parts structure (a tensor, or lists/tuples of tensors and None, batch first)."""
    if isinstance(parts, torch.Tensor):
        return parts[i]
    if parts is None:
        return None
    return type(parts)(_row(p, i) for p in parts)


def _stack(rows: Sequence[Any]) -> Any:
    """The inverse of ``_row`` over a batch of samples."""
    first = rows[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(rows))
    if first is None:
        return None
    return type(first)(_stack([r[k] for r in rows]) for k in range(len(first)))


class TextCache:
    """caption -> the text parts of its conditioning (SD v1: a ``[77, D]`` embedding; SDXL: both encoders'
    outputs), for frozen text encoders."""

    def __init__(self) -> None:
        self.embeddings: dict[str, Any] = {}

    @torch.no_grad()
    def build(self, embed: Callable[[list[str]], Any], captions: Sequence[str]) -> None:
        unique = list(dict.fromkeys(captions))
        for start in range(0, len(unique), 16):
            chunk = unique[start:start + 16]
            parts = embed(chunk)
            for i, caption in enumerate(chunk):
                self.embeddings[caption] = _row(parts, i)

    def __call__(self, captions: Sequence[str]) -> Any:
        return _stack([self.embeddings[c] for c in captions])
