"""Evaluation of DreamBooth (Ruiz et al., CVPR 2023, Sec. 4): the benchmark dataset, the embedders, the metrics.

``dataset`` reads the 30-subject benchmark, ``embedders`` wraps CLIP, DINO and LPIPS loaded from local files,
``metrics`` holds the scores (DINO, CLIP-I, CLIP-T, PRES, DIV) as pure functions of embeddings and distances.
"""
from ldm.eval.dataset import Subject, class_prompt, prompts_for, real_images, subjects
from ldm.eval.embedders import ClipEmbedder, DinoEmbedder, Lpips, ModelFilesError
from ldm.eval.metrics import (clip_i_score, clip_t_score, dino_score, div_score, mean_pairwise_cosine,
                              mean_pairwise_distance, pres_score, prompt_for_clip_t)

__all__ = [
    "Subject", "class_prompt", "prompts_for", "real_images", "subjects",
    "ClipEmbedder", "DinoEmbedder", "Lpips", "ModelFilesError",
    "clip_i_score", "clip_t_score", "dino_score", "div_score", "mean_pairwise_cosine", "mean_pairwise_distance",
    "pres_score", "prompt_for_clip_t",
]
