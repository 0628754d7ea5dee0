"""DreamBooth's data: subject images with their identifier prompt, paired with class (prior) images.

DreamBooth (Ruiz et al. 2022, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation") fine-tunes on 3-30 photos captioned "a [V] [class noun]" while a prior-preservation loss on
images the original model generated for "a [class noun]" keeps the class from collapsing onto the subject.
Each item here is one subject example and, when class images are given, one class example, as in the
reference DreamBooth port; the model concatenates both in one forward pass and weights the prior term.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from ldm.data.image_loading import find_images, load_caption, load_image, uint8_to_tensor
from ldm.data.loader import ResumableLoader, ResumableSampler, batches_done

#: The batch keys this dataset writes: the model's ``first_stage_key`` / ``cond_stage_key`` name them, and class
#: examples carry the same keys with ``REG_PREFIX`` (``reg_image``); ``<image key>_id`` / ``_flip`` name the exact
#: pixels for the latent cache.
IMAGE_KEY, CAPTION_KEY, REG_PREFIX = "image", "caption", "reg_"
DEFAULT_SUBJECT_TEMPLATE = "photo of a {token} {class_word}"
DEFAULT_CLASS_TEMPLATE = "photo of a {class_word}"
# CLIP's ids are BPE merge ranks: the lower the id, the earlier (more frequent) the merge. Below this the
# token is a common word or name whose meaning fine-tuning would have to overwrite (and would damage).
FREQUENT_TOKEN_ID = 10000


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def check_identifier(token: str, tokenizer: _Tokenizer) -> list[str]:
    """Warnings about a DreamBooth identifier, empty if it is a good one (a single rare token like ``sks``).

    The paper picks identifiers from rare tokens: a token that splits into several pieces spreads the subject
    over tokens that also appear in other words, and a frequent word already means something strong.
    """
    if not token or not token.strip():
        raise ValueError("the identifier token is empty; pass a rare token such as 'sks'")
    ids = tokenizer.encode(token)
    if len(ids) > 1:
        pieces = ", ".join(repr(tokenizer.decode([i]).strip()) for i in ids)
        return [f"'{token}' splits into {len(ids)} CLIP tokens ({pieces}); a single rare token is easier "
                f"to bind to the subject: pick one such as 'sks'"]
    if ids and ids[0] < FREQUENT_TOKEN_ID:
        return [f"'{token}' is a frequent word in CLIP's vocabulary (id {ids[0]}); the model already has a "
                f"strong meaning for it: pick a rare token such as 'sks'"]
    return []


def _format(template: str, name: str, token: str, class_word: str) -> str:
    # Checked here so that a typo such as "{clas_word}" fails in __init__, not in a DataLoader worker.
    try:
        return template.format(token=token, class_word=class_word)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{name} {template!r}: only {{token}} and {{class_word}} may appear ({exc!r})") from None


def _load_folder(folder: str | Path, role: str, size: int, min_size: int | None,
                 default_caption: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Decode every image of a folder once: ``[N, size, size, 3]`` uint8, one caption per image, and ``[N, 4]``
    (original height, width, crop top, left) for SDXL's size conditioning.

    One stacked array (not N small ones) so that forked DataLoader workers share its pages copy-on-write.
    """
    paths = find_images(folder, role)
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    crops = np.empty((len(paths), 4), dtype=np.int64)
    captions = []
    for k, path in enumerate(paths):
        image, crop = load_image(path, size, min_size, with_crop=True)
        images[k] = np.asarray(image)
        crops[k] = (*crop.original_size, *crop.top_left)
        captions.append(load_caption(path) or default_caption)
    return images, captions, crops


class DreamBoothDataset(Dataset):
    """Subject images (``data_root``), optionally paired with class images (``reg_data_root``).

    Every image is decoded, resized and centre-cropped in ``__init__`` and kept in memory as uint8, so a bad
    file stops the run before the first step and ``__getitem__`` only flips and converts (5-30 subject plus
    ~200 class images at 512 px are ~160 MB).

    Length: ``n_subject * repeats`` epochs-worth of subject examples. With class images it is
    ``min(n_subject * repeats, n_class * reg_repeats)`` as in the reference port, which zips the two datasets
    and stops at the shorter, but at least ``n_subject`` so that every subject photo is seen each epoch.
    Item ``i`` uses subject image ``i % n_subject`` and class image ``i % n_class``: with a shuffled loader
    each subject image meets many class images over training.
    """

    def __init__(
        self,
        data_root: str | Path,
        token: str,
        class_word: str,
        reg_data_root: str | Path | None = None,
        size: int = 512,
        repeats: int = 100,
        reg_repeats: int = 10,
        flip_p: float = 0.5,
        subject_template: str = DEFAULT_SUBJECT_TEMPLATE,
        class_template: str = DEFAULT_CLASS_TEMPLATE,
        min_size: int | None = None,
    ) -> None:
        if not token or not token.strip():
            raise ValueError("token is empty; pass a rare identifier such as 'sks'")
        if not class_word or not class_word.strip():
            raise ValueError("class_word is empty; pass the subject's class, e.g. 'dog'")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p={flip_p} must be in [0, 1]")
        if repeats < 1 or reg_repeats < 1:
            raise ValueError(f"repeats={repeats} and reg_repeats={reg_repeats} must be >= 1")
        if "{token}" not in subject_template:
            raise ValueError(f"subject_template {subject_template!r} must contain {{token}}")
        if "{token}" in class_template:
            # The class prompts must not mention the identifier, or the prior loss would train it too.
            raise ValueError(f"class_template {class_template!r} must not contain {{token}}")
        self.token, self.class_word = token.strip(), " ".join(class_word.split())
        self.size, self.repeats, self.reg_repeats, self.flip_p = size, repeats, reg_repeats, flip_p
        subject_caption = _format(subject_template, "subject_template", self.token, self.class_word)
        class_caption = _format(class_template, "class_template", self.token, self.class_word)

        self.images, self.captions, self.crops = _load_folder(data_root, "--data_root", size, min_size,
                                                              subject_caption)
        self.reg_images: np.ndarray | None = None
        self.reg_captions: list[str] = []
        self.reg_crops: np.ndarray | None = None
        if reg_data_root is not None:
            self.reg_images, self.reg_captions, self.reg_crops = _load_folder(
                reg_data_root, "--reg_data_root", size, min_size, class_caption)

    @property
    def num_subject(self) -> int:
        return len(self.images)

    @property
    def num_class(self) -> int:
        return 0 if self.reg_images is None else len(self.reg_images)

    def __len__(self) -> int:
        subject_len = self.num_subject * self.repeats
        if self.reg_images is None:
            return subject_len
        return max(self.num_subject, min(subject_len, self.num_class * self.reg_repeats))

    def images_by_role(self) -> dict[str, np.ndarray]:
        """The decoded images under the batch key they are served as (``image``, ``reg_image``)."""
        out = {IMAGE_KEY: self.images}
        if self.reg_images is not None:
            out[REG_PREFIX + IMAGE_KEY] = self.reg_images
        return out

    def all_captions(self) -> list[str]:
        return list(self.captions) + list(self.reg_captions)

    def _example(self, image: np.ndarray, generator: torch.Generator | None) -> tuple[torch.Tensor, bool]:
        x = uint8_to_tensor(image)
        flip = self.flip_p > 0 and torch.rand((), generator=generator).item() < self.flip_p
        return (x.flip(-1) if flip else x), flip

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``i``, or ``(i, seed)`` from :class:`ResumableSampler`: the seed decides the random flips, so the
        same draw gives the same pixels in a resumed run (a plain ``i`` draws from torch's global generator)."""
        i, seed = index if isinstance(index, tuple) else (index, None)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        s = i % self.num_subject
        item = self._role("", self.images, self.captions, self.crops, s, generator)
        if self.reg_images is not None:
            item.update(self._role(REG_PREFIX, self.reg_images, self.reg_captions, self.reg_crops,
                                   i % self.num_class, generator))
        return item

    def _role(self, prefix: str, images: np.ndarray, captions: list[str], crops: np.ndarray, k: int,
              generator: torch.Generator | None) -> dict[str, Any]:
        """One example's entries under ``prefix`` ('' subject, 'reg_' class): pixels, caption, which pixels
        (``_id``/``_flip``, for the latent cache) and SDXL's size conditioning (the flip keeps a centred crop
        where it was)."""
        image, flip = self._example(images[k], generator)
        return {prefix + IMAGE_KEY: image, prefix + CAPTION_KEY: captions[k], f"{prefix}{IMAGE_KEY}_id": k,
                f"{prefix}{IMAGE_KEY}_flip": flip,
                f"{prefix}original_size_as_tuple": torch.as_tensor(crops[k, :2]),
                f"{prefix}crop_coords_top_left": torch.as_tensor(crops[k, 2:]),
                f"{prefix}target_size_as_tuple": torch.tensor([self.size, self.size])}


class DreamBoothDataModule(pl.LightningDataModule):
    """The training data of one DreamBooth run, built from the config's ``data.params`` or the CLI flags.

    ``seed`` fixes the order and the flips of every epoch (see ``ldm.data.loader``); the training module sets it
    from ``--seed``.
    """

    def __init__(
        self,
        data_root: str,
        token: str,
        class_word: str,
        reg_data_root: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        size: int = 512,
        repeats: int = 100,
        reg_repeats: int = 10,
        flip_p: float = 0.5,
        subject_template: str = DEFAULT_SUBJECT_TEMPLATE,
        class_template: str = DEFAULT_CLASS_TEMPLATE,
        min_size: int | None = None,
        seed: int = 23,
    ) -> None:
        super().__init__()
        self.data_root = data_root
        self.token = token
        self.class_word = class_word
        self.reg_data_root = reg_data_root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.size = size
        self.repeats = repeats
        self.reg_repeats = reg_repeats
        self.flip_p = flip_p
        self.subject_template = subject_template
        self.class_template = class_template
        self.min_size = min_size
        self.seed = seed
        self.train_dataset: DreamBoothDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build (once: Lightning calls setup per stage) and validate the dataset."""
        if self.train_dataset is not None:
            return
        self.train_dataset = DreamBoothDataset(
            self.data_root, self.token, self.class_word, reg_data_root=self.reg_data_root, size=self.size,
            repeats=self.repeats, reg_repeats=self.reg_repeats, flip_p=self.flip_p,
            subject_template=self.subject_template, class_template=self.class_template, min_size=self.min_size)
        ds = self.train_dataset
        rank_zero_info(f"DreamBooth data: {ds.num_subject} subject images ('{ds.captions[0]}'), "
                       f"{ds.num_class} class images, {len(ds)} items per epoch")

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before train_dataloader()")
        return ResumableLoader(
            self.train_dataset, batch_size=self.batch_size, num_workers=self.num_workers,
            sampler=ResumableSampler(len(self.train_dataset), self.seed),
            drop_last=False,  # the short last batch is real training data; nothing in the model needs a full one
            persistent_workers=self.num_workers > 0,  # workers hold the decoded images; do not refork each epoch
            pin_memory=torch.cuda.is_available(),
            batches_done=lambda: batches_done(self.trainer),
        )
