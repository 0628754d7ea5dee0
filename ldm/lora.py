"""LoRA (Hu et al. 2022): low-rank adapters on the attention projections of the UNet (and optionally the CLIP
text encoder), trained on top of frozen base weights.

Injection and the adapter maths are peft's. Files use the kohya/sd-scripts layout that diffusers'
``load_lora_weights`` and the common web UIs read: ``lora_unet_<module path with _>.lora_down.weight``
(rank x in), ``.lora_up.weight`` (out x rank) and ``.alpha``, the update being ``alpha / rank * up @ down``.
Like sd-scripts, we name UNet modules by diffusers' block names (``down_blocks_0_attentions_0_...``), which every
reader maps; reading accepts those and the original checkpoint's names (``input_blocks_1_1_...``) alike.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

ADAPTER = "dreambooth"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
#: state-dict prefix of each adapted sub-model -> kohya key prefix
PREFIXES = {"model.diffusion_model.": "lora_unet_", "cond_stage_model.transformer.": "lora_te_"}


@dataclass
class LoraSettings:
    """``model.params.lora_config`` in a config; ``--lora_rank`` sets ``rank``."""
    rank: int = 4
    alpha: Optional[float] = None  # None: alpha = rank, i.e. a scale of 1
    unet_targets: tuple[str, ...] = UNET_TARGETS
    text_encoder: bool = False
    text_targets: tuple[str, ...] = TEXT_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank must be at least 1, got {self.rank}")
        self.unet_targets, self.text_targets = tuple(self.unet_targets), tuple(self.text_targets)


def _target_regex(targets: tuple[str, ...]) -> str:
    return r".*\.(" + "|".join(re.escape(t) for t in targets) + r")$"


def _roots(model: nn.Module) -> dict[str, nn.Module]:
    """State-dict prefix -> module, for the UNet and each text encoder of the model's family."""
    return {"model.diffusion_model.": model.model.diffusion_model, **model.conditioning.text_encoders()}


def add_lora(model: nn.Module, settings: LoraSettings) -> list[nn.Parameter]:
    """Freeze the UNet and text encoder, add trainable adapters; returns the adapter parameters."""
    from peft import LoraConfig, inject_adapter_in_model
    for root in _roots(model).values():
        root.requires_grad_(False)
    alpha = settings.alpha if settings.alpha is not None else settings.rank
    targets = {"model.diffusion_model.": settings.unet_targets}
    if settings.text_encoder:
        targets.update({prefix: settings.text_targets for prefix in model.conditioning.text_encoders()})
    for prefix, names in targets.items():
        config = LoraConfig(r=settings.rank, lora_alpha=alpha, lora_dropout=settings.dropout,
                            target_modules=_target_regex(names), init_lora_weights=True)
        inject_adapter_in_model(config, _roots(model)[prefix], adapter_name=ADAPTER)
    return [p for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad]


_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.1\.(.*)$")


def diffusers_path(path: str, layers_per_block: int) -> str:
    """A UNet module path of the original layout in diffusers' naming, e.g. with 2 layers per block
    ``input_blocks.4.1.proj_in`` -> ``down_blocks.1.attentions.0.proj_in``; other paths are returned as they are.

    In the original UNet each level holds ``layers_per_block`` input blocks then a downsampler (input block 0 is
    the stem conv), and ``layers_per_block + 1`` output blocks; index 1 inside a block is its spatial transformer.
    """
    if path.startswith("middle_block.1."):
        return "mid_block.attentions.0." + path[len("middle_block.1."):]
    m = _BLOCK.match(path)
    if not m:
        return path
    kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
    per_level = layers_per_block + 1
    if kind == "input_blocks":
        return f"down_blocks.{(index - 1) // per_level}.attentions.{(index - 1) % per_level}.{rest}"
    return f"up_blocks.{index // per_level}.attentions.{index % per_level}.{rest}"


def layers_per_block(state_dict_keys) -> int:
    """num_res_blocks from a UNet's keys: the first downsampler sits at input block num_res_blocks + 1."""
    ops = [int(k.split(".")[3]) for k in state_dict_keys if k.startswith("model.diffusion_model.input_blocks.")
           and ".0.op." in k]
    return min(ops) - 1 if ops else 2


def _kohya(prefix: str, path: str, per_block: int) -> str:
    if prefix == "model.diffusion_model.":
        path = diffusers_path(path, per_block)
    return PREFIXES[prefix] + path.replace(".", "_")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(kohya name, peft LoRA layer) for every adapted module."""
    from peft.tuners.lora import LoraLayer
    per_block = model.model.diffusion_model.num_res_blocks
    for prefix, root in _roots(model).items():
        for name, module in root.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                yield _kohya(prefix, name, per_block), module


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in the kohya layout, float32, ready for ``save_checkpoint(... .safetensors)``."""
    out = {}
    for kohya, layer in lora_layers(model):
        down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        out[f"{kohya}.lora_down.weight"] = down.detach().float().cpu().contiguous()
        out[f"{kohya}.lora_up.weight"] = up.detach().float().cpu().contiguous()
        out[f"{kohya}.alpha"] = torch.tensor(float(layer.scaling[ADAPTER] * down.shape[0]))
    if not out:
        raise ValueError("the model has no LoRA adapters")
    return out


def parse_lora(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """kohya name -> (down, up, alpha) from an adapter file's state dict; one-line errors for other files."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, _, part = key.partition(".")
        if name.startswith(tuple(PREFIXES.values())) and part in ("lora_down.weight", "lora_up.weight", "alpha"):
            groups.setdefault(name, {})[part] = value
    if not groups:
        raise ValueError("no kohya-style LoRA keys (lora_unet_*.lora_down.weight) in this file")
    out = {}
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{name}: lora_down/lora_up pair incomplete")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        out[name] = (down, up, alpha)
    return out


def module_keys(state_dict_keys) -> dict[str, str]:
    """kohya name (both namings) -> state-dict key of the module's weight, for every weight under the prefixes."""
    state_dict_keys = list(state_dict_keys)
    per_block = layers_per_block(state_dict_keys)
    out = {}
    for key in state_dict_keys:
        for prefix, kohya in PREFIXES.items():
            if key.startswith(prefix) and key.endswith(".weight"):
                path = key[len(prefix):-len(".weight")].replace(".base_layer", "")
                out[kohya + path.replace(".", "_")] = key
                out[_kohya(prefix, path, per_block)] = key
    return out


def merge_lora(sd: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor],
               scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Bake an adapter into full weights: W + scale * alpha / rank * up @ down (computed in float32)."""
    merged = dict(sd)
    keys = module_keys(sd.keys())
    for name, (down, up, alpha) in parse_lora(lora).items():
        if name not in keys:
            raise ValueError(f"{name}: no such module in the base checkpoint (a LoRA for another model?)")
        key = keys[name]
        w = sd[key]
        check_shapes(name, down, up, w.shape)
        delta = (up.float().flatten(1) @ down.float().flatten(1)).reshape(w.shape)
        merged[key] = (w.float() + scale * alpha / down.shape[0] * delta).to(w.dtype)
    return merged


def load_lora(model: nn.Module, lora: Mapping[str, torch.Tensor], scale: float = 1.0) -> int:
    """Attach an adapter file's weights to ``model`` as live (unmerged) peft adapters; returns how many."""
    from peft import LoraConfig, inject_adapter_in_model
    parsed = parse_lora(lora)
    names = module_keys(model.state_dict().keys())
    for prefix, root in _roots(model).items():
        mine = {n: v for n, v in parsed.items() if n.startswith(PREFIXES[prefix])}
        if not mine:
            continue
        missing = [n for n in mine if n not in names]
        if missing:
            raise ValueError(f"{missing[0]}: no such module in this model (a LoRA for another model?)")
        own = model.state_dict()
        for n, (down, up, _) in mine.items():
            check_shapes(n, down, up, own[names[n]].shape)
        paths = {n: names[n][len(prefix):-len(".weight")] for n in mine}
        ranks = {paths[n]: int(down.shape[0]) for n, (down, _, _) in mine.items()}
        alphas = {paths[n]: alpha for n, (_, _, alpha) in mine.items()}
        first = next(iter(ranks))
        config = LoraConfig(r=ranks[first], lora_alpha=alphas[first], target_modules=list(paths.values()),
                            rank_pattern={f"^{re.escape(p)}$": r for p, r in ranks.items()},
                            alpha_pattern={f"^{re.escape(p)}$": a for p, a in alphas.items()})
        inject_adapter_in_model(config, root, adapter_name=ADAPTER)
        modules = dict(root.named_modules())
        with torch.no_grad():
            for n, (down, up, _) in mine.items():
                layer = modules[paths[n]]
                layer.lora_A[ADAPTER].weight.copy_(down)
                layer.lora_B[ADAPTER].weight.copy_(up * scale)
    return len(parsed)


def check_shapes(name: str, down: torch.Tensor, up: torch.Tensor, weight_shape: torch.Size) -> None:
    """One line when an adapter does not fit the layer it names (a LoRA made for another model or size)."""
    out_features, in_features = int(weight_shape[0]), int(math.prod(weight_shape[1:]))
    rank = int(down.shape[0])
    if (down.ndim < 2 or up.ndim < 2 or int(up.shape[1]) != rank or int(math.prod(down.shape[1:])) != in_features
            or int(up.shape[0]) != out_features):
        raise ValueError(f"{name}: the adapter is {int(up.shape[0])}x{int(math.prod(down.shape[1:]))} (rank {rank}) "
                         f"but this model's layer is {out_features}x{in_features}: a LoRA for another model or size")


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``adapter.safetensors:0.8`` -> (path, 0.8); a bare path (or one whose last ':' part is no number, as in
    a Windows drive letter) has strength 1. A strength that is not a finite number is a ``ValueError``."""
    path, sep, strength = spec.rpartition(":")
    if not (sep and path) or "/" in strength or "\\" in strength:
        return spec, 1.0
    try:
        value = float(strength)
    except ValueError:
        if Path(spec).suffix in (".safetensors", ".ckpt", ".pt", ".bin") or Path(spec).exists():
            return spec, 1.0
        raise ValueError(f"{spec}: the strength after ':' ({strength!r}) is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{spec}: the strength must be a finite number, got {strength}")
    return path, value


def read_lora(spec: str) -> tuple[Path, float, dict[str, torch.Tensor]]:
    """``FILE[:STRENGTH]`` -> (file, strength, its tensors); every problem is a one-line ``CheckpointError``."""
    from ldm.checkpoint import CheckpointError, read_checkpoint
    try:
        path, strength = parse_lora_spec(spec)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    sd = read_checkpoint(path)[0]
    try:
        parse_lora(sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return Path(path), strength, sd


def plain_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's ``x.base_layer.weight`` back to the original ``x.weight``, so a checkpoint keeps the SD layout."""
    return {k.replace(".base_layer.", "."): v for k, v in sd.items()}


def peft_keys(sd: Mapping[str, torch.Tensor], model_keys) -> dict[str, torch.Tensor]:
    """The reverse of ``plain_keys`` for a model with adapters injected (resuming a LoRA run)."""
    model_keys = set(model_keys)
    out = {}
    for k, v in sd.items():
        head, _, leaf = k.rpartition(".")
        wrapped = f"{head}.base_layer.{leaf}"
        out[wrapped if k not in model_keys and wrapped in model_keys else k] = v
    return out
