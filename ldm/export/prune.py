"""Pruning a SD v1 or SDXL checkpoint to what sampling needs, and the sizes that pruning saves (SD v1).

A DreamBooth run saves a Lightning checkpoint: the model's ``state_dict`` (possibly with a full copy of the UNet
as ``model_ema.*``) next to optimizer moments, LR-scheduler, callback and loop states. Sampling a SD v1 model
reads only the UNet (``model.diffusion_model.*``), the VAE (``first_stage_model.*``), the text encoder
(``cond_stage_model.*``) and the 12 schedule buffers, so that is all a pruned file keeps, optionally in half
precision. An SDXL model (recognised by ``ldm.families``) reads the UNet, the VAE and the conditioner
(``conditioner.*``: both text encoders; the size embedders have no weights) and no schedule buffers: the released
SDXL files carry none, and its configs compute the schedule (``persist_schedule: false``).

Precision of a pruned half file: every floating tensor of the three sub-models is halved; integer buffers
(``position_ids``, int64) stay as they are, and so do the 12 schedule buffers, which stay float32. The community
prune scripts of the v1 era halved those too, but they are 48 KB in all, the DDIM/PLMS coefficients are read
from them (``alphas_cumprod``), and fp16 rounds ``alphas_cumprod`` by up to 5e-4 relative: keeping them exact
makes the only difference between the fp32 and the fp16 file the network weights themselves. Our loader
(``ldm.weights.checkpoint.load_checkpoint``) casts every tensor to the model's dtype, so it reads files either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS
from ldm.reference import LAYOUT_DIR, SD_V1, SD_V1_EMA, read_layout
from ldm.util import fmt_bytes
from ldm.weights.checkpoint import GROUPS, CheckpointError, bake_adapters, ema_key, guess_kind, read_checkpoint, \
    refuse_nonfinite, \
    save_checkpoint, select_weights

UNET = "model.diffusion_model."
#: The sub-models sampling needs, by key prefix; every other prefix (``model_ema.``...) is dropped.
INFERENCE_PREFIXES = (UNET, "first_stage_model.", "cond_stage_model.")
#: Keys that mark another model family sharing the v1 prefixes (SD 2 text encoder, SDXL class embedding).
FOREIGN_PREFIXES = ("cond_stage_model.model.", "conditioner.", "model.diffusion_model.label_emb")
HALF_DTYPES = (torch.float16, torch.bfloat16)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}
GB = 1e9


@dataclass(frozen=True)
class InferenceLayout:
    """What a family's sampling model holds: its sub-models' key prefixes, and whether the schedule buffers (from
    the family's record, ``ldm.families``)."""
    prefixes: tuple[str, ...]
    schedule: bool


SD_V1_LAYOUT = InferenceLayout(INFERENCE_PREFIXES, schedule=True)


#: A measured latent scale (``scale_by_std``, the toy model): kept whatever the layout.
SCALE_KEY = "scale_factor"
#: Top-level tensors that stay float32 when the weights are halved.
KEPT_BUFFERS = (*SCHEDULE_BUFFERS, SCALE_KEY)


def is_inference_key(key: str, layout: InferenceLayout = SD_V1_LAYOUT) -> bool:
    """True for the keys a sampling model's ``state_dict`` holds (``use_ema: False``)."""
    return key.startswith(layout.prefixes) or (layout.schedule and key in SCHEDULE_BUFFERS) or key == SCALE_KEY


def inference_layout(sd: Mapping[str, torch.Tensor]) -> InferenceLayout:
    """The layout to prune ``sd`` to: its family's (``Family.inference_prefixes``), SD v1's after ``check_sd_v1``;
    ``CheckpointError`` (one line, no path) when a sub-model is missing or the file is of another family."""
    from ldm.families import FAMILIES, detect_family
    family = FAMILIES.get(detect_family({k: tuple(v.shape) for k, v in sd.items()}))
    if family is None or family.inference_prefixes == INFERENCE_PREFIXES:
        check_sd_v1(sd)  # SD v1, or a file that is not: said in one line
        return SD_V1_LAYOUT
    layout = InferenceLayout(family.inference_prefixes, family.schedule_in_file)
    absent = [GROUPS[prefix] for prefix in layout.prefixes if not any(k.startswith(prefix) for k in sd)]
    if absent:
        raise CheckpointError(f"a {family.label} checkpoint without sub-models: no {', no '.join(absent)} keys")
    return layout


def ema_coverage(sd: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """``(UNet keys with an EMA copy, UNet keys)``: a file has full EMA weights when the two are equal."""
    unet = [k for k in sd if k.startswith(UNET)]
    return sum(ema_key(k) in sd for k in unet), len(unet)


def check_sd_v1(sd: Mapping[str, torch.Tensor]) -> None:
    """Raise ``CheckpointError`` (one line, no path) unless ``sd`` holds the three SD v1 sub-models."""
    absent = [label for prefix, label in GROUPS.items() if prefix in INFERENCE_PREFIXES
              and not any(k.startswith(prefix) for k in sd)]
    foreign = any(k.startswith(FOREIGN_PREFIXES) for k in sd)
    if absent or foreign:
        detail = f": no {', no '.join(absent)} keys" if absent else ""
        raise CheckpointError(f"{guess_kind(set(sd))}{detail}")


def prune_state_dict(sd: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
                     use_ema: Optional[bool] = None) -> tuple[dict[str, torch.Tensor], bool]:
    """Keep the inference keys of a SD v1 or SDXL state dict; returns ``(pruned, used_ema)``.

    ``use_ema``: True writes the file's full EMA weights as the UNet weights (``CheckpointError`` if it has none),
    False keeps the live weights, None takes EMA when present (what ``load_checkpoint`` samples by default).
    ``dtype`` (float16 or bfloat16) halves the floating tensors except the schedule buffers; see the module doc.
    """
    if dtype is not None and dtype not in HALF_DTYPES:
        raise ValueError(f"dtype must be one of {HALF_DTYPES} or None, got {dtype}")
    layout = inference_layout(sd)
    covered, total = ema_coverage(sd)
    if use_ema and covered != total:
        raise CheckpointError(f"--ema: the file has no full EMA weights ({covered} of {total} UNet tensors have a "
                              f"model_ema.* copy)")
    keep = {k: sd[k].shape for k in sd if is_inference_key(k, layout)}
    # select_weights is the loader's own EMA swap, so pruning and sampling agree on what "EMA" means.
    pruned, used_ema = select_weights(keep, sd, use_ema=False, prefer_ema=use_ema is not False)
    if dtype is not None:
        pruned = {k: v.to(dtype) if v.is_floating_point() and k not in KEPT_BUFFERS else v
                  for k, v in pruned.items()}
    return pruned, used_ema


@dataclass
class PruneResult:
    """What ``prune_file`` read and wrote, for the report the CLI prints."""

    src: Path
    dst: Path
    src_bytes: int
    dst_bytes: int
    src_tensors: int
    dst_tensors: int
    used_ema: bool
    had_ema: bool
    global_step: Optional[int]

    def summary(self) -> str:
        weights = "EMA weights (model_ema.*)" if self.used_ema else \
            ("live weights (the file's EMA was dropped)" if self.had_ema else "live weights (the file has no EMA)")
        step = f", global_step {self.global_step}" if self.global_step is not None else ""
        return (f"in:  {self.src} {fmt_bytes(self.src_bytes, decimal=True)}, {self.src_tensors} tensors in its state_dict\n"
                f"out: {self.dst} {fmt_bytes(self.dst_bytes, decimal=True)}, {self.dst_tensors} tensors{step}\n"
                f"UNet: {weights}")


def network_alone(sd: Mapping[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
    """For a family released as separate files (FLUX.1), the network alone in its released layout (the keys under
    ``Family.bare_prefix``, without it): what such a family's users share and load with ``--ae``/``--t5``/``--clip``;
    None for every other family."""
    from ldm.families import FAMILIES, detect_family
    family = FAMILIES.get(detect_family({k: tuple(v.shape) for k, v in sd.items()}))
    if family is None or not family.components:
        return None
    return {k[len(family.bare_prefix):]: v for k, v in sd.items() if k.startswith(family.bare_prefix)}


def prune_file(src: str | Path, dst: str | Path, dtype: Optional[torch.dtype] = None,
               use_ema: Optional[bool] = None, overwrite: bool = False, whole: bool = False) -> PruneResult:
    """Read ``src`` (.ckpt or .safetensors), prune it, write ``dst`` atomically (format by its extension).

    Only the state dict's tensors and ``global_step`` are carried over; optimizer, scheduler, callback and loop
    states never leave ``src``. A family released as separate files (FLUX.1) is written as its network alone, in
    the released layout (:func:`network_alone`), unless ``whole``. Errors are ``CheckpointError`` with one line naming the file; an output that is
    the input, or (without ``overwrite``) exists, is an ``OutputError``.
    """
    from ldm.files import check_output
    src, dst = Path(src), check_output(dst, [src], "output", overwrite=overwrite)
    sd, meta = read_checkpoint(src)
    sd, _ = bake_adapters(sd, meta, src)  # a LoRA run's last.ckpt: its adapters go into the written weights
    try:
        kept, _ = prune_state_dict(sd, use_ema=use_ema)  # the file's own tensors, not copies
        pruned, used_ema = prune_state_dict(sd, dtype=dtype, use_ema=use_ema)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    refuse_nonfinite(kept, src)
    if dtype is not None:  # finite in the file, beyond the range of the smaller type
        refuse_nonfinite(pruned, src, why=f"they become Inf in {str(dtype).removeprefix('torch.')} (values beyond its "
                                          f"range); write fp32 (without --fp16), or --bf16")
    alone = None if whole else network_alone(pruned)
    pruned = alone if alone is not None else pruned
    covered, total = ema_coverage(sd)
    step = meta.get("global_step")
    save_checkpoint(dst, pruned, global_step=step)
    return PruneResult(src, dst, src.stat().st_size, dst.stat().st_size, len(sd), len(pruned), used_ema,
                       had_ema=total > 0 and covered == total, global_step=step)


# ---- sizes of the full-size v1 files, from the reference layout -------------------------------------------------
def layout_bytes(layout: Mapping[str, tuple[tuple[int, ...], str]], half: bool = False) -> int:
    """Bytes of the tensors of ``layout``; ``half`` prices them as ``prune_state_dict(dtype=float16)`` writes."""
    total = 0
    for key, (shape, dtype) in layout.items():
        if half and dtype == "float32" and key not in SCHEDULE_BUFFERS:
            dtype = "float16"
        total += math.prod(shape) * ITEMSIZE[dtype]
    return total


def full_size_report(reference_dir: str | Path = LAYOUT_DIR) -> dict[str, int]:
    """Tensor bytes of the full-size SD v1 files, computed from the reference layouts (shapes only).

    - ``full_ema_fp32``: ``sd-v1-4-full-ema.ckpt``'s state dict (model + ``model_ema.*``).
    - ``training_adamw``: a DreamBooth training save with ``v1-finetune_unfrozen.yaml`` (``use_ema: False``,
      UNet and text encoder trained): the model plus AdamW's two fp32 moments per trainable parameter
      (the per-parameter ``step`` scalars, a few KB, are left out).
    - ``pruned_fp32`` / ``pruned_fp16``: what ``prune_file`` writes from either, without / with ``--fp16``.
    Container overhead (pickle, zip or safetensors header) is a few hundred KB and is not counted.
    """
    ref = Path(reference_dir)
    paths = [ref / SD_V1, ref / SD_V1_EMA]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: reference layout not found (pass --reference DIR)")
    inference, full = (read_layout(p) for p in paths)
    trainable = sum(math.prod(shape) for k, (shape, dtype) in inference.items()
                    if k.startswith((UNET, "cond_stage_model.")) and dtype == "float32")
    return {
        "full_ema_fp32": layout_bytes(full),
        "training_adamw": layout_bytes(inference) + 2 * 4 * trainable,
        "pruned_fp32": layout_bytes(inference),
        "pruned_fp16": layout_bytes(inference, half=True),
    }


def format_size_report(sizes: Mapping[str, int]) -> str:
    labels = {
        "full_ema_fp32": "full-EMA checkpoint, fp32 (model + model_ema.*)",
        "training_adamw": "training checkpoint, fp32 + AdamW moments (UNet + text encoder)",
        "pruned_fp32": "pruned, fp32",
        "pruned_fp16": "pruned, fp16 (schedule buffers fp32, position_ids int64)",
    }
    return "\n".join(f"{labels[k]:<66} {v / GB:7.3f} GB  ({v:,} bytes)" for k, v in sizes.items())
