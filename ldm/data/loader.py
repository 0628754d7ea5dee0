"""A training loader whose order and random draws depend only on (seed, epoch, position), so that a run that was
interrupted and resumed sees exactly the batches an uninterrupted run sees.

PyTorch's shuffling draws from the global random state, which a resumed process does not have, and Lightning
restarts an interrupted epoch from its first batch unless the loader can say where it stopped. Here the
permutation of epoch ``e`` is drawn from a generator seeded with ``(seed, e)`` (and, with aspect-ratio buckets,
cut into batches of one bucket each); every item is handed to the
dataset together with its own seed (for its random flip); and the loader's ``state_dict`` records how many
batches of the epoch were trained, which Lightning saves in each checkpoint and gives back on resume.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from ldm.util import derive_seed


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ResumableBatchSampler(Sampler):
    """Yields batches of ``(index, item_seed)`` over a dataset of ``size`` items: a fresh permutation each epoch
    (or the identity without ``shuffle``) cut into batches of ``batch_size``. With ``groups`` (one group id per
    index, e.g. aspect-ratio buckets) every batch holds one group: each group's items keep the permutation's order
    and are cut into batches, then the batches of all groups are shuffled. Batches are split between DDP ranks
    (batch b to rank b mod world, padded by wrapping so every rank gets the same count); after a resume the
    first ``skip`` batches of the epoch are left out. Without groups, one process sees exactly the item order,
    batches and item seeds of a plain shuffled sampler cut into batches."""

    def __init__(self, size: int, batch_size: int, seed: int, groups: Optional[Sequence[int]] = None,
                 shuffle: bool = True, drop_last: bool = False) -> None:
        if groups is not None and len(groups) != size:
            raise ValueError(f"{len(groups)} group ids for {size} items")
        self.size, self.batch_size, self.seed, self.groups = size, batch_size, seed, groups
        self.shuffle, self.drop_last = shuffle, drop_last
        # Our own epoch count: the epoch a pass over the data is (Lightning numbers the epoch after a resume from
        # an epoch's last batch differently from an uninterrupted run, so its number is not used).
        self.epoch, self._next_epoch, self._skip = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch; ignored (see ``epoch``)."""

    def resume_at(self, epoch: int, skip: int) -> None:
        """Continue with ``epoch`` after its first ``skip`` batches (the next epoch when none are left)."""
        self.epoch = epoch
        if skip >= len(self._epoch_batches()[1]):
            epoch, skip = epoch + 1, 0
        self._next_epoch, self._skip = epoch, skip

    def _cut(self, positions: list[int]) -> list[list[int]]:
        batches = [positions[i:i + self.batch_size] for i in range(0, len(positions), self.batch_size)]
        return [b for b in batches if len(b) == self.batch_size] if self.drop_last else batches

    def _epoch_batches(self) -> tuple[list[int], list[list[int]]]:
        """The permutation and its batches (lists of positions in it) of the current epoch."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        order = torch.randperm(self.size, generator=g).tolist() if self.shuffle else list(range(self.size))
        if self.groups is None:
            return order, self._cut(list(range(self.size)))
        by_group: dict[int, list[int]] = {}
        for pos, index in enumerate(order):
            by_group.setdefault(self.groups[index], []).append(pos)
        batches = [b for group in sorted(by_group) for b in self._cut(by_group[group])]
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "batches", self.epoch))
            batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        return order, batches

    def __len__(self) -> int:
        world, _ = _world()
        return math.ceil(len(self._epoch_batches()[1]) / world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # Runs at the first batch of a pass (a generator starts lazily), once per pass whatever prefetches.
        self.epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        skip, self._skip = self._skip, 0
        world, rank = _world()
        order, batches = self._epoch_batches()
        per_rank = math.ceil(len(batches) / world)
        batches = (batches * math.ceil(per_rank * world / max(1, len(batches))))[: per_rank * world]
        mine = batches[rank::world]
        for batch in mine[skip:]:
            yield [(order[pos], derive_seed(self.seed, "item", self.epoch, pos)) for pos in batch]


def batches_done(trainer) -> int:
    """Batches of the current epoch trained so far: Lightning's own progress counter (``processed`` includes the
    batch whose ``on_train_batch_end`` is saving a checkpoint, and equals ``completed`` otherwise)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableBatchSampler` that Lightning can checkpoint (``state_dict``) and
    restore (``load_state_dict``). ``batches_done`` says how many batches of the current epoch were trained; the
    data module points it at the trainer's progress counter."""

    def __init__(self, dataset, batch_sampler: ResumableBatchSampler, batches_done: Callable[[], int],
                 **kwargs) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "batches_done": int(self.batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.resume_at(int(state["epoch"]), int(state["batches_done"]))
