"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

One linear warm-up and one cosine decay serve every schedule: the original ``LambdaLinearScheduler`` (named by the
original configs' ``scheduler_config``) and the ``lr_schedule: constant|cosine`` with ``lr_warmup_steps`` of our
fine-tuning configs (:func:`warmup_then`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence


def linear_warmup(n: float, steps: int, start: float, end: float) -> float:
    """``start`` at n = 0 rising linearly to ``end`` at n = ``steps``."""
    return start + (end - start) * n / steps


def cosine_decay(progress: float, low: float, high: float) -> float:
    """Half a cosine from ``high`` (progress 0) to ``low`` (progress >= 1) (Loshchilov & Hutter 2017)."""
    return low + 0.5 * (high - low) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_then(schedule: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step n: a linear warm-up that reaches 1 at step
    ``warmup_steps - 1`` (the first step already trains, at 1/warmup_steps), then constant, or a cosine to 0 at
    ``max_steps``."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule {schedule!r}: expected 'constant' or 'cosine'")

    def factor(n: int) -> float:
        if n < warmup_steps:
            return linear_warmup(n + 1, warmup_steps, 0.0, 1.0)
        if schedule == "constant" or max_steps <= warmup_steps:
            return 1.0
        return cosine_decay((n - warmup_steps) / (max_steps - warmup_steps), 0.0, 1.0)
    return factor


class LambdaLinearScheduler:
    """The original's warm-up then linear decay per cycle (the v1 config uses one endless cycle: warm-up, then
    constant)."""

    UNREAD_PARAMS = ("verbosity_interval",)

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
        del verbosity_interval  # the original printed the factor every so many steps; accepted for its configs
        if not len(warm_up_steps) == len(f_min) == len(f_max) == len(f_start) == len(cycle_lengths):
            raise ValueError("LambdaLinearScheduler: all per-cycle lists must have the same length")
        self.lr_warm_up_steps, self.f_start, self.f_min, self.f_max = warm_up_steps, f_start, f_min, f_max
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = [0] + [sum(self.cycle_lengths[: i + 1]) for i in range(len(self.cycle_lengths))]

    def find_in_interval(self, n: int) -> int:
        for cycle, end in enumerate(self.cum_cycles[1:]):
            if n <= end:
                return cycle
        return len(self.cycle_lengths) - 1

    def schedule(self, n: int) -> float:
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if n < self.lr_warm_up_steps[cycle]:
            return linear_warmup(n, self.lr_warm_up_steps[cycle], self.f_start[cycle], self.f_max[cycle])
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (
            self.cycle_lengths[cycle] - n) / self.cycle_lengths[cycle]

    def __call__(self, n: int) -> float:
        return self.schedule(n)
