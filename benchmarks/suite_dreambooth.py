"""``--suite dreambooth``: seconds and memory of one DreamBooth training step of our LatentDiffusion, in each of
the memory-saving variants a user can switch on.

    python scripts/benchmark.py --suite dreambooth --markdown                  # tiny config, 64 px, CPU
    python scripts/benchmark.py --suite dreambooth --config v1 --size 512 --repeat 1 --warmup 1 --threads 1
    python scripts/benchmark.py --suite dreambooth --config v1 --device cuda --variants full+ckpt,lora4+ckpt

The model is the real module, built (random weights) from the fine-tuning config with each variant's overrides;
the batch is what the DataLoader gives training: one subject and one class image, read by a DreamBoothDataset
from a temporary folder of two generated pictures. One step is what Lightning 2's automatic optimization runs per
batch: ``shared_step`` under the precision plugin's autocast, the module's ``optimizer_zero_grad`` (set to None),
backward, the optimizer step (through a GradScaler for fp16) and the LR scheduler's step. Lightning zeroes the
gradients after the forward, so the previous step's gradients are still held while the next forward runs.
Step k draws its timestep, noise and latent sample from a generator seeded with k (as training with
``noise_seed`` does) and every variant starts from the same seeded weights, so the variants that only save
memory report the same first-step loss: the tests hold them to it.
"""
from __future__ import annotations

import argparse
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Optional

from benchmarks.harness import REPO, Cell, Meter, Result, fill_zero_parameters_, fmt_peak, summary_line
from ldm.util import fmt_bytes

CLASS_WORD = "dog"  # captions "photo of a sks dog" / "photo of a dog" with the configs' token and templates
REFERENCE = "full+ckpt"  # the recipe of v1-finetune_unfrozen.yaml, which the ratio column compares with
MIXED_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}  # str(autocast dtype) -> the report's name


@dataclass(frozen=True)
class Variant:
    """The config switches of one row. Names: full / unet (text encoder trained or frozen), loraR (rank-R
    adapters on the frozen UNet's attention), +ckpt (UNet gradient checkpointing), +8bit (AdamW8bit),
    +mixed (autocast), +cached (VAE latents and text embeddings computed once, before the steps)."""
    text_encoder: bool
    checkpointing: bool
    optimizer: str = "adamw"
    mixed: bool = False
    cached: bool = False
    lora_rank: Optional[int] = None

    def overrides(self) -> dict[str, Any]:
        """Dotted config keys -> values; everything else comes from the fine-tuning config."""
        return {"model.params.cond_stage_trainable": self.text_encoder,
                "model.params.unet_config.params.use_checkpoint": self.checkpointing,
                "model.params.optimizer_config.name": self.optimizer,
                "model.params.cache_latents": self.cached,
                "model.params.lora_config": {"rank": self.lora_rank} if self.lora_rank else None}


VARIANTS = {
    "full": Variant(text_encoder=True, checkpointing=False),
    "full+ckpt": Variant(text_encoder=True, checkpointing=True),
    "unet+ckpt": Variant(text_encoder=False, checkpointing=True),
    "unet": Variant(text_encoder=False, checkpointing=False),
    "full+ckpt+8bit": Variant(text_encoder=True, checkpointing=True, optimizer="adamw8bit"),
    "full+ckpt+8bit+mixed": Variant(text_encoder=True, checkpointing=True, optimizer="adamw8bit", mixed=True),
    "unet+ckpt+8bit+mixed+cached": Variant(text_encoder=False, checkpointing=True, optimizer="adamw8bit",
                                           mixed=True, cached=True),
    "lora4+ckpt": Variant(text_encoder=False, checkpointing=True, lora_rank=4),
    "lora16+ckpt": Variant(text_encoder=False, checkpointing=True, lora_rank=16),
}


def variant_config(path: Path, variant: Variant) -> Any:
    """The fine-tuning config at ``path`` with the variant's switches."""
    from omegaconf import OmegaConf
    config = OmegaConf.load(path)
    for key, value in variant.overrides().items():
        OmegaConf.update(config, key, value, force_add=True)
    return config


def make_dataset(data: Mapping[str, Any], size: int, folder: Path) -> Any:
    """One subject and one class picture (random pixels, saved as PNG), read back by the real dataset class with
    the config's token, templates and flip probability."""
    import numpy as np
    from PIL import Image
    from ldm.data.dreambooth import DreamBoothDataset
    rng = np.random.default_rng(0)
    for role in ("subject", "class"):
        (folder / role).mkdir()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / role / "0.png")
    options = {k: data[k] for k in ("flip_p", "subject_template", "class_template") if data.get(k) is not None}
    return DreamBoothDataset(folder / "subject", data.get("token") or "sks", CLASS_WORD,
                             reg_data_root=folder / "class", size=size, **options)


@dataclass
class StandInTrainer:
    """What the module's hooks read from a Lightning Trainer: ``max_steps`` (``configure_optimizers``) and
    ``datamodule.train_dataset`` (``on_fit_start`` builds the latent and text caches from it)."""
    max_steps: int
    datamodule: Any


def mixed_dtype(device: str) -> Any:
    """Lightning's ``precision: auto`` choice on CUDA: bf16-mixed where supported, else 16-mixed; bf16 on CPU."""
    import torch
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class TrainStep:
    """One optimisation step in the order of Lightning 2's automatic optimization (see the module docstring)."""

    def __init__(self, model: Any, batch: Mapping[str, Any], mixed: Any) -> None:
        import torch
        self.model, self.batch, self.mixed = model, batch, mixed
        optim = model.configure_optimizers()
        self.optimizer, self.scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        # fp16 needs loss scaling (its gradients underflow); bf16 has fp32's exponent range and does not.
        self.scaler = torch.amp.GradScaler(model.device.type) if mixed == torch.float16 else None
        self.steps = 0
        self.first_loss: Optional[float] = None

    def __call__(self) -> None:
        import torch
        device = self.model.device.type
        generator = torch.Generator(self.model.device).manual_seed(self.steps)
        with torch.autocast(device, dtype=self.mixed) if self.mixed is not None else nullcontext():
            loss, _ = self.model.shared_step(self.batch, generator)
        self.model.optimizer_zero_grad(0, 0, self.optimizer)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # Lightning's MixedPrecision plugin: unscale (for clipping hooks), step unless inf/nan, update
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        if self.first_loss is None:
            self.first_loss = float(loss)
        self.steps += 1


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's state tensors (moments; 8-bit: also block scales and the shared quantile maps,
    each tensor counted once)."""
    import torch
    tensors = {v.data_ptr(): v.numel() * v.element_size()
               for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)}
    return sum(tensors.values())


def fmt_count(n: int) -> str:
    """Parameter counts: ``982.6 M``, ``797.2 k``."""
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


class DreamBoothSuite:
    help = "our DreamBooth training step in its memory-saving variants"
    configs = {"tiny": REPO / "configs/stable-diffusion/tiny-finetune.yaml",
               "v1": REPO / "configs/stable-diffusion/v1-finetune_unfrozen.yaml"}
    header = ["variant", "s/step", "it/s", "peak (+over model)", "after build", "trainable params",
              "optimizer state", f"time, peak vs {REFERENCE}"]

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--size", type=int, default=None,
                           help="image side in px (default: the config's data.params.size: 64 tiny, 512 v1)")
        group.add_argument("--variants", default="all",
                           help=f"comma-separated subset of {', '.join(VARIANTS)}; or all")

    def cells(self, args: argparse.Namespace) -> list[Cell]:
        """``--variants``: ``all`` or comma-separated names, in the order given."""
        names = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown or not names:
            raise SystemExit(f"--variants: unknown {unknown or args.variants!r}; "
                             f"choose from all, {', '.join(VARIANTS)}")
        return [dict(variant=v) for v in names]

    def run_cell(self, args: argparse.Namespace, config_path: Path, cell: Cell, meter: Meter) -> Result:
        """Build the variant's model, run ``warmup + repeat`` steps; seconds, parameters, optimizer state, loss."""
        import torch
        # Every variant imports the same modules before the baseline is read, so "after build" compares like
        # with like.
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        from omegaconf import OmegaConf
        from pytorch_lightning.utilities import move_data_to_device
        from torch.utils.data import default_collate
        from ldm.callbacks import CacheFrozenInputs
        from ldm.util import instantiate_from_config
        variant = VARIANTS[cell["variant"]]
        config = variant_config(config_path, variant)
        size = args.size or int(config.data.params.size)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            dataset = make_dataset(config.data.params, size, Path(tmp))  # decoded into memory in __init__
        batch = default_collate([dataset[0]])

        torch.manual_seed(0)  # the same base weights in every variant, standing in for a pretrained model
        model = instantiate_from_config(config.model)
        fill_zero_parameters_(model.model)
        model.learning_rate = float(config.model.base_learning_rate)
        if model.lora_settings:
            model.add_lora()  # as main.py does, after the (here random) base weights
        model.to(args.device)
        meter.model_built()

        # What Trainer.fit does before the first batch: the module in train mode (frozen parts stay in eval),
        # configure_optimizers, CacheFrozenInputs.on_fit_start (the caches; on CUDA it then moves the frozen
        # parts to the CPU).
        torch.backends.cudnn.benchmark = bool(OmegaConf.select(config, "lightning.trainer.benchmark",
                                                               default=False))
        model.trainer = StandInTrainer(max_steps=args.warmup + args.repeat,
                                       datamodule=SimpleNamespace(train_dataset=dataset))
        model.train()
        step = TrainStep(model, move_data_to_device(batch, model.device),
                         mixed_dtype(args.device) if variant.mixed else None)
        CacheFrozenInputs().on_fit_start(model.trainer, model)
        seconds = meter.time(step)
        trainable = model.trainable_parameters()
        return dict(seconds=seconds, trainable_params=sum(p.numel() for p in trainable),
                    trainable_tensors=len(trainable), optimizer_state_bytes=optimizer_state_bytes(step.optimizer),
                    optimizer=type(step.optimizer).__name__, mixed=MIXED_NAMES.get(str(step.mixed)),
                    cached=model.latent_cache is not None, first_loss=step.first_loss, size=size)

    def rows(self, results: list[Result]) -> list[list[str]]:
        """One row per variant; the last column is time and peak relative to the reference recipe."""
        ref = next((r for r in results if r.get("variant") == REFERENCE and "median_s" in r), None)
        rows = []
        for r in results:
            if "median_s" not in r:
                rows.append([r["variant"], "failed"] + ["-"] * (len(self.header) - 2))
                continue
            vs = f"{r['median_s'] / ref['median_s']:.2f}, {r['peak_bytes'] / ref['peak_bytes']:.2f}" if ref else "-"
            rows.append([r["variant"], f"{r['median_s']:.4g}", f"{1 / r['median_s']:.3g}", fmt_peak(r),
                         fmt_bytes(r["model_bytes"]), fmt_count(r["trainable_params"]),
                         fmt_bytes(r["optimizer_state_bytes"]), vs])
        return rows

    def describe(self, args: argparse.Namespace, results: list[Result]) -> str:
        """The header: machine, versions, settings, what one step holds and what the memory columns mean."""
        ok = [r for r in results if "size" in r]
        size = ok[0]["size"] if ok else args.size
        names = sorted({r["mixed"] for r in ok if r.get("mixed")})
        mixed = (f"{'/'.join(names)} autocast" if names else
                 "autocast (CPU: bf16; CUDA: bf16, else fp16 + GradScaler)")
        memory = ("peak allocated CUDA memory from the built model on (caching included)" if args.device == "cuda"
                  else "peak RSS of a fresh process per variant (everything: interpreter, frozen VAE and text "
                       "encoder, building, caching)")
        return "\n".join([
            summary_line(args, results, ["bitsandbytes", "peft"],
                         [f"{size} px", "batch 1 subject + 1 class image"]),
            "Step (Lightning 2's order): shared_step (VAE encode, text encoder, UNet, prior-preservation loss) "
            "under autocast for +mixed, zero_grad(set_to_none), backward, optimizer step, LR scheduler step.",
            f"full: UNet + text encoder trained; unet / loraR: text encoder frozen; ckpt: UNet gradient "
            f"checkpointing (ResBlocks and transformer blocks; the text encoder has none); "
            f"8bit: bitsandbytes AdamW8bit; mixed: {mixed}; cached: latents and text embeddings "
            f"from on_fit_start's caches.",
            f"Memory: {memory}; (+x) = above the memory held right after building the model (\"after build\")."])
