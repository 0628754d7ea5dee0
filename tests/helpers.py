"""Helpers for the training tests: drawn subject pictures and a callback that interrupts a run."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from PIL import Image, ImageDraw


def draw_subject(path: Path, seed: int, size: int = 96) -> Path:
    """A red disc with a yellow square on a blue-grey background, at a position that depends on ``seed``."""
    img = Image.new("RGB", (size, size), (90 + 10 * seed % 60, 110, 140))
    d = ImageDraw.Draw(img)
    x = 20 + (seed * 13) % 30
    d.ellipse([x, 25, x + 40, 65], fill=(220, 40, 40))
    d.rectangle([x + 12, 37, x + 28, 53], fill=(240, 220, 30))
    img.save(path)
    return path


def make_folder(folder: Path, n: int, offset: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw_subject(folder / f"{i:02d}.png", seed=i + offset)
    return folder


class InterruptAt(pl.Callback):
    """Raises KeyboardInterrupt (what Ctrl-C does) once ``step`` optimizer steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt


class RecordGrads(pl.Callback):
    """Records, right before each backward pass, whether the first trainable parameter's ``.grad`` is None or
    a tensor (what the optimizer's zero_grad left), in the class-level list ``seen``."""
    seen: list = []

    def on_before_backward(self, trainer, pl_module, loss):
        p = next(p for p in pl_module.parameters() if p.requires_grad)
        RecordGrads.seen.append(None if p.grad is None else float(p.grad.abs().sum()))
