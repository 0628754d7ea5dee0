"""DreamBooth's data: subject images with their identifier prompt, paired with class (prior) images.

DreamBooth (Ruiz et al. 2022, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation") fine-tunes on 3-30 photos captioned "a [V] [class noun]" while a prior-preservation loss on
images the original model generated for "a [class noun]" keeps the class from collapsing onto the subject.
Each item here is one subject example and, when class images are given, one class example, as in the
reference DreamBooth port; the model concatenates both in one forward pass and weights the prior term.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from ldm.data.buckets import bucket_resolutions
from ldm.data.image_loading import (ImageError, find_images, load_caption, load_training_image, mask_path,
                                    nearest_target, uint8_to_tensor)
from ldm.data.loader import ResumableBatchSampler, ResumableLoader, batches_done

#: The batch keys this dataset writes: the model's ``first_stage_key`` / ``cond_stage_key`` name them, and class
#: examples carry the same keys with ``REG_PREFIX`` (``reg_image``); ``<image key>_id`` / ``_flip`` name the exact
#: pixels for the latent cache.
IMAGE_KEY, CAPTION_KEY, REG_PREFIX = "image", "caption", "reg_"
PRIOR_PREFIX = "prior_"  # prior_caption: the class prompt of prior_preservation: base_model
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


def check_concepts(concepts: Sequence["Concept"], tokenizer: _Tokenizer | None = None) -> list[str]:
    """Errors (``ValueError``) and warnings about several subjects in one run: two subjects with one identifier
    would be the same subject; an identifier that begins another one, or whose tokens are a run inside another's
    tokens, lets one subject bleed into the other."""
    seen: dict[str, int] = {}
    for k, concept in enumerate(concepts):
        if concept.token in seen:
            raise ValueError(f"concepts {seen[concept.token]} and {k} share the identifier '{concept.token}': "
                             f"give each subject its own")
        seen[concept.token] = k
    warnings = []
    for a in concepts:
        for b in concepts:
            if a is b:
                continue
            ids_a = tokenizer.encode(a.token) if tokenizer else []
            ids_b = tokenizer.encode(b.token) if tokenizer else []
            inside = bool(ids_a) and any(ids_b[i:i + len(ids_a)] == ids_a for i in range(len(ids_b) - len(ids_a) + 1))
            if b.token.startswith(a.token) or inside:
                warnings.append(f"identifier '{a.token}' is part of '{b.token}' (as text or as CLIP tokens): the "
                                f"two subjects may bleed into each other; pick unrelated rare tokens")
    return warnings


def _format(template: str, name: str, token: str, class_word: str) -> str:
    # Checked here so that a typo such as "{clas_word}" fails in __init__, not in a DataLoader worker.
    try:
        return template.format(token=token, class_word=class_word)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{name} {template!r}: only {{token}} and {{class_word}} may appear ({exc!r})") from None


@dataclass
class Concept:
    """One subject of a run: its photos, identifier and class, and where its class images are (and how many to
    generate there). A ``concepts.yaml`` is a list of these as mappings."""
    data_root: str
    token: str
    class_word: str
    reg_data_root: str | None = None
    num_class_images: int = 0

    def __post_init__(self) -> None:
        if not self.token or not str(self.token).strip():
            raise ValueError("token is empty; pass a rare identifier such as 'sks'")
        if not self.class_word or not str(self.class_word).strip():
            raise ValueError("class_word is empty; pass the subject's class, e.g. 'dog'")
        self.token, self.class_word = str(self.token).strip(), " ".join(str(self.class_word).split())


@dataclass
class ImageSet:
    """The decoded images of one folder: pixels (one ``[N, H, W, 3]`` array when all share a size, so forked
    DataLoader workers share its pages copy-on-write; else a list), captions, SDXL crops ``[N, 4]`` (original
    height, width, crop top, left), the target ``(w, h)`` each was fitted to, and optional loss masks."""
    images: np.ndarray | list[np.ndarray]
    captions: list[str]
    crops: np.ndarray
    targets: list[tuple[int, int]]
    masks: list[np.ndarray | None]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.captions)


def load_folder(folder: str | Path, role: str, targets: Sequence[tuple[int, int]], min_size: int | None,
                default_caption: str, with_masks: bool = False) -> ImageSet:
    """Decode every image of a folder once (every bad file stops here, with one line naming it)."""
    loaded = [(load_training_image(path, targets, min_size, with_mask=with_masks), path)
              for path in find_images(folder, role)]
    pixels = [image.pixels for image, _ in loaded]
    same = len({p.shape for p in pixels}) == 1
    return ImageSet(
        images=np.stack(pixels) if same else pixels,
        captions=[load_caption(path) or default_caption for _, path in loaded],
        crops=np.array([(*image.crop.original_size, *image.crop.top_left) for image, _ in loaded], dtype=np.int64),
        targets=[(p.shape[1], p.shape[0]) for p in pixels],
        masks=[image.mask for image, _ in loaded], paths=[path for _, path in loaded])


#: A mask pixel at least this white marks the subject.
SUBJECT_LEVEL = 0.5


def check_masks(subjects: ImageSet) -> None:
    """Loss masks without a single subject pixel (white = subject): all black, which is also what inverted or
    wrongly exported masks often become. Such a photo trains only at ``mask_floor`` weight, so each is named in a
    warning; when no mask has a subject pixel the run is refused (``ImageError``)."""
    given = [(path, mask) for path, mask in zip(subjects.paths, subjects.masks) if mask is not None]
    empty = [mask_path(path).name if mask_path(path).is_file() else f"{path.name} (alpha channel)"
             for path, mask in given if float(mask.max()) < SUBJECT_LEVEL]
    if not empty:
        return
    names = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
    where = subjects.paths[0].parent
    if len(empty) == len(given):
        raise ImageError(f"{where}: masked loss, but no mask has a subject pixel (white = subject): {names}; "
                         f"inverted or empty masks? fix them, or turn data.params.masked_loss off")
    rank_zero_warn(f"{where}: {len(empty)} of {len(given)} masks have no subject pixel (white = subject), so those "
                   f"photos train only at mask_floor weight: {names}")


def _concat(sets: Sequence[ImageSet]) -> ImageSet:
    images = [im for s in sets for im in s.images]
    same = len({im.shape for im in images}) == 1
    return ImageSet(np.stack(images) if same else images, [c for s in sets for c in s.captions],
                    np.concatenate([s.crops for s in sets]), [t for s in sets for t in s.targets],
                    [m for s in sets for m in s.masks], [p for s in sets for p in s.paths])


class DreamBoothDataset(Dataset):
    """Subject images (``data_root``), optionally paired with class images (``reg_data_root``); or several
    subjects (``concepts``), each paired with class images of its own class.

    Every image is decoded, fitted and kept in memory as uint8 in ``__init__``, so a bad file stops the run
    before the first step and ``__getitem__`` only flips and converts (5-30 subject plus ~200 class images at
    512 px are ~160 MB). Without ``buckets`` every image is the centre ``size x size`` square; with them, each is
    fitted to the aspect-ratio bucket closest to its own (``ldm.data.buckets``). With ``masks``, every subject
    example also carries a loss mask (``photo.mask.png`` or the alpha channel; all ones without either).

    Length: ``n_subject * repeats`` epochs-worth of subject examples. With class images it is
    ``min(n_subject * repeats, n_class * reg_repeats)`` as in the reference port, which zips the two datasets
    and stops at the shorter, but at least ``n_subject`` so that every subject photo is seen each epoch.
    Item ``i`` uses subject image ``i % n_subject`` (so consecutive items cycle through every subject's photos)
    and class image ``i % n`` of the ``n`` images of that subject's class in the bucket nearest to the subject
    image's: with a shuffled loader each subject image meets many class images over training.
    """

    def __init__(
        self,
        data_root: str | Path | None = None,
        token: str | None = None,
        class_word: str | None = None,
        reg_data_root: str | Path | None = None,
        size: int = 512,
        repeats: int = 100,
        reg_repeats: int = 10,
        flip_p: float = 0.5,
        subject_template: str = DEFAULT_SUBJECT_TEMPLATE,
        class_template: str = DEFAULT_CLASS_TEMPLATE,
        min_size: int | None = None,
        concepts: Sequence[Concept | Mapping[str, Any]] | None = None,
        buckets: bool = False,
        masks: bool = False,
        prior_captions: bool = False,
    ) -> None:
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p={flip_p} must be in [0, 1]")
        if repeats < 1 or reg_repeats < 1:
            raise ValueError(f"repeats={repeats} and reg_repeats={reg_repeats} must be >= 1")
        if "{token}" not in subject_template:
            raise ValueError(f"subject_template {subject_template!r} must contain {{token}}")
        if "{token}" in class_template:
            # The class prompts must not mention the identifier, or the prior loss would train it too.
            raise ValueError(f"class_template {class_template!r} must not contain {{token}}")
        self.concepts = make_concepts(concepts, data_root, token, class_word, reg_data_root)
        check_concepts(self.concepts)
        self.token, self.class_word = self.concepts[0].token, self.concepts[0].class_word
        self.size, self.repeats, self.reg_repeats, self.flip_p = size, repeats, reg_repeats, flip_p
        self.targets = bucket_resolutions(size, step=64 if size % 64 == 0 else 16) if buckets else [(size, size)]
        subjects, classes, self.class_of = [], {}, []
        for k, c in enumerate(self.concepts):
            caption = _format(subject_template, "subject_template", c.token, c.class_word)
            subjects.append(load_folder(c.data_root, "--data_root" if k == 0 and concepts is None else
                                        f"concepts[{k}].data_root", self.targets, min_size, caption, masks))
            if c.reg_data_root is not None:
                key = str(Path(c.reg_data_root).resolve())
                if key not in classes:
                    class_caption = _format(class_template, "class_template", c.token, c.class_word)
                    classes[key] = (c.class_word, load_folder(c.reg_data_root, "--reg_data_root", self.targets,
                                                              min_size, class_caption))
                elif classes[key][0] != c.class_word:
                    raise ValueError(f"class folder {c.reg_data_root} is used for '{classes[key][0]}' and "
                                     f"'{c.class_word}': give each class its own folder")
            self.class_of += [list(classes).index(str(Path(c.reg_data_root).resolve()))
                              if c.reg_data_root is not None else -1] * len(subjects[-1])
        self.subjects = _concat(subjects)
        if masks:
            check_masks(self.subjects)
        self.concept_of = [k for k, s in enumerate(subjects) for _ in range(len(s))]
        self.masks = masks
        # prior_preservation: base_model (no class images): each subject example carries its class prompt, which
        # the model answers with and without its adapters.
        self.prior_captions = ([_format(class_template, "class_template", c.token, c.class_word)
                                for c in self.concepts] if prior_captions else None)
        class_sets = [cs for _, cs in classes.values()]
        self.classes: ImageSet | None = _concat(class_sets) if class_sets else None
        offsets = np.cumsum([0] + [len(cs) for cs in class_sets])
        # For each subject image: the class images it is paired with (its class; the nearest bucket).
        self.pairs = [self._pairing(class_sets, offsets, k, self.subjects.targets[s])
                      for s, k in enumerate(self.class_of)]
        if self.classes is not None and any(p is None for p in self.pairs):
            raise ValueError("with class images, every subject needs a reg_data_root (a class folder)")

    @staticmethod
    def _pairing(class_sets: list[ImageSet], offsets: np.ndarray, k: int, target: tuple[int, int]) -> list[int] | None:
        if k < 0:
            return None
        nearest = nearest_target(*target, sorted(set(class_sets[k].targets)))
        return [int(offsets[k]) + j for j, t in enumerate(class_sets[k].targets) if t == nearest]

    # The single-subject view the rest of the code (and the cache) reads.
    @property
    def images(self) -> np.ndarray | list[np.ndarray]:
        return self.subjects.images

    @property
    def captions(self) -> list[str]:
        return self.subjects.captions

    @property
    def reg_images(self) -> np.ndarray | list[np.ndarray] | None:
        return None if self.classes is None else self.classes.images

    @property
    def reg_captions(self) -> list[str]:
        return [] if self.classes is None else self.classes.captions

    @property
    def num_subject(self) -> int:
        return len(self.subjects)

    @property
    def num_class(self) -> int:
        return 0 if self.classes is None else len(self.classes)

    def __len__(self) -> int:
        subject_len = self.num_subject * self.repeats
        if self.classes is None:
            return subject_len
        return max(self.num_subject, min(subject_len, self.num_class * self.reg_repeats))

    def bucket_of(self, i: int) -> int:
        """The bucket (index into ``targets``) of item ``i``'s subject image: batches hold one bucket."""
        return self.targets.index(self.subjects.targets[i % self.num_subject])

    def images_by_role(self) -> dict[str, np.ndarray | list[np.ndarray]]:
        """The decoded images under the batch key they are served as (``image``, ``reg_image``)."""
        out = {IMAGE_KEY: self.images}
        if self.classes is not None:
            out[REG_PREFIX + IMAGE_KEY] = self.classes.images
        return out

    def all_captions(self) -> list[str]:
        return list(self.captions) + list(self.reg_captions) + list(self.prior_captions or [])

    def _flip(self, generator: torch.Generator | None) -> bool:
        return self.flip_p > 0 and torch.rand((), generator=generator).item() < self.flip_p

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``i``, or ``(i, seed)`` from the resumable sampler: the seed decides the random flips, so the
        same draw gives the same pixels in a resumed run (a plain ``i`` draws from torch's global generator)."""
        i, seed = index if isinstance(index, tuple) else (index, None)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        s = i % self.num_subject
        item = self._role("", self.subjects, s, self._flip(generator))
        item["concept"] = self.concept_of[s]
        if self.prior_captions is not None:
            item[PRIOR_PREFIX + CAPTION_KEY] = self.prior_captions[self.concept_of[s]]
        if self.masks:
            mask = self.subjects.masks[s]
            mask = torch.ones(item[IMAGE_KEY].shape[1:]) if mask is None else torch.from_numpy(mask.copy())
            item[f"{IMAGE_KEY}_mask"] = (mask.flip(-1) if item[f"{IMAGE_KEY}_flip"] else mask)[None]
        if self.classes is not None:
            candidates = self.pairs[s]
            item.update(self._role(REG_PREFIX, self.classes, candidates[i % len(candidates)], self._flip(generator)))
        return item

    def _role(self, prefix: str, images: ImageSet, k: int, flip: bool) -> dict[str, Any]:
        """One example's entries under ``prefix`` ('' subject, 'reg_' class): pixels, caption, which pixels
        (``_id``/``_flip``, for the latent cache) and SDXL's size conditioning (the flip keeps a centred crop
        where it was; the target size is the image's bucket)."""
        x = uint8_to_tensor(images.images[k])
        w, h = images.targets[k]
        return {prefix + IMAGE_KEY: x.flip(-1) if flip else x, prefix + CAPTION_KEY: images.captions[k],
                f"{prefix}{IMAGE_KEY}_id": k, f"{prefix}{IMAGE_KEY}_flip": flip,
                f"{prefix}original_size_as_tuple": torch.as_tensor(images.crops[k, :2]),
                f"{prefix}crop_coords_top_left": torch.as_tensor(images.crops[k, 2:]),
                f"{prefix}target_size_as_tuple": torch.tensor([h, w])}


def make_concepts(concepts: Sequence[Concept | Mapping[str, Any]] | None, data_root: str | Path | None,
                  token: str | None, class_word: str | None, reg_data_root: str | Path | None) -> list[Concept]:
    """The run's subjects: ``concepts`` (``data.params.concepts`` / ``--concepts``) or the one of the
    single-subject settings."""
    if concepts:
        out = []
        for k, c in enumerate(concepts):
            if isinstance(c, Concept):
                out.append(c)
                continue
            unknown = set(c) - {f.name for f in fields(Concept)}
            if unknown:
                raise ValueError(f"concepts[{k}]: unknown keys {sorted(unknown)} (known: "
                                 f"{', '.join(f.name for f in fields(Concept))})")
            try:
                out.append(Concept(**c))
            except TypeError as e:
                raise ValueError(f"concepts[{k}]: {e}") from None
        return out
    if data_root is None:
        raise ValueError("no subject: give data_root, token and class_word, or concepts")
    return [Concept(str(data_root), token or "", class_word or "",
                    str(reg_data_root) if reg_data_root is not None else None)]


class DreamBoothDataModule(pl.LightningDataModule):
    """The training data of one DreamBooth run, built from the config's ``data.params`` or the CLI flags.

    One subject (``data_root``, ``token``, ``class_word``, ``reg_data_root``) or several (``concepts``: a list of
    mappings with those keys plus ``num_class_images``; ``--concepts FILE``). ``buckets`` trains every photo at
    the aspect-ratio bucket nearest its own shape, one bucket per batch; ``masked_loss`` gives each subject example
    its loss mask (the model's ``mask_floor`` weights the background). ``seed`` fixes the order and the flips of
    every epoch (see ``ldm.data.loader``); the training module sets it from ``--seed``.
    """

    def __init__(
        self,
        data_root: str | None = None,
        token: str | None = None,
        class_word: str | None = None,
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
        concepts: Sequence[Mapping[str, Any]] | None = None,
        buckets: bool = False,
        masked_loss: bool = False,
        prior_captions: bool = False,
        seed: int = 23,
    ) -> None:
        super().__init__()
        self.data_root, self.token, self.class_word, self.reg_data_root = data_root, token, class_word, reg_data_root
        self.batch_size, self.num_workers, self.size = batch_size, num_workers, size
        self.repeats, self.reg_repeats, self.flip_p = repeats, reg_repeats, flip_p
        self.subject_template, self.class_template, self.min_size = subject_template, class_template, min_size
        self.concepts = make_concepts(concepts, data_root, token, class_word, reg_data_root)
        self.buckets, self.masked_loss, self.seed = buckets, masked_loss, seed
        self.prior_captions = prior_captions  # set by the training run for prior_preservation: base_model
        self.train_dataset: DreamBoothDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build (once: Lightning calls setup per stage) and validate the dataset."""
        if self.train_dataset is not None:
            return
        self.train_dataset = DreamBoothDataset(
            size=self.size, repeats=self.repeats, reg_repeats=self.reg_repeats, flip_p=self.flip_p,
            subject_template=self.subject_template, class_template=self.class_template, min_size=self.min_size,
            concepts=self.concepts, buckets=self.buckets, masks=self.masked_loss, prior_captions=self.prior_captions)
        ds = self.train_dataset
        per_concept = ", ".join(f"'{c.token} {c.class_word}': {ds.concept_of.count(k)}"
                                for k, c in enumerate(ds.concepts))
        rank_zero_info(f"DreamBooth data: {ds.num_subject} subject images ({per_concept}), {ds.num_class} class "
                       f"images, {len(ds)} items per epoch"
                       + (f", {len(set(ds.subjects.targets))} buckets" if self.buckets else ""))

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before train_dataloader()")
        ds = self.train_dataset
        groups = [ds.bucket_of(i) for i in range(len(ds))] if self.buckets else None
        return ResumableLoader(
            ds, num_workers=self.num_workers,
            # the short last batch is real training data; nothing in the model needs a full one
            batch_sampler=ResumableBatchSampler(len(ds), self.batch_size, self.seed, groups=groups),
            persistent_workers=self.num_workers > 0,  # workers hold the decoded images; do not refork each epoch
            pin_memory=torch.cuda.is_available(),
            batches_done=lambda: batches_done(self.trainer),
        )
