"""A Lightning callback that lets the web UI follow a run live: ``<run>/progress.json`` and a flushed CSV.

The web UI adds it to the runs it starts (``lightning.callbacks.webui_progress``; it is then part of the saved
config, so ``main.py -r`` keeps it). Every ``every_s`` seconds, and at the end, it writes the global step, the
step limit and the speed since the first step of this process to ``progress.json`` (atomically), and flushes
Lightning's CSV logger, which otherwise writes ``csv/metrics.csv`` only every 100 steps: the loss plot then
follows the run instead of jumping. Imports only Lightning; no Gradio in a training process.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

PROGRESS_FILE = "progress.json"


class LiveProgress(pl.Callback):
    def __init__(self, every_s: float = 2.0):
        super().__init__()
        if not every_s > 0:
            raise ValueError("webui_progress.every_s must be positive")
        self.every_s = every_s
        self._first: Optional[tuple[float, int]] = None  # (time, step) at the end of this process's first step
        self._last_write = 0.0

    @rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.time()
        if self._first is None:
            self._first = (now, trainer.global_step)
        done = 0 < trainer.max_steps <= trainer.global_step
        if done or now - self._last_write >= self.every_s:
            self.write(trainer, now)

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, time.time())

    def write(self, trainer: pl.Trainer, now: float) -> None:
        from ldm.files import atomic_write
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.CSVLogger):
                logger.save()
        rate = None
        if self._first is not None and now > self._first[0] and trainer.global_step > self._first[1]:
            rate = (trainer.global_step - self._first[1]) / (now - self._first[0])
        state = {"step": trainer.global_step, "max_steps": trainer.max_steps, "steps_per_s": rate, "updated": now}
        path = Path(trainer.default_root_dir) / PROGRESS_FILE
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(state)))
        self._last_write = now
