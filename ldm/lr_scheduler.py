"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR``, with the original class names."""
from __future__ import annotations

import math
from typing import Sequence


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from ``lr_start`` to ``lr_max`` over ``warm_up_steps``, then cosine decay to ``lr_min``."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int,
                 verbosity_interval: int = 0):
        self.lr_warm_up_steps, self.lr_start, self.lr_min, self.lr_max = warm_up_steps, lr_start, lr_min, lr_max
        self.lr_max_decay_steps = max_decay_steps

    def schedule(self, n: int) -> float:
        if n < self.lr_warm_up_steps:
            return (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        t = (n - self.lr_warm_up_steps) / max(1, self.lr_max_decay_steps - self.lr_warm_up_steps)
        t = min(t, 1.0)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(t * math.pi))

    def __call__(self, n: int) -> float:
        return self.schedule(n)


class LambdaLinearScheduler:
    """Warm-up then linear decay per cycle (the v1 config uses one endless cycle: warm-up, then constant)."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
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
            return (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (
            self.cycle_lengths[cycle] - n) / self.cycle_lengths[cycle]

    def __call__(self, n: int) -> float:
        return self.schedule(n)
