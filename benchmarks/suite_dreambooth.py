"""``--suite dreambooth``: seconds and memory of one DreamBooth training step of our LatentDiffusion, in each of
the memory-saving variants a user can switch on.

    python scripts/benchmark.py --suite dreambooth --markdown                  # tiny config, 64 px, CPU
    python scripts/benchmark.py --suite dreambooth --config v1 --size 512 --repeat 1 --warmup 1 --threads 1
    python scripts/benchmark.py --suite dreambooth --config v1 --device cuda --variants full+ckpt,lora4+ckpt

The model is the real module, built (random weights) from the fine-tuning config with each variant's overrides;
the batch is what the DataLoader gives training: one subject and one class image, read by a DreamBoothDataset
from a temporary folder of two generated pictures. One step is what Lightning 2's automatic optimization runs per
batch: ``shared_step`` under the precision plugin's autocast, the module's ``optimizer_zero_grad`` (set to None),
backward, the optimizer step (through a GradScaler for fp16), the LR scheduler's step and, on a CPU, the training
run's ``ReleaseFreedMemory`` callback (freed memory handed back to the OS), in the environment ``main.py`` sets
(``cell_env``). Lightning zeroes the
gradients after the forward, so the previous step's gradients are still held while the next forward runs.
Step k draws its timestep, noise and latent sample from a generator seeded with k (as training with
``noise_seed`` does) and every variant starts from the same seeded weights, so the variants that only save
memory report the same first-step loss: the tests hold them to it.

Variant names are ``+``-joined switches (``Variant.parse``), so any combination can be asked for with
``--variants``; the lean-training switches (README: "Training on small GPUs") are ``fused`` (fused backward), ``bf16w``
(weights stored in bf16), ``compile`` and ``cl`` (channels-last); the big-transformer ones ``bf16`` / ``fp8`` (frozen
weights in bf16 / float8), ``fp8t5`` (text encoders in float8) and ``swapN`` (block swap). SDXL (``--config sdxl`` /
``tiny-sdxl``): the LoRA recipe of sdxl-dreambooth-lora.yaml and a full UNet fine-tune, each plain and lean. FLUX.1
(``--config flux-dev`` / ``tiny-flux``, ``--width``): the LoRA recipe of flux1-dev-dreambooth-lora.yaml with each
memory switch, and a full fine-tune (benchmarks/dreambooth_flux.py). ``--peer diffusers`` adds, per row, the
diffusers script a user would otherwise run with the options it has (SD v1: train_dreambooth.py,
benchmarks/peer_dreambooth.py; FLUX.1: train_dreambooth_lora_flux.py, benchmarks/peer_dreambooth_flux.py) and a
table of ours / peer ratios.
"""
from __future__ import annotations

import argparse
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Optional

from benchmarks.dreambooth_flux import FLUX_RECIPE, flux_notes, flux_variants, prepare_config, quick_random_init
from benchmarks.dreambooth_variants import (FLAGS, PEERS, SDXL_RECIPE, SDXL_VARIANTS, V1_LEAN, V1_VARIANTS, Variant,
                                            check_variant, config_family, variant_config)
from benchmarks.harness import (REPO, Cell, Meter, Result, comparison_header, comparison_rows, fill_zero_parameters_,
                                fmt_peak, format_table, process_words, resolve_config, summary_line)
from ldm.util import fmt_bytes

CLASS_WORD = "dog"  # captions "photo of a sks dog" / "photo of a dog" with the configs' token and templates
REFERENCE = "full+ckpt"  # the recipe of v1-finetune_unfrozen.yaml, which the ratio column compares with
MIXED_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}  # str(autocast dtype) -> the report's name


def import_peer_modules(family: str) -> None:
    """Import what the family's rows and its peer's use, in every cell alike before the memory baseline is read,
    so that "after build" compares like with like."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401 (the SD peer's)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
    if family == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: F401
        from transformers import T5EncoderModel, T5TokenizerFast  # noqa: F401


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
    """What the module's hooks read from a Lightning Trainer: ``max_steps`` (``configure_optimizers``),
    ``datamodule.train_dataset`` (``on_fit_start`` builds the latent and text caches from it) and
    ``strategy.root_device`` (``configure_model``, which runs before the model moves there: block swap and compile
    need the device it will train on)."""
    max_steps: int
    datamodule: Any
    strategy: Any


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
        from ldm.training.callbacks import ReleaseFreedMemory
        self.release = ReleaseFreedMemory()  # as in a training run: freed CPU memory goes back to the OS
        self.release.on_fit_start(None, model)

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
        self.release.on_train_batch_end(None, self.model, None, self.batch, self.steps)
        if self.first_loss is None:
            self.first_loss = float(loss.detach())
        self.steps += 1


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's state tensors (moments; 8-bit: also block scales and the shared quantile maps,
    each tensor counted once)."""
    import torch
    states = optimizer.inner_state() if hasattr(optimizer, "inner_state") else optimizer.state.values()
    tensors = {v.data_ptr(): v.numel() * v.element_size()
               for state in states for v in state.values() if torch.is_tensor(v)}
    return sum(tensors.values())


def frozen_weight_bytes(model: Any) -> int:
    """Bytes of the frozen parts' frozen parameters and buffers (``frozen_parts``: the autoencoder, frozen text
    encoders, and the network under LoRA, less its adapters), wherever they are: what ``frozen_dtype`` and
    ``text_encoder_fp8`` shrink."""
    from ldm.modules.lowmem import parameters_bytes
    parts = model.frozen_parts()
    trained = {id(p): p for part in parts for p in part.parameters() if p.requires_grad}
    return parameters_bytes(parts) - sum(p.numel() * p.element_size() for p in trained.values())


def optimizer_name(optimizer: Any) -> str:
    """The AdamW class that does the work (inside a ``PerTensorOptimizer``, its inner optimizers')."""
    return type(optimizer.inner[0] if hasattr(optimizer, "inner") else optimizer).__name__


def fmt_count(n: int) -> str:
    """Parameter counts: ``982.6 M``, ``797.2 k``."""
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


class DreamBoothSuite:
    help = "our DreamBooth training step in its memory-saving variants (--peer diffusers: beside diffusers')"
    configs = {"tiny": REPO / "configs/stable-diffusion/tiny-finetune.yaml",
               "v1": REPO / "configs/stable-diffusion/v1-finetune_unfrozen.yaml",
               "tiny-sdxl": REPO / "configs/stable-diffusion/tiny-sdxl-finetune.yaml",
               "sdxl": REPO / "configs/stable-diffusion/sdxl-dreambooth-lora.yaml",
               "tiny-flux": REPO / "configs/flux/tiny-flux-finetune.yaml",
               "flux-dev": REPO / "configs/flux/flux1-dev-dreambooth-lora.yaml",
               "toy": REPO / "configs/toy/dreambooth.yaml"}  # the shipped toy model's recipe (the web UI's estimate)
    header = ["variant", "s/step", "it/s", "peak (+over model)", "after build", "trainable params",
              "optimizer state", f"time, peak vs {REFERENCE}"]
    #: FLUX rows also show what the frozen-weight switches shrink and the loss they start from.
    flux_header = header[:5] + ["frozen weights"] + header[5:7] + ["first loss", header[7]]
    family = "sd"

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--size", type=int, default=None,
                           help="image side in px (default: the config's data.params.size: 64 tiny, tiny-sdxl and "
                                "tiny-flux, 512 v1, 1024 sdxl and flux-dev)")
        group.add_argument("--variants", default="all",
                           help=f"comma-separated +-joined switches (e.g. full+ckpt+8bit+fused; kinds full, unet, "
                                f"loraR; switches {', '.join(FLAGS)}, swapN), or all: SD v1 "
                                f"{', '.join(V1_VARIANTS + V1_LEAN)}; SDXL {', '.join(SDXL_VARIANTS)}; FLUX.1 "
                                f"{FLUX_RECIPE} alone and with each of bf16, fp8, fp8t5, cached, swap(blocks - 1), "
                                f"and unet+ckpt+8bit")
        group.add_argument("--peer", choices=("none", "diffusers"), default="none",
                           help="diffusers: also run the diffusers script a user would otherwise run with each row's "
                                "options (SD v1: train_dreambooth.py; FLUX.1: train_dreambooth_lora_flux.py) and "
                                "print ours / peer ratios")
        group.add_argument("--peer-rows", choices=("all", "reference"), default="all",
                           help="which of our rows get their peer row: all, or the reference row's only (each peer "
                                "row is another build: at FLUX.1-dev's size a minute of building)")
        group.add_argument("--width", type=int, default=None,
                           help="FLUX.1 only: the transformer's hidden size (its heads keep the config's head width; "
                                "default: the config's), e.g. 1024 on a CPU, where the tiny model's weights are too "
                                "small to show in peak RSS")

    def cells(self, args: argparse.Namespace) -> list[Cell]:
        """``--variants``: ``all`` or comma-separated names, in the order given; then the peer's rows."""
        from omegaconf import OmegaConf
        path = resolve_config(args.config, self.configs)
        self.family = family = config_family(path)
        config = OmegaConf.load(path)
        if args.variants != "all":
            names = [v for v in args.variants.split(",") if v]
        else:
            names = list({"sd": V1_VARIANTS + V1_LEAN, "sdxl": SDXL_VARIANTS}.get(family) or flux_variants(config))
        unknown = []
        for v in names:
            try:
                variant = Variant.parse(v)
            except ValueError:
                unknown.append(v)
                continue
            check_variant(v, variant, family, config)
        if unknown or not names:
            raise SystemExit(f"--variants: unknown {unknown or args.variants!r}; name a kind (full, unet, loraR) and "
                             f"switches ({', '.join(FLAGS)}, swapN) joined by +, or all")
        if args.width and family != "flux":
            raise SystemExit(f"--width: narrows FLUX.1's transformer; {args.config} is not a FLUX config")
        # The ratio column's reference: v1's recipe, SDXL's, FLUX's, else the first row asked for.
        self.reference = next((r for r in (REFERENCE, SDXL_RECIPE, FLUX_RECIPE) if r in names), names[0])
        header = self.flux_header if family == "flux" else self.header
        self.header = header[:-1] + [f"time, peak vs {self.reference}"]
        cells = [dict(variant=v) for v in names]
        if args.peer == "diffusers":
            if family not in PEERS:
                raise SystemExit("--peer diffusers: the peers are diffusers' SD v1 train_dreambooth.py and FLUX.1 "
                                 "train_dreambooth_lora_flux.py steps; SDXL has none")
            asked = names if args.peer_rows == "all" else [self.reference]
            peers = dict.fromkeys(p for p in (Variant.parse(v).peer_name(family) for v in asked) if p)
            cells += [dict(variant=p, impl="diffusers") for p in peers]
        return cells

    def cell_env(self, cell: Cell) -> dict[str, str]:
        """Our rows run in the environment ``main.py`` gives a training run; the peer's in the caller's, as a user
        would start diffusers' script."""
        from ldm.util import TRAINING_ENVIRONMENT
        return {} if cell.get("impl") == "diffusers" else dict(TRAINING_ENVIRONMENT)

    def preload(self, args: argparse.Namespace) -> None:
        """What every cell imports before its memory baseline (``benchmarks/zygote.py`` does it once)."""
        import pytorch_lightning  # noqa: F401
        import torch  # noqa: F401
        import ldm.models.diffusion.ddpm  # noqa: F401
        import_peer_modules(config_family(resolve_config(args.config, self.configs)))

    def run_cell(self, args: argparse.Namespace, config_path: Path, cell: Cell, meter: Meter) -> Result:
        """Build the variant's model (or the peer's from its weights), run ``warmup + repeat`` steps; seconds,
        parameters, optimizer state, loss."""
        import torch
        from pytorch_lightning.utilities import move_data_to_device
        from torch.utils.data import default_collate
        from ldm.util import instantiate_from_config
        family = config_family(config_path)
        import_peer_modules(family)
        variant = Variant.parse(cell["variant"])
        config = variant_config(config_path, variant)
        size = args.size or int(config.data.params.size)
        mixed = mixed_dtype(args.device) if variant.autocast else None
        if mixed == torch.float16 and (variant.fused or variant.bf16_weights or variant.frozen_dtype != "fp32"):
            raise RuntimeError("fused backward, bf16 weights and bf16/fp8 frozen weights need bf16 (this GPU's mixed "
                               "precision is fp16)")
        with tempfile.TemporaryDirectory() as tmp:  # the pictures and a stand-in T5 tokenizer, read while building
            if family == "flux":
                prepare_config(config, args.width, Path(tmp))
            torch.manual_seed(0)
            dataset = make_dataset(config.data.params, size, Path(tmp))  # decoded into memory in __init__
            batch = default_collate([dataset[0]])
            torch.manual_seed(0)  # the same base weights in every variant, standing in for a pretrained model
            with quick_random_init() if family == "flux" else nullcontext():
                model = instantiate_from_config(config.model)
            fill_zero_parameters_(model.model)
            model.learning_rate = float(config.model.base_learning_rate)
            if cell.get("impl") == "diffusers":
                batch = move_data_to_device(batch, args.device)
                return self.run_peer(args, config, model, variant, batch, mixed, meter, size, family)
        return self.run_ours(args, config, model, dataset, batch, mixed, meter, size)

    def run_ours(self, args: argparse.Namespace, config: Any, model: Any, dataset: Any, batch: Any, mixed: Any,
                 meter: Meter, size: int) -> Result:
        """Our step, set up as ``Trainer.fit`` sets it up, in its order: the module in train mode (frozen parts
        stay in eval), ``configure_model`` (bf16 weights, float8, block swap, channels-last, compile) before the
        model moves to its device, then ``configure_optimizers`` and ``CacheFrozenInputs.on_fit_start`` (the
        caches; on CUDA it then moves the frozen parts to the CPU)."""
        import torch
        from omegaconf import OmegaConf
        from pytorch_lightning.utilities import move_data_to_device
        from ldm.training.callbacks import CacheFrozenInputs
        if model.lora_settings:
            model.add_lora()  # as main.py does, after the (here random) base weights
        torch.backends.cudnn.benchmark = bool(OmegaConf.select(config, "lightning.trainer.benchmark",
                                                               default=False))
        device = torch.device(args.device)
        model.trainer = StandInTrainer(max_steps=args.warmup + args.repeat,
                                       datamodule=SimpleNamespace(train_dataset=dataset),
                                       strategy=SimpleNamespace(root_device=device))
        model.train()
        model.configure_model()
        model.to(device)
        meter.model_built()
        step = TrainStep(model, move_data_to_device(batch, device), mixed)
        CacheFrozenInputs().on_fit_start(model.trainer, model)
        seconds = meter.time(step)
        trainable = model.trainable_parameters()
        swap = getattr(model, "block_swap", None)
        return dict(seconds=seconds, trainable_params=sum(p.numel() for p in trainable),
                    trainable_tensors=len(trainable), optimizer_state_bytes=optimizer_state_bytes(step.optimizer),
                    optimizer=optimizer_name(step.optimizer), mixed=MIXED_NAMES.get(str(step.mixed)),
                    cached=model.latent_cache is not None, first_loss=step.first_loss, size=size,
                    weights_dtype=str(trainable[0].dtype).removeprefix("torch."),
                    per_tensor=hasattr(step.optimizer, "inner"), frozen_bytes=frozen_weight_bytes(model),
                    frozen_dtype=model.frozen_dtype, text_encoder_fp8=model.text_encoder_fp8,
                    blocks_to_swap=model.blocks_to_swap, swapped_blocks=len(swap.swapped) if swap else 0)

    def run_peer(self, args: argparse.Namespace, config: Any, model: Any, variant: Variant, batch: Any, mixed: Any,
                 meter: Meter, size: int, family: str) -> Result:
        """The family's diffusers script's step on ``model``'s weights (which it takes over; ours is dropped)."""
        import gc
        from omegaconf import OmegaConf
        from ldm.export.diffusers import model_params
        from ldm.optim.build import ADAMW_DEFAULTS
        params = model_params(config)
        settings = {**ADAMW_DEFAULTS, **{k: v for k, v in (params.get("optimizer_config") or {}).items()
                                         if k in ADAMW_DEFAULTS}}
        settings["betas"] = tuple(settings["betas"])
        lr = float(OmegaConf.select(config, "model.base_learning_rate"))
        if family == "flux":
            from benchmarks.peer_dreambooth_flux import FluxPeerStep
            step = FluxPeerStep(model.to(args.device), params, batch, variant.lora_rank, variant.checkpointing,
                                variant.optimizer, lr, settings, mixed, variant.cached)
        else:
            from benchmarks.peer_dreambooth import PeerStep
            step = PeerStep(model.to(args.device), params, batch, variant.text_encoder, variant.checkpointing,
                            variant.optimizer, lr, settings, mixed)
        del model
        gc.collect()
        meter.model_built()
        seconds = meter.time(step)
        return dict(seconds=seconds, trainable_params=sum(p.numel() for p in step.params),
                    trainable_tensors=len(step.params),
                    optimizer_state_bytes=optimizer_state_bytes(step.optimizer),
                    optimizer=type(step.optimizer).__name__, mixed=MIXED_NAMES.get(str(mixed)),
                    cached=variant.cached, first_loss=step.first_loss, size=size,
                    weights_dtype=str(step.params[0].dtype).removeprefix("torch."))

    def rows(self, results: list[Result]) -> list[list[str]]:
        """One row per variant of ours; the last column is time and peak relative to the reference recipe. A
        swapN row where no block moved (no accelerator) says so in its label."""
        reference = getattr(self, "reference", REFERENCE)
        flux = self.family == "flux"
        ours = [r for r in results if "impl" not in r]
        ref = next((r for r in ours if r.get("variant") == reference and "median_s" in r), None)
        rows = []
        for r in ours:
            if "median_s" not in r:
                rows.append([r["variant"], "failed"] + ["-"] * (len(self.header) - 2))
                continue
            vs = f"{r['median_s'] / ref['median_s']:.2f}, {r['peak_bytes'] / ref['peak_bytes']:.2f}" if ref else "-"
            label = r["variant"] + (" (no accelerator: nothing swapped)"
                                    if r.get("blocks_to_swap") and not r.get("swapped_blocks") else "")
            frozen = [fmt_bytes(r["frozen_bytes"])] if flux else []
            loss = [f"{r['first_loss']:.6g}"] if flux else []
            rows.append([label, f"{r['median_s']:.4g}", f"{1 / r['median_s']:.3g}", fmt_peak(r),
                         fmt_bytes(r["model_bytes"]), *frozen, fmt_count(r["trainable_params"]),
                         fmt_bytes(r["optimizer_state_bytes"]), *loss, vs])
        return rows

    def after_table(self, args: argparse.Namespace, results: list[Result]) -> str:
        """``--peer``: each of our rows beside the peer's row with the options the peer has."""
        peers = {r["variant"]: r for r in results if r.get("impl") == "diffusers"}
        if not peers:
            return ""
        pairs, labels = [], {}
        for r in (r for r in results if "impl" not in r):
            base = Variant.parse(r["variant"]).peer_name(self.family)
            if base in peers:
                labels[r["variant"]] = f"{r['variant']} (peer: {base})"
                pairs += [dict(r, impl="ours", measurement=r["variant"]),
                          dict(peers[base], impl="diffusers", measurement=r["variant"])]
        if self.family == "flux":
            intro = ("Ours beside diffusers' train_dreambooth_lora_flux.py step (benchmarks/peer_dreambooth_flux.py) "
                     "with the options it has (its default LoRA targets, text embeddings computed once and the text "
                     "encoders deleted, clip_grad_norm 1.0; no float8, no block swap); s/step; ratios ours / "
                     "diffusers:\n")
        else:
            intro = ("Ours beside diffusers' train_dreambooth.py step (benchmarks/peer_dreambooth.py) with the options "
                     "it has (no caches, no lean switches; clip_grad_norm 1.0 as the script does); s/step; ratios ours "
                     "/ diffusers:\n")
        return intro + format_table(comparison_header("ours", "diffusers"),
                                    comparison_rows(pairs, labels, "ours", "diffusers"), args.markdown)

    def describe(self, args: argparse.Namespace, results: list[Result]) -> str:
        """The header: machine, versions, settings, what one step holds and what the memory columns mean."""
        ok = [r for r in results if "size" in r]
        size = ok[0]["size"] if ok else args.size
        names = sorted({r["mixed"] for r in ok if r.get("mixed")})
        mixed = (f"{'/'.join(names)} autocast" if names else
                 "autocast (CPU: bf16; CUDA: bf16, else fp16 + GradScaler)")
        memory = ("peak allocated CUDA memory from the built model on (caching included)" if args.device == "cuda"
                  else f"peak RSS of {process_words(args)} per variant (everything: interpreter, frozen VAE and "
                       "text encoder, building, caching)")
        settings = [f"{size} px", "batch 1 subject + 1 class image"]
        if self.family == "flux":
            width = args.width or "the config's"
            return "\n".join([summary_line(args, results, ["bitsandbytes", "peft", "diffusers"],
                                            [*settings, f"transformer width {width}"]),
                              *flux_notes(args.device == "cuda"),
                              f"Memory: {memory}; (+x) = above the memory held right after building the model "
                              f"(\"after build\")."])
        return "\n".join([
            summary_line(args, results, ["bitsandbytes", "peft"], settings),
            "Step (Lightning 2's order): shared_step (VAE encode, text encoder, UNet, prior-preservation loss) "
            "under autocast for +mixed, zero_grad(set_to_none), backward, optimizer step, LR scheduler step; on a CPU "
            "our rows return freed memory to the OS as training's ReleaseFreedMemory callback does, in the "
            "environment main.py sets (THP_MEM_ALLOC_ENABLE=1); the peer's script does neither.",
            f"full: UNet + text encoder trained; unet / loraR: text encoder frozen; ckpt: UNet gradient "
            f"checkpointing (ResBlocks and transformer blocks; the text encoder has none); "
            f"8bit: bitsandbytes AdamW8bit; mixed: {mixed}; cached: latents and text embeddings "
            f"from on_fit_start's caches; fused: each update inside backward, gradients freed as it goes; bf16w: "
            f"trainable weights stored in bf16 (stochastic rounding, fp32/8-bit state); compile: torch.compile of "
            f"the UNet (its compilation is in the warm-up steps); cl: channels-last UNet.",
            f"Memory: {memory}; (+x) = above the memory held right after building the model (\"after build\")."])
