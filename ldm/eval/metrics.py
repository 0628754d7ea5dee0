"""DreamBooth's evaluation metrics as pure functions of embeddings and distances (no models here).

Ruiz et al., "DreamBooth" (CVPR 2023), Sec. 4.1 (subject fidelity, prompt fidelity) and Sec. 4.3 / Table 3
(prior preservation and diversity):

- DINO: mean pairwise cosine similarity between the ViT-S/16 DINO embeddings of generated and real images.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean cosine similarity between the CLIP embeddings of each generated image and of its prompt.
- PRES: mean pairwise DINO similarity between the subject's real images and images generated from the class
  prompt alone ("a dog"); lower means the prior kept its variety instead of collapsing onto the subject.
- DIV: mean LPIPS distance between images generated for the same prompt; higher means more diverse.

Embeddings are normalised here, whatever the caller did, so a score never depends on an embedder's scale.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")


def _unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty [N, D] tensor of embeddings, got shape {list(x.shape)}")
    # float64: the means below run over thousands of pairs, and a score should not depend on the dtype given.
    return F.normalize(x.detach().to(torch.float64), dim=-1)


def _check_dims(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]} (embeddings from different models?)")


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all ``N * M`` pairs of rows of ``a [N, D]`` and ``b [M, D]``.

    ``mean_{i,j} <a_i / |a_i|, b_j / |b_j|>``: the "average pairwise cosine similarity" of DreamBooth Sec. 4.1.
    """
    a, b = _unit_rows(a, "a"), _unit_rows(b, "b")
    _check_dims(a, b)
    return float((a @ b.T).mean())


def dino_score(generated: torch.Tensor, real: torch.Tensor) -> float:
    """DINO (DreamBooth Sec. 4.1): mean pairwise cosine between DINO ViT-S/16 CLS embeddings of generated and
    real subject images. Unlike CLIP-I it separates subjects of the same class (it is not trained to ignore
    instance details), which is why the paper prefers it for subject fidelity."""
    return mean_pairwise_cosine(generated, real)


def clip_i_score(generated: torch.Tensor, real: torch.Tensor) -> float:
    """CLIP-I (DreamBooth Sec. 4.1, after Gal et al. 2022): mean pairwise cosine between CLIP image embeddings
    of generated and real subject images."""
    return mean_pairwise_cosine(generated, real)


def clip_t_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """CLIP-T (DreamBooth Sec. 4.1): mean cosine between each generated image's CLIP embedding and its prompt's.

    ``text_emb`` is ``[N, D]`` (row ``i`` is the prompt of image ``i``) or ``[1, D]`` (one prompt for all).
    The prompts should have the identifier removed (:func:`prompt_for_clip_t`): CLIP does not know it.
    """
    images, texts = _unit_rows(image_emb, "image_emb"), _unit_rows(text_emb, "text_emb")
    _check_dims(images, texts)
    if texts.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"text_emb has {texts.shape[0]} rows; expected 1 or one per image ({images.shape[0]})")
    return float((images * texts).sum(dim=-1).mean())


def prompt_for_clip_t(prompt: str, token: str) -> str:
    """The prompt CLIP-T compares with: the identifier removed, ``"a sks dog in the snow" -> "a dog in the snow"``.

    Only the whole token is removed, with the whitespace before it (``"sksdog"`` is left alone). Raises
    ``ValueError`` when the token is absent: scoring with the wrong token would silently measure something else.
    """
    pattern = re.compile(r"\s*(?<!\w)" + re.escape(token) + r"(?!\w)")
    cleaned, count = pattern.subn("", prompt)
    if not token.strip() or count == 0:
        raise ValueError(f"identifier {token!r} is not a word of the prompt {prompt!r}")
    return cleaned.strip()


def pres_score(real_emb: torch.Tensor, class_prior_emb: torch.Tensor) -> float:
    """PRES (DreamBooth Sec. 4.3, Table 3): mean pairwise DINO cosine between the subject's real images and
    images generated from the class prompt alone ("a [class noun]"). Lower is better: a high value means the
    class prior has collapsed onto the subject (language drift)."""
    return mean_pairwise_cosine(real_emb, class_prior_emb)


def mean_pairwise_distance(items: Sequence[T], dist_fn: Callable[[T, T], float]) -> float:
    """Mean of ``dist_fn(items[i], items[j])`` over the ``n (n - 1) / 2`` unordered pairs ``i < j``.

    Each pair is evaluated once: LPIPS is symmetric, and counting ``(i, j)`` and ``(j, i)`` would only double
    the cost. Needs at least two items.
    """
    n = len(items)
    if n < 2:
        raise ValueError(f"need at least 2 items for a pairwise distance, got {n}")
    total = sum(float(dist_fn(items[i], items[j])) for i in range(n) for j in range(i + 1, n))
    return total / (n * (n - 1) / 2)


def div_score(images_per_prompt: Sequence[Sequence[T]], dist_fn: Callable[[T, T], float]) -> float:
    """DIV (DreamBooth Sec. 4.3, Table 3): mean LPIPS distance between images generated for the same prompt.

    ``images_per_prompt[k]`` holds the images of prompt ``k``; the score is the mean over prompts of
    :func:`mean_pairwise_distance` within each prompt (pairs across prompts are never compared, since different
    prompts are meant to differ). ``dist_fn`` is e.g. ``Lpips.distance``.
    """
    if not images_per_prompt:
        raise ValueError("no prompts given")
    return sum(mean_pairwise_distance(group, dist_fn) for group in images_per_prompt) / len(images_per_prompt)
