"""A training loader whose order and random draws depend only on (seed, epoch, position), so that a run that was
interrupted and resumed sees exactly the batches an uninterrupted run sees.

PyTorch's shuffling draws from the global random state, which a resumed process does not have, and Lightning
restarts an interrupted epoch from its first batch unless the loader can say where it stopped. Here the
permutation of epoch ``e`` is drawn from a generator seeded with ``(seed, e)``; every item is handed to the
dataset together with its own seed (for its random flip); and the loader's ``state_dict`` records how many
batches of the epoch were trained, which Lightning saves in each checkpoint and gives back on resume.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from ldm.util import derive_seed


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ResumableSampler(Sampler):
    """Yields ``(index, item_seed)`` for a dataset of ``size`` items: a fresh permutation each epoch (or the
    identity without ``shuffle``), split between DDP ranks like ``DistributedSampler`` (padded by wrapping so
    every rank gets the same count), starting ``skip`` items in after a resume."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0
        self._resume: Optional[tuple[int, int]] = None  # (epoch, items to skip)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch."""
        self.epoch = epoch

    def resume_at(self, epoch: int, skip: int) -> None:
        self._resume = (epoch, skip)

    def __len__(self) -> int:
        world, _ = _world()
        return math.ceil(self.size / world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        world, rank = _world()
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        per_rank = math.ceil(self.size / world)
        order = (order * math.ceil(per_rank * world / self.size))[: per_rank * world]
        positions = list(range(rank, per_rank * world, world))
        skip = 0
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
            skip = skip if epoch == self.epoch else 0
        for pos in positions[skip:]:
            yield order[pos], derive_seed(self.seed, "item", self.epoch, pos)


def batches_done(trainer) -> int:
    """Batches of the current epoch trained so far: Lightning's own progress counter (``processed`` includes the
    batch whose ``on_train_batch_end`` is saving a checkpoint, and equals ``completed`` otherwise)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that Lightning can checkpoint (``state_dict``) and
    restore (``load_state_dict``). ``batches_done`` says how many batches of the current epoch were trained; the
    data module points it at the trainer's progress counter."""

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableLoader needs a ResumableSampler")
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": int(self.batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_at(int(state["epoch"]), int(state["batches_done"]) * int(self.batch_size or 1))
