"""Lightning callbacks: run-folder setup, atomic checkpoints, save-on-interrupt, caches of the frozen parts,
freed memory handed back after each CPU step, validation image grids and exported weights.

All file I/O of a training run happens here, on rank 0 only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.files import atomic_write, clean_partial
from ldm.images import make_grid, save_png, to_pil
from ldm.util import release_freed_memory, return_large_frees_to_the_os


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: a killed process leaves the old file or the new one, never
    half of one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Optional[Any] = None) -> None:
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


class SetupCallback(pl.Callback):
    """Fills the run folder (created by the training module) with ``{checkpoints,configs,images}``, removes the
    partial files a killed earlier attempt left there, and writes the merged config actually used.

    The config is written once the checkpoint of a resumed run has been restored (``on_fit_start``), not before:
    a resume refused for its settings must leave the folder as it was, or the next plain ``-r`` would load the
    refused config."""

    def __init__(self, logdir: str, config: DictConfig, now: str, resume: bool = False):
        super().__init__()
        self.logdir, self.config, self.now, self.resume = Path(logdir), config, now, resume

    @rank_zero_only
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for sub in ("checkpoints", "configs", "images"):
            (self.logdir / sub).mkdir(parents=True, exist_ok=True)
        for folder in (self.logdir / "checkpoints", self.logdir / "configs", self.logdir / "images" / "train"):
            for partial in clean_partial(folder):
                print(f"Removed {partial}: a partial file left by an interrupted write")

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.logdir / "configs" / f"{self.now}-project.yaml"
        atomic_write(path, lambda tmp: OmegaConf.save(self.config, tmp))
        print(f"Run folder: {self.logdir} (config saved to {path})")


class SaveOnInterrupt(pl.Callback):
    """Ctrl-C or SIGTERM: write ``last.ckpt`` (weights, optimizer, global step) before Lightning exits, and
    write it at the normal end of training too, so ``last.ckpt`` is always the newest state."""

    def __init__(self, ckptdir: str):
        super().__init__()
        self.last = Path(ckptdir) / "last.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            print(f"\nInterrupted at step {trainer.global_step}: saving {self.last}")
            trainer.save_checkpoint(self.last, weights_only=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.last, weights_only=False)


class CacheFrozenInputs(pl.Callback):
    """With ``cache_latents`` on, encode every training image once (both flips) and, when the text encoder is
    frozen, every caption, before the first step; the model then reads its batches' latents from these caches
    (``LatentDiffusion.latent_cache`` / ``text_cache``) instead of running the frozen parts."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not getattr(pl_module, "cache_latents", False):
            return
        from ldm.data.cache import LatentCache, TextCache
        from ldm.data.image_loading import uint8_to_tensor
        dataset = trainer.datamodule.train_dataset
        by_role = dataset.images_by_role()
        wanted = pl_module.first_stage_key
        if wanted not in by_role:
            raise ValueError(f"model.params.first_stage_key {wanted!r}: the data serves its images as "
                             f"{', '.join(by_role)}")
        pl_module.latent_cache = LatentCache()
        pl_module.latent_cache.build(pl_module.encode_first_stage, by_role, uint8_to_tensor,
                                     flips=dataset.flip_p > 0, device=pl_module.device)
        if not any(p.requires_grad for p in pl_module.text_model.parameters()):
            pl_module.text_cache = TextCache()
            pl_module.text_cache.build(pl_module.encode_text, dataset.all_captions())
        pl_module.offload_frozen()


class ReleaseFreedMemory(pl.Callback):
    """Training on a CPU: the memory a step frees goes back to the operating system, so the process's resident
    memory (what the out-of-memory killer counts) follows the memory in use. From the start, large tensors are
    returned the moment they are freed (:func:`ldm.util.return_large_frees_to_the_os`); after each step the
    heap's free pages are (:func:`ldm.util.release_freed_memory`). A lean SD v1 fine-tune peaked at 5.9 GiB
    with both and at 7.5 GiB, growing from step to step, with the trim alone (three steps; README, "Speed and
    memory"). GPU memory has its own caching allocator and is not touched."""

    def on_fit_start(self, trainer: Optional[pl.Trainer], pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cpu":
            return_large_frees_to_the_os()

    def on_train_batch_end(self, trainer: Optional[pl.Trainer], pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cpu":
            release_freed_memory()


def expand_prompts(templates: Sequence[str], concepts: Sequence[Any]) -> list[str]:
    """Validation prompts for the run's subjects (each with ``token`` and ``class_word``): a template with
    ``{token}`` once per subject, one without once per distinct class; without subjects the templates as they are."""
    if not concepts:
        return list(templates)
    prompts: list[str] = []
    try:
        for template in templates:
            filled = [template.format(token=c.token, class_word=c.class_word) for c in concepts]
            prompts += filled if "{token}" in template else list(dict.fromkeys(filled))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"validation prompts: only {{token}} and {{class_word}} may appear ({e!r})") from None
    return prompts


class ImageLogger(pl.Callback):
    """Every ``batch_frequency`` steps, samples the validation prompts with a fixed seed and saves one grid
    (a row per prompt) to ``images/train/`` and to TensorBoard. Include a prompt without the identifier:
    it shows whether the class itself drifts towards the subject (language drift). ``{token}`` and
    ``{class_word}`` in a prompt are filled in from the data module's identifier and class."""

    def __init__(self, batch_frequency: int, prompts: Sequence[str], max_images: int = 8, n_per_prompt: int = 2,
                 ddim_steps: int = 50, scale: float = 7.5, seed: int = 23, log_first_step: bool = False,
                 height: Optional[int] = None, width: Optional[int] = None):
        super().__init__()
        if batch_frequency < 1:
            raise ValueError("image_logger.batch_frequency must be at least 1")
        self.batch_frequency, self.templates = batch_frequency, list(prompts)
        self.prompts = list(prompts)
        self.max_images, self.n_per_prompt = max_images, n_per_prompt
        self.ddim_steps, self.scale, self.seed = ddim_steps, scale, seed
        self.log_first_step, self.height, self.width = log_first_step, height, width

    @torch.no_grad()
    def sample_grid(self, model: Any) -> torch.Tensor:
        from ldm.sampling.samplers import default_sampler, guided_images, make_sampler
        prompts = [p for p in self.prompts for _ in range(self.n_per_prompt)][: self.max_images]
        latent = model.image_size
        f = model.vae_factor
        shape = (model.channels, (self.height or latent * f) // f, (self.width or latent * f) // f)
        generator = torch.Generator(model.device).manual_seed(self.seed)
        was_training = model.training
        model.eval()
        try:
            with model.ema_scope():
                sizes = model.default_sizes(len(prompts), self.height, self.width)
                sampler = make_sampler(default_sampler(model), model)
                images = guided_images(model, sampler, prompts, shape, self.ddim_steps, self.scale, generator, sizes)
        finally:
            model.train(was_training)
        return make_grid(images, nrow=self.n_per_prompt, pad_value=-1.0)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fill in the prompts: a prompt with ``{token}`` once per subject, one with only ``{class_word}`` once per
        class (several subjects in a run each get their rows; a shared class one)."""
        self.prompts = expand_prompts(self.templates, getattr(trainer.datamodule, "concepts", None) or [])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        due = step % self.batch_frequency == 0 and (step > 0 or self.log_first_step)
        if due and trainer.is_global_zero and getattr(self, "_last_step", None) != step:
            self._last_step = step  # with gradient accumulation several batches share one global step
            self.log_grid(trainer, pl_module, step)

    def log_grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Optional[Path]:
        from ldm.sampling.samplers import NonFiniteSample
        try:
            grid = self.sample_grid(pl_module)
        except NonFiniteSample as e:  # said, and never saved as a black grid; the training goes on
            print(f"Step {step}: no validation grid: {e}")
            return None
        path = Path(trainer.default_root_dir) / "images" / "train" / f"step-{step:06d}.png"
        save_png(to_pil(grid), path, {"prompts": " | ".join(self.prompts), "seed": self.seed, "step": step,
                                      "steps": self.ddim_steps, "scale": self.scale})
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("samples", ((grid + 1) / 2).clamp(0, 1), step)
        return path


class ReconstructionLogger(pl.Callback):
    """For a first-stage (autoencoder) run: every ``batch_frequency`` steps, a grid of the batch's first
    ``max_images`` images (top row) and their reconstructions through the posterior's mode (bottom row)."""

    def __init__(self, batch_frequency: int, max_images: int = 8):
        super().__init__()
        if batch_frequency < 1:
            raise ValueError("reconstruction_logger.batch_frequency must be at least 1")
        self.batch_frequency, self.max_images = batch_frequency, max_images

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.batch_frequency or not trainer.is_global_zero or getattr(self, "_last", None) == step:
            return
        self._last = step
        x = pl_module.get_input(batch)[: self.max_images]
        was_training = pl_module.training
        pl_module.eval()
        try:
            rec = pl_module.decode(pl_module.encode(x).mode()).clamp(-1, 1)
        finally:
            pl_module.train(was_training)
        grid = make_grid(torch.cat([x, rec]).float().cpu(), nrow=len(x), pad_value=-1.0)
        save_png(to_pil(grid), Path(trainer.default_root_dir) / "images" / "train" / f"step-{step:06d}.png",
                 {"step": step, "rows": "input | reconstruction"})
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("reconstructions", ((grid + 1) / 2).clamp(0, 1), step)


class ExportWeights(pl.Callback):
    """Small, shareable files next to the Lightning checkpoints, at every ``every_n_train_steps`` and at the end:

    - ``lora-<step>.safetensors`` (+ ``lora-last``) when the model trains LoRA adapters;
    - ``pruned-<step>.{ckpt,safetensors}`` (+ ``pruned-last``) with ``pruned: true``: sampling weights only,
      optionally in half precision, that every SD v1 tool opens.
    """

    def __init__(self, ckptdir: str, every_n_train_steps: int = 0, pruned: bool = False,
                 dtype: Optional[str] = "fp16", safetensors: bool = True, ema: Optional[bool] = None):
        super().__init__()
        if dtype not in (None, "fp32", "fp16", "bf16"):
            raise ValueError(f"export dtype {dtype!r}: expected fp32, fp16 or bf16")
        self.ckptdir, self.every = Path(ckptdir), every_n_train_steps
        self.pruned, self.safetensors, self.ema = pruned, safetensors, ema
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype or "fp32")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0 and getattr(self, "_done", None) != step:
            self._done = step
            self.export(trainer, pl_module, f"{step:06d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.export(trainer, pl_module, "last")

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> list[Path]:
        from ldm.weights.checkpoint import save_checkpoint
        written = []
        if trainer.is_global_zero and getattr(pl_module, "lora_settings", None):
            from ldm.weights.lora import lora_state_dict
            written.append(save_checkpoint(self.ckptdir / f"lora-{tag}.safetensors", lora_state_dict(pl_module),
                                           global_step=trainer.global_step))
        if trainer.is_global_zero and self.pruned:
            from ldm.export.prune import prune_state_dict
            from ldm.weights.lora import plain_keys
            sd = pl_module.state_dict()
            if hasattr(pl_module, "saved_layout"):  # bf16-stored weights are written as fp32 (or self.dtype)
                sd = pl_module.saved_layout(sd)
            sd, _ = prune_state_dict(plain_keys(sd), dtype=self.dtype, use_ema=self.ema)
            suffix = ".safetensors" if self.safetensors else ".ckpt"
            written.append(save_checkpoint(self.ckptdir / f"pruned-{tag}{suffix}", sd,
                                           global_step=trainer.global_step))
        return written
