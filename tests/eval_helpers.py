"""Tiny random stand-ins for the evaluation models (CLIP, DINO ViT-S/16, LPIPS AlexNet), saved in the file
layouts of the real downloads so the embedders' local-file loading is what the tests run.

Shared by tests/test_eval_metrics.py (the embedders against transformers / lpips) and tests/test_reproduce.py
(the evaluation scripts end to end).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.eval.embedders import ALEXNET_FILE, LpipsNetwork


def noise_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A uniform-noise RGB image of ``size`` (width, height), the same for the same seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_clip_folder(folder: Path) -> Path:
    """A tiny random CLIPModel with the files of openai/clip-vit-base-patch32 (config, weights, preprocessor
    config in the original's old key style, vocab.json and merges.txt of a byte-level BPE without merges)."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 32}))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    return folder


def make_dino_folder(folder: Path) -> Path:
    """A tiny random ViTModel (32 px, 16 px patches) saved with a pooler, which the DINO embedder must skip."""
    from transformers import ViTConfig, ViTModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, qkv_bias=True)
    ViTModel(config).save_pretrained(folder)
    return folder


def make_lpips_files(folder: Path, lin_name: str = "lins.pth") -> tuple[Path, Path]:
    """A random AlexNet saved in torchvision's layout (with a classifier the loader must ignore) and random
    non-negative linear weights (the released ones are clamped non-negative too) in the lpips package's, both
    in the legacy (non-zip) format of the released lpips file, which cannot be memory-mapped.

    Returns ``(folder, linear weights file)``. With ``lin_name="alex.pth"`` the folder alone is a complete
    ``Lpips(folder)`` (what the scripts' ``--lpips`` flag takes); the default name leaves the linear weights to
    be passed explicitly, so the installed lpips package's file is not picked up by accident either way.
    """
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = LpipsNetwork()
    backbone = {f"features.{k}": v for k, v in net.net.features.state_dict().items()}
    backbone["classifier.1.weight"] = torch.randn(4, 9216)
    torch.save(backbone, folder / ALEXNET_FILE, _use_new_zipfile_serialization=False)
    lins = {k: v.abs() for k, v in net.lins.state_dict().items()}
    torch.save(lins, folder / lin_name, _use_new_zipfile_serialization=False)
    return folder, folder / lin_name
