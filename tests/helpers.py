"""Helpers for the tests: drawn subject pictures, a callback that interrupts a run, and a SentencePiece tokenizer
model (FLUX.1's T5 tokenizer is not shipped; tests train a small one)."""
from __future__ import annotations

import io
import random
from pathlib import Path

import pytorch_lightning as pl
import sentencepiece
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


def train_spiece(folder: Path, **ids: int) -> Path:
    """A 300-piece unigram SentencePiece model with T5's special ids (or ``ids``), trained on made-up prompts."""
    rng = random.Random(0)
    syllables = "ka ri to me su na lo pe di gu ba ve zo chi sha tre pho gra qu ex".split()
    words = ("a photo of sks dog cat in the snow on beach with red hat painting by van gogh portrait astronaut "
             "riding horse mars city night café naïve résumé 2024 12 99 hello world, big small! blue green? "
             "yellow: sunset; mountain-lake forest").split()
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=300, model_type="unigram",
        character_coverage=1.0, minloglevel=2, **{"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1, **ids})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spiece.model"
    path.write_bytes(model.getvalue())
    return path
