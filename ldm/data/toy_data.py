"""The toy world as training data: captioned 64 px scenes written by ``scripts/make_toy_world.py`` (see
``ldm.data.toy_world``), for pretraining the toy autoencoder and latent diffusion model through ``main.py``.

Items carry the same keys as the DreamBooth dataset's subject half (``image``, ``caption``, ``image_id``,
``image_flip``), so one ``LatentDiffusion`` training step and the latent cache serve both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import Dataset

from ldm.data.dreambooth import CAPTION_KEY, IMAGE_KEY
from ldm.data.image_loading import ImageError, uint8_to_tensor
from ldm.data.loader import ResumableBatchSampler, ResumableLoader, batches_done
from ldm.data.toy_world import read_records


def recolour(pixels: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """A random hue rotation and saturation scale of an ``[H, W, 3]`` uint8 picture (HSV space): the toy world has
    five object colours and five places, and an autoencoder trained on them alone maps every other colour (the
    demo robot's teal, its pastel backdrops) into that palette. Trained on recoloured scenes too, it reproduces
    any colour; the diffusion model, whose captions name colours, trains on the scenes as they are."""
    hue = int(torch.randint(0, 256, (), generator=generator))
    saturation = 0.5 + float(torch.rand((), generator=generator))
    hsv = np.asarray(Image.fromarray(pixels).convert("HSV"), dtype=np.int32)
    hsv[..., 0] = (hsv[..., 0] + hue) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB"))


class ToyWorldDataset(Dataset):
    """Every scene of a toy-world folder, decoded once into one ``[N, H, W, 3]`` uint8 array (6000 scenes at
    64 px: 74 MB). No flips: left and right matter little here, and the world is large enough without them.
    ``recolour_p``: the share of items served recoloured (:func:`recolour`; for the autoencoder)."""

    flip_p = 0.0

    def __init__(self, root: str | Path, limit: Optional[int] = None, recolour_p: float = 0.0) -> None:
        root = Path(root)
        if not (root / "captions.jsonl").is_file():
            raise ImageError(f"data.params.root {root}: no toy world here (captions.jsonl missing); write one with "
                             f"python scripts/make_toy_world.py --out {root}")
        records = read_records(root)[:limit]
        first = np.asarray(Image.open(root / records[0]["file"]).convert("RGB"))
        self.images = np.empty((len(records), *first.shape), dtype=np.uint8)
        for k, record in enumerate(records):
            with Image.open(root / record["file"]) as im:
                self.images[k] = np.asarray(im.convert("RGB"))
        self.captions = [r["caption"] for r in records]
        self.recolour_p = recolour_p

    def __len__(self) -> int:
        return len(self.images)

    def images_by_role(self) -> dict[str, np.ndarray]:
        return {IMAGE_KEY: self.images}

    def all_captions(self) -> list[str]:
        return list(self.captions)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = index if isinstance(index, tuple) else (index, None)
        pixels = self.images[i]
        if self.recolour_p > 0:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            if float(torch.rand((), generator=generator)) < self.recolour_p:
                pixels = recolour(pixels, generator if generator is not None else torch.Generator().manual_seed(i))
        return {IMAGE_KEY: uint8_to_tensor(pixels), CAPTION_KEY: self.captions[i],
                f"{IMAGE_KEY}_id": i, f"{IMAGE_KEY}_flip": False}


class ToyWorldDataModule(pl.LightningDataModule):
    """``root``: a folder written by ``scripts/make_toy_world.py``; ``limit`` uses only its first scenes;
    ``recolour_p``: see :class:`ToyWorldDataset`."""

    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 0, limit: Optional[int] = None,
                 recolour_p: float = 0.0, seed: int = 23) -> None:
        super().__init__()
        self.root, self.batch_size, self.num_workers, self.limit, self.seed = root, batch_size, num_workers, limit, seed
        self.recolour_p = recolour_p
        self.train_dataset: Optional[ToyWorldDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is None:
            self.train_dataset = ToyWorldDataset(self.root, self.limit, self.recolour_p)
            rank_zero_info(f"Toy world: {len(self.train_dataset)} scenes from {self.root}")

    def train_dataloader(self) -> ResumableLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before train_dataloader()")
        sampler = ResumableBatchSampler(len(self.train_dataset), self.batch_size, self.seed, drop_last=True)
        return ResumableLoader(self.train_dataset, batch_sampler=sampler, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                               batches_done=lambda: batches_done(self.trainer))
