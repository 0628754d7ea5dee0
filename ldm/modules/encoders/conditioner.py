"""SDXL's conditioner (Podell et al. 2023, "SDXL", sec. 2.2): a list of embedders, each turning one batch key
into cross-attention tokens or a vector, after sgm's ``GeneralConditioner``.

SDXL base uses five: CLIP ViT-L (``txt`` -> ``[B, 77, 768]``), OpenCLIP bigG (``txt`` -> ``[B, 77, 1280]`` and
pooled ``[B, 1280]``) and three ``ConcatTimestepEmbedderND`` for the micro-conditioning on image size and crop
(``[B, 2]`` -> ``[B, 512]`` each). Outputs are grouped by rank: 3-D into ``crossattn`` (``[B, 77, 2048]``), 2-D
into ``vector`` (``[B, 2816]``), concatenated in embedder order. Under a ``LatentDiffusion`` at attribute
``conditioner`` the keys are SDXL's ``conditioner.embedders.N.*``.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping, Sequence

import torch
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.util import instantiate_from_config

Size = tuple[int, int]
TEXT_KEY = "txt"
#: The micro-conditioning batch keys, (height, width) / (top, left) pairs.
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
OUTPUT_KEY_BY_NDIM = {2: "vector", 3: "crossattn", 4: "concat"}
CAT_DIM = {"vector": 1, "crossattn": 2, "concat": 1}


class ConcatTimestepEmbedderND(nn.Module):
    """Each number of a ``[B, n]`` tensor gets an ``outdim``-wide sinusoidal embedding (the UNet's timestep
    embedding: cos half first, i.e. diffusers' ``flip_sin_to_cos=True, downscale_freq_shift=0``); the n embeddings
    are concatenated to ``[B, n * outdim]``. SDXL's size and crop conditioning. A 1-D input counts as ``n = 1``."""

    def __init__(self, outdim: int) -> None:
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"expected [B, n] numbers, got shape {tuple(x.shape)}")
        emb = timestep_embedding(rearrange(x, "b n -> (b n)"), self.outdim)
        return rearrange(emb, "(b n) d -> b (n d)", b=x.shape[0])


def _disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train`` of a frozen embedder: Lightning's ``model.train()`` must not switch it out of eval mode."""
    return self


def _grad_context(embedder: nn.Module) -> Any:
    """No gradients through a frozen embedder, unless something in it trains: ``is_trainable``, or adapters
    (LoRA) added to a frozen text encoder."""
    if embedder.is_trainable or any(p.requires_grad for p in embedder.parameters()):
        return nullcontext()
    return torch.no_grad()


class GeneralConditioner(nn.Module):
    """sgm's conditioner: ``forward(batch)`` -> ``{"crossattn": [B, L, sum of widths], "vector": [B, sum]}``.

    ``emb_models`` is a list of configs, each ``target``/``params`` of an embedder plus ``input_key`` (or
    ``input_keys``, passed as positional arguments), ``is_trainable`` (default False: frozen, eval, run without
    gradients unless adapters added to it train) and ``ucg_rate`` (default 0: the probability, in training mode
    only, that a sample's condition is replaced by zeros, for classifier-free guidance). These settings become
    attributes of the embedder (``input_key``, ``input_keys``, ``is_trainable``, ``ucg_rate``), as in sgm.
    ``zero_empty_prompt``: the unconditional input of an empty negative prompt is zeros (SDXL base, diffusers'
    ``force_zeros_for_empty_prompt``), not the encoded empty prompt (FLUX.1: false).
    """

    def __init__(self, emb_models: Sequence[Mapping[str, Any]], zero_empty_prompt: bool = True) -> None:
        super().__init__()
        self.zero_empty_prompt = zero_empty_prompt
        embedders = []
        for config in emb_models:
            embedder = instantiate_from_config(config)
            if "input_key" in config:
                embedder.input_key, embedder.input_keys = config["input_key"], (config["input_key"],)
            elif "input_keys" in config:
                embedder.input_key, embedder.input_keys = None, tuple(config["input_keys"])
            else:
                raise KeyError(f"embedder {config['target']} needs 'input_key' or 'input_keys'")
            embedder.is_trainable = bool(config.get("is_trainable", False))
            embedder.ucg_rate = float(config.get("ucg_rate", 0.0))
            if not embedder.is_trainable:
                embedder.eval()
                embedder.train = _disabled_train.__get__(embedder)
                embedder.requires_grad_(False)
            embedders.append(embedder)
        self.embedders = nn.ModuleList(embedders)

    def embed_text(self, prompts: Sequence[str]) -> list[tuple[torch.Tensor, ...] | None]:
        """The outputs of the embedders that read ``txt`` (None for the others), in embedder order: what a text
        cache stores, and what ``forward(batch, precomputed=...)`` takes back."""
        out: list[tuple[torch.Tensor, ...] | None] = []
        for embedder in self.embedders:
            if TEXT_KEY not in embedder.input_keys:
                out.append(None)
                continue
            with _grad_context(embedder):
                embs = embedder(list(prompts))
            out.append(tuple(embs) if isinstance(embs, (tuple, list)) else (embs,))
        return out

    def forward(
        self, batch: Mapping[str, Any], force_zero_embeddings: Sequence[str] | None = None,
        precomputed: Sequence[tuple[torch.Tensor, ...] | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embed ``batch``; embedders whose input key is in ``force_zero_embeddings`` contribute zeros of their
        usual shape (SDXL's unconditional input: zero text embeddings, real size embeddings). ``precomputed``
        (from :meth:`embed_text`) stands in for the embedders it has an entry for.

        Caption dropout (``ucg_rate``, training mode only) draws one uniform number per sample and input key, so
        every embedder reading ``txt`` drops the same captions, cross-attention and pooled outputs alike (sgm draws
        per embedder and per output, which can drop one text encoder's tokens but keep the other's).
        """
        zero_keys = set(force_zero_embeddings or ())
        output: dict[str, torch.Tensor] = {}
        draws: dict[str, torch.Tensor] = {}
        for i, embedder in enumerate(self.embedders):
            if precomputed is not None and precomputed[i] is not None:
                embs = precomputed[i]
            else:
                with _grad_context(embedder):
                    embs = embedder(*(batch[k] for k in embedder.input_keys))
            for emb in embs if isinstance(embs, (tuple, list)) else (embs,):
                if zero_keys.intersection(embedder.input_keys):
                    emb = torch.zeros_like(emb)
                elif self.training and embedder.ucg_rate > 0:
                    key = embedder.input_keys[0]
                    if key not in draws:
                        draws[key] = torch.rand(emb.shape[0], device=emb.device)
                    keep = (draws[key] >= embedder.ucg_rate).to(emb.dtype)
                    emb = emb * keep.view(-1, *([1] * (emb.ndim - 1)))
                out_key = OUTPUT_KEY_BY_NDIM[emb.ndim]
                if out_key in output:
                    emb = torch.cat((output[out_key], emb), dim=CAT_DIM[out_key])
                output[out_key] = emb
        return output

    def get_unconditional_conditioning(
        self,
        batch_c: Mapping[str, Any],
        batch_uc: Mapping[str, Any] | None = None,
        force_uc_zero_embeddings: Sequence[str] | None = None,
        force_cond_zero_embeddings: Sequence[str] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(c, uc)`` for classifier-free guidance, without caption dropout. SDXL base: ``batch_uc`` with the
        negative prompts (or None to reuse ``batch_c``) and ``force_uc_zero_embeddings=["txt"]`` for an empty one."""
        was_training = self.training
        self.train(False)
        try:
            c = self(batch_c, force_cond_zero_embeddings)
            uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings)
        finally:
            self.train(was_training)
        return c, uc


def _per_sample(value: Size | Sequence[Size] | torch.Tensor, n: int, device: torch.device | None) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if t.ndim == 1:
        t = t.expand(n, -1)
    if t.shape != (n, 2):
        raise ValueError(f"expected a pair or {n} pairs, got shape {tuple(t.shape)}")
    return t


def sdxl_batch(
    prompts: Sequence[str],
    original_size: Size | Sequence[Size] | torch.Tensor = (1024, 1024),
    crop_coords_top_left: Size | Sequence[Size] | torch.Tensor = (0, 0),
    target_size: Size | Sequence[Size] | torch.Tensor = (1024, 1024),
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The batch SDXL's conditioner reads: ``txt`` and the three ``[B, 2]`` micro-conditioning tensors.

    Sizes are ``(height, width)`` in pixels and the crop is ``(top, left)``, as in sgm. A single pair applies to
    every prompt; inference normally passes the output size as both sizes and no crop.
    """
    n = len(prompts)
    return {
        "txt": list(prompts),
        "original_size_as_tuple": _per_sample(original_size, n, device),
        "crop_coords_top_left": _per_sample(crop_coords_top_left, n, device),
        "target_size_as_tuple": _per_sample(target_size, n, device),
    }
