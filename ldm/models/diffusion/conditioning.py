"""What a ``LatentDiffusion`` conditions its UNet on, for each family: one small strategy object, chosen once in
``LatentDiffusion.__init__`` from the config, so nothing else in the code asks which family a model is.

Both turn prompts into *text parts* (what a text cache can store per caption) and text parts plus, for SDXL, the
image's size and crop into the UNet's conditioning: ``{"c_crossattn": [context]}`` (SD v1) or
``{"c_crossattn": [context], "y": vector}`` (SDXL), the keyword arguments of ``DiffusionWrapper.forward``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ldm.modules.encoders.conditioner import SIZE_KEYS, TEXT_KEY, GeneralConditioner, sdxl_batch

Sizes = Mapping[str, torch.Tensor]


class TextConditioning:
    """SD v1: the last hidden states of one CLIP text encoder (``cond_stage_model``), cross-attended to.

    The unconditional input of guidance is the encoded (negative) prompt, the empty prompt by default."""

    def __init__(self, encoder: nn.Module):
        self.module = encoder

    def text_encoders(self) -> dict[str, nn.Module]:
        """State-dict prefix -> transformer, for adapters (LoRA) and their file names."""
        return {"cond_stage_model.transformer.": self.module.transformer}

    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.module.encode(list(prompts))

    def condition(self, text: torch.Tensor, sizes: Optional[Sizes] = None) -> dict[str, Any]:
        return {"c_crossattn": [text]}

    def learned(self, text: torch.Tensor, sizes: Optional[Sizes] = None) -> torch.Tensor:
        """What ``get_learned_conditioning`` returns: the context tensor, as the original did."""
        return text

    def unconditional(self, negatives: Sequence[str], sizes: Optional[Sizes] = None) -> torch.Tensor:
        return self.text(negatives)

    def default_sizes(self, n: int, height: int, width: int, device: torch.device,
                      original: Optional[tuple[int, int]] = None) -> Optional[Sizes]:
        return None


class MicroConditioning:
    """sgm's conditioner (``GeneralConditioner``): its embedders' sequence outputs concatenated for the network's
    tokens (``c_crossattn``) and their vectors for ``y``. SDXL (Podell et al. 2023, sec. 2.2): two text encoders'
    hidden states for cross-attention, and a vector of the pooled text embedding plus embeddings of the original
    size, the crop's top-left corner and the target size; FLUX.1: T5's tokens and CLIP's pooled vector.

    With an empty negative prompt the text parts of the unconditional input are zeros when the conditioner says so
    (``zero_empty_prompt``: SDXL base, as diffusers' ``force_zeros_for_empty_prompt``); the size parts stay real."""

    def __init__(self, conditioner: GeneralConditioner):
        self.module = conditioner
        self.size_keys = [k for k in SIZE_KEYS if any(k in e.input_keys for e in conditioner.embedders)]

    def text_encoders(self) -> dict[str, nn.Module]:
        """State-dict prefix -> transformer of each text embedder (CLIP-L's ``transformer``, bigG's ``model``)."""
        out = {}
        for i, embedder in enumerate(self.module.embedders):
            if TEXT_KEY in embedder.input_keys:
                attr = "transformer" if hasattr(embedder, "transformer") else "model"
                out[f"conditioner.embedders.{i}.{attr}."] = getattr(embedder, attr)
        return out

    def text(self, prompts: Sequence[str]) -> list:
        return self.module.embed_text(prompts)

    def condition(self, text: list, sizes: Optional[Sizes] = None) -> dict[str, Any]:
        if sizes is None and self.size_keys:
            raise ValueError("an SDXL model needs the image size and crop (original_size_as_tuple, ...)")
        out = self.module({k: sizes[k] for k in self.size_keys}, precomputed=text)
        return {"c_crossattn": [out["crossattn"]], "y": out["vector"]}

    def learned(self, text: list, sizes: Optional[Sizes] = None) -> dict[str, Any]:
        return self.condition(text, sizes)

    def unconditional(self, negatives: Sequence[str], sizes: Optional[Sizes] = None) -> dict[str, Any]:
        if any(negatives) or not self.module.zero_empty_prompt:
            return self.condition(self.text(negatives), sizes)
        batch = {TEXT_KEY: list(negatives), **{k: sizes[k] for k in self.size_keys}}
        out = self.module(batch, force_zero_embeddings=[TEXT_KEY])
        return {"c_crossattn": [out["crossattn"]], "y": out["vector"]}

    def default_sizes(self, n: int, height: int, width: int, device: torch.device,
                      original: Optional[tuple[int, int]] = None) -> Sizes:
        """Inference: target size = the output size, original size = ``original`` (default: the output size),
        no crop."""
        batch = sdxl_batch([""] * n, original or (height, width), (0, 0), (height, width), device=device)
        return {k: batch[k] for k in SIZE_KEYS}


def batch_sizes(batch: Mapping[str, Any], roles: Sequence[str]) -> Optional[dict[str, torch.Tensor]]:
    """The size/crop tensors of a training batch for the given roles ('' for subject, 'reg_' for class examples),
    concatenated in that order; None when the batch has none (an SD v1 dataset)."""
    if SIZE_KEYS[0] not in batch:
        return None
    return {k: torch.cat([torch.as_tensor(batch[role + k]) for role in roles]) for k in SIZE_KEYS}
