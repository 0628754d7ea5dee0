"""The Train tab's recipes and the ``main.py`` command line they make.

A recipe is a config file of ``configs/`` plus the flags that make it what its name says (``--lora_rank 4`` for
SD v1 LoRA). Its defaults (steps, learning rate, image size) are read from the config itself, so the form shows
what the file says. The learning rate in the form is the rate the optimizer uses: it is passed as
``model.base_learning_rate`` with ``--scale_lr false``, and its default is the config's base rate times what
``--scale_lr`` would multiply it by (batch size and gradient accumulation, one device).
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from ldm.config import MAX_SEED
from ldm.webui.paths import Roots, inside, safe_name

REPO = Path(__file__).resolve().parents[2]
TOY_MODEL = REPO / "assets" / "toy" / "toy-ldm.safetensors"
#: The Lightning callback that keeps a run's progress file and CSV metrics current (see ldm.webui.progress).
PROGRESS_CALLBACK = "lightning.callbacks.webui_progress.target=ldm.webui.progress.LiveProgress"


class RequestError(ValueError):
    """A Train-tab field that cannot be used; one line."""


@dataclass(frozen=True)
class Recipe:
    label: str
    config: Path
    inference: Optional[Path]  # the sampling config of its checkpoints (None: recognised from the keys)
    lora_rank: Optional[int] = None
    learning_rate: Optional[float] = None  # None: the config's (scaled as --scale_lr would)
    start: Optional[Path] = None  # a starting checkpoint shipped with the project
    needs_checkpoint: bool = True

    def _config(self):
        return OmegaConf.load(self.config)

    def defaults(self) -> dict:
        """steps, learning rate, image size and validation-grid interval as the config file sets them."""
        cfg = self._config()
        trainer = cfg.lightning.get("trainer", {})
        scale = int(cfg.data.params.get("batch_size", 1)) * int(trainer.get("accumulate_grad_batches", 1))
        grid = OmegaConf.select(cfg, "lightning.callbacks.image_logger.params.batch_frequency", default=None)
        return {"steps": int(trainer.get("max_steps", 800)),
                "learning_rate": self.learning_rate or float(cfg.model.base_learning_rate) * scale,
                "size": int(cfg.data.params.get("size", 512)), "grid_every": int(grid) if grid else 0}


def _tiny_recipe() -> Recipe:
    """The shipped toy model when it is there, else the random-weight tiny model (plumbing only)."""
    if TOY_MODEL.is_file():
        return Recipe("Tiny demo model (toy, CPU)", REPO / "configs/toy/dreambooth.yaml",
                      REPO / "configs/toy/inference.yaml", start=TOY_MODEL)
    return Recipe("Tiny demo model (toy, CPU)", REPO / "configs/stable-diffusion/tiny-finetune.yaml",
                  REPO / "configs/stable-diffusion/tiny-inference.yaml", needs_checkpoint=False)


def recipes() -> dict[str, Recipe]:
    v1 = REPO / "configs/stable-diffusion/v1-finetune_unfrozen.yaml"
    listed = [Recipe("SD v1 full fine-tune", v1, None),
              Recipe("SD v1 LoRA (rank 4)", v1, None, lora_rank=4, learning_rate=1e-4),
              Recipe("SDXL LoRA", REPO / "configs/stable-diffusion/sdxl-dreambooth-lora.yaml", None),
              Recipe("FLUX.1 [dev] LoRA (rank 16)", REPO / "configs/flux/flux1-dev-dreambooth-lora.yaml", None),
              _tiny_recipe()]
    return {r.label: r for r in listed}


@dataclass
class TrainRequest:
    """The Train tab's fields, as the browser sent them."""
    recipe: str
    photos: str
    class_word: str
    token: str
    checkpoint: Optional[str]
    steps: float
    learning_rate: float
    prior: bool
    num_class_images: float
    grid_every: float = 0
    seed: float = 23


def _int(name: str, value: float, low: int, high: int) -> int:
    if value is None or not math.isfinite(float(value)) or float(value) != int(value) or not low <= value <= high:
        raise RequestError(f"{name} {value}: must be a whole number between {low} and {high}")
    return int(value)


def check_words(class_word: str, token: str) -> tuple[list[str], str]:
    """The class (one or more words) and the identifier (one word), as main.py takes them."""
    words = (class_word or "").split()
    if not words:
        raise RequestError("class word: missing (the subject's class, e.g. dog or 'stuffed animal')")
    token = (token or "").strip()
    if not token or len(token.split()) != 1:
        raise RequestError(f"identifier {token!r}: must be one word, e.g. sks")
    for what, text in (("class word", class_word), ("identifier", token)):
        if not re.fullmatch(r"[^\s=\"'\\{}]+( [^\s=\"'\\{}]+)*", " ".join(text.split())):
            raise RequestError(f"{what} {text!r}: may not contain = quotes braces or backslashes")
    return words, token


def training_argv(request: TrainRequest, roots: Roots, cuda: bool) -> tuple[list[str], str, Recipe]:
    """``(argv, run name, recipe)`` of ``python main.py ...`` for ``request``; every path checked against
    ``roots``. Raises :class:`RequestError` or ``PathRefused`` with one line."""
    recipe = recipes().get(request.recipe)
    if recipe is None:
        raise RequestError(f"recipe {request.recipe!r}: not one of {', '.join(recipes())}")
    words, token = check_words(request.class_word, request.token)
    photos = inside(request.photos, [roots.data_dir], "photo folder")
    steps = _int("steps", request.steps, 1, 1_000_000)
    seed = _int("seed", request.seed, 0, MAX_SEED)
    lr = float(request.learning_rate or 0)
    if not (math.isfinite(lr) and 0 < lr < 1):
        raise RequestError(f"learning rate {request.learning_rate}: must be a number between 0 and 1, e.g. 1e-6")
    start = _starting_checkpoint(request.checkpoint, recipe, roots)
    name = safe_name(f"{token}_{'_'.join(words)}", "run")
    # Every value joined to its flag (--token=TEXT): argparse takes it as the value whatever it looks like, so no
    # field can become a flag of main.py.
    argv = [sys.executable, str(REPO / "main.py"), f"--base={recipe.config}", "-t", f"--name={name}",
            f"--logdir={roots.log_dir}", f"--data_root={photos}", f"--class_word={' '.join(words)}",
            f"--token={token}", f"--max_steps={steps}", f"--seed={seed}", "--scale_lr=false"]
    if start is not None:
        argv.append(f"--actual_resume={start}")
        argv += family_parts(recipe, start, roots)
    if request.prior:
        count = _int("class images", request.num_class_images, 1, 10_000)
        reg = roots.class_images / safe_name(f"{'_'.join(words)}-{start.stem if start else 'random'}-"
                                             f"{recipe.defaults()['size']}px")
        argv += [f"--reg_data_root={reg}", f"--num_class_images={count}"]
    if recipe.lora_rank:
        argv.append(f"--lora_rank={recipe.lora_rank}")
    if cuda:
        argv.append("--gpus=0,")
    argv += [f"model.base_learning_rate={lr!r}", PROGRESS_CALLBACK]
    if request.grid_every:
        every = _int("validation grid every", request.grid_every, 1, 1_000_000)
        argv.append(f"lightning.callbacks.image_logger.params.batch_frequency={every}")
    return argv, name, recipe


def family_parts(recipe: Recipe, start: Path, roots: Roots) -> list[str]:
    """The flags of the recipe's family's other files (FLUX.1: ``--ae``, ``--t5``, ``--clip``, ``--t5_tokenizer``),
    found in the model folder beside the starting checkpoint; none for a one-file family."""
    from ldm.families import FAMILIES, config_family
    from ldm.webui.tools import ToolError, find_parts
    family = FAMILIES.get(config_family(OmegaConf.load(recipe.config)) or "")
    if family is None or not family.components:
        return []
    try:
        parts = find_parts(family, roots.model_dir, exclude=start)
    except ToolError as e:
        raise RequestError(str(e)) from None
    return [f"--{flag}={path}" for flag, path in parts.items()]


def _starting_checkpoint(checkpoint: Optional[str], recipe: Recipe, roots: Roots) -> Optional[Path]:
    if checkpoint:
        return inside(checkpoint, [roots.model_dir, roots.log_dir], "starting checkpoint")
    if recipe.start is not None:
        return recipe.start
    if recipe.needs_checkpoint:
        raise RequestError(f"{recipe.label}: pick a starting checkpoint (put .ckpt/.safetensors files in "
                           f"{roots.model_dir})")
    return None


def resume_argv(run_folder: Path, cuda: bool) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), f"--resume={run_folder}"] + (["--gpus=0,"] if cuda else [])
