"""LoRA (Hu et al. 2022): low-rank adapters on the attention projections of the UNet (and optionally the CLIP
text encoders), trained on top of frozen base weights.

Injection and the adapter maths are peft's, except for OpenCLIP's packed q/k/v projection (SDXL's second text
encoder), which is a bare parameter peft cannot wrap: ``FusedQKVLoRA`` adapts it. Files use the kohya/sd-scripts
layout that diffusers' ``load_lora_weights`` and the common web UIs read: ``<prefix><module path with _>
.lora_down.weight`` (rank x in), ``.lora_up.weight`` (out x rank) and ``.alpha``, the update being
``alpha / rank * up @ down``. Module names are sd-scripts':

- UNet, ``lora_unet_``: SD v1 by diffusers' block names (``down_blocks_0_attentions_0_...``: sd-scripts trains v1 on
  diffusers' UNet), SDXL by the original ones (``input_blocks_4_1_...``: its SDXL UNet is sgm's); see
  ``Family.lora_unet_names``. Reading accepts either naming for either family. Each family's record
  (``ldm/families/<name>``) names its sub-models' prefixes.
- Text encoders in transformers' CLIP naming (``text_model_encoder_layers_N_self_attn_q_proj``, ``mlp_fc1``):
  ``lora_te_`` for SD v1's, ``lora_te1_`` (CLIP ViT-L) and ``lora_te2_`` (OpenCLIP bigG) for SDXL's. bigG's
  OpenCLIP modules are renamed: packed ``attn.in_proj`` rows -> ``self_attn.{q,k,v}_proj``, ``attn.out_proj`` ->
  ``self_attn.out_proj``, ``mlp.c_fc``/``c_proj`` -> ``mlp.fc1``/``fc2``.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Mapping, Optional

import torch
from torch import nn

from ldm.families import lora_prefixes
from ldm.modules.encoders.open_clip import MultiheadSelfAttention
from ldm.modules.lora import QKV, FusedQKVLoRA

ADAPTER = "dreambooth"
UNET = "model.diffusion_model."
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: transformers' CLIP module names; ``fc1``/``fc2`` (the MLP) may be added in ``text_targets``.
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
#: transformers' T5 module names; ``wi_0``, ``wi_1``, ``wo`` (the gated MLP) may be added in ``t5_targets``.
T5_TARGETS = ("q", "k", "v", "o")
#: state-dict prefix of each adapted sub-model -> kohya key prefix (every family's, from its record)
PREFIXES = lora_prefixes()
#: transformers' CLIP names of the OpenCLIP modules peft wraps (q/k/v_proj are rows of the packed in_proj)
OPEN_CLIP_TARGETS = {"out_proj": "out_proj", "fc1": "c_fc", "fc2": "c_proj"}
_OPEN_CLIP_TO_HF = [
    (re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.(q|k|v|out)_proj$"),
     r"text_model.encoder.layers.\1.self_attn.\2_proj"),
    (re.compile(r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc$"), r"text_model.encoder.layers.\1.mlp.fc1"),
    (re.compile(r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj$"), r"text_model.encoder.layers.\1.mlp.fc2"),
]
UnetNames = Literal["diffusers", "original"]


@dataclass
class LoraSettings:
    """``model.params.lora_config`` in a config; ``--lora_rank`` sets ``rank``."""
    rank: int = 4
    alpha: Optional[float] = None  # None: alpha = rank, i.e. a scale of 1
    unet_targets: tuple[str, ...] = UNET_TARGETS
    text_encoder: bool = False
    text_targets: tuple[str, ...] = TEXT_TARGETS
    #: A T5 encoder's modules (FLUX.1's second text encoder, transformers' names): its attention projections.
    t5_targets: tuple[str, ...] = T5_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank must be at least 1, got {self.rank}")
        self.unet_targets, self.text_targets = tuple(self.unet_targets), tuple(self.text_targets)
        self.t5_targets = tuple(self.t5_targets)


def _target_regex(targets: tuple[str, ...]) -> str:
    return r".*\.(" + "|".join(re.escape(t) for t in targets) + r")$"


def _roots(model: nn.Module) -> dict[str, nn.Module]:
    """State-dict prefix -> module, for the UNet and each text encoder of the model's family."""
    return {UNET: model.model.diffusion_model, **model.conditioning.text_encoders()}


def _is_open_clip(root: nn.Module) -> bool:
    return any(isinstance(m, MultiheadSelfAttention) for m in root.modules())


def _text_plan(root: nn.Module, settings: LoraSettings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The settings' text targets (transformers' CLIP names; a T5 encoder's own, ``t5_targets``) -> (module names
    peft wraps in ``root``, packed q/k/v parts)."""
    targets = settings.text_targets
    if hasattr(root, "shared") and hasattr(root, "encoder"):  # a T5 encoder (transformers' layout)
        return settings.t5_targets, ()
    if not _is_open_clip(root):
        return targets, ()
    parts = tuple(p for p in QKV if f"{p}_proj" in targets)
    rest = [t for t in targets if t not in {f"{p}_proj" for p in QKV}]
    unknown = [t for t in rest if t not in OPEN_CLIP_TARGETS]
    if unknown:
        raise ValueError(f"lora text target {unknown[0]!r}: the OpenCLIP text encoder has no such module "
                         f"(known: q_proj, k_proj, v_proj, {', '.join(OPEN_CLIP_TARGETS)})")
    return tuple(OPEN_CLIP_TARGETS[t] for t in rest), parts


def add_lora(model: nn.Module, settings: LoraSettings) -> list[nn.Parameter]:
    """Freeze the UNet and text encoders, add trainable adapters; returns the adapter parameters."""
    from peft import LoraConfig, inject_adapter_in_model
    roots = _roots(model)
    for root in roots.values():
        root.requires_grad_(False)
    alpha = settings.alpha if settings.alpha is not None else settings.rank
    plan = {UNET: (settings.unet_targets, ())}
    if settings.text_encoder:
        plan.update({prefix: _text_plan(roots[prefix], settings) for prefix in roots if prefix != UNET})
    for prefix, (names, parts) in plan.items():
        if names:
            config = LoraConfig(r=settings.rank, lora_alpha=alpha, lora_dropout=settings.dropout,
                                target_modules=_target_regex(names), init_lora_weights=True)
            inject_adapter_in_model(config, roots[prefix], adapter_name=ADAPTER)
        if parts:
            for attn in [m for m in roots[prefix].modules() if isinstance(m, MultiheadSelfAttention)]:
                _attach(attn, FusedQKVLoRA(attn.out_proj.in_features, {p: settings.rank for p in parts},
                                           {p: alpha for p in parts}, settings.dropout))
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad]
    for p in adapters:  # float32 whatever the frozen weights are stored in (bf16, fp8): updates this small are
        p.data = p.data.float()  # lost in bf16 (weights_dtype: bf16 stores them so on purpose, rounding stochastically)
    return adapters


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block, every adapter of ``model`` (peft's layers and the packed q/k/v parts) adds nothing: the
    model computes what its base weights do, the frozen model the adapters were added to. Nothing else changes
    (which tensors require gradients, the optimizer's view), so a training step can ask both in one step."""
    from peft.tuners.lora import LoraLayer
    layers = [m for m in model.modules() if isinstance(m, (LoraLayer, FusedQKVLoRA))]
    before = [m.disabled if isinstance(m, FusedQKVLoRA) else m._disable_adapters for m in layers]
    for m in layers:
        if isinstance(m, FusedQKVLoRA):
            m.disabled = True
        else:
            m._disable_adapters = True
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            if isinstance(m, FusedQKVLoRA):
                m.disabled = was
            else:
                m._disable_adapters = was


def _attach(attn: MultiheadSelfAttention, adapter: FusedQKVLoRA) -> FusedQKVLoRA:
    attn.in_proj_lora = adapter.to(attn.in_proj_weight.device)
    return adapter


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


def hf_text_path(path: str) -> str:
    """An OpenCLIP text-tower module path in transformers' CLIP naming (``transformer.resblocks.3.mlp.c_fc`` ->
    ``text_model.encoder.layers.3.mlp.fc1``; ``...attn.q_proj`` stands for the q rows of the packed in_proj);
    other paths are returned as they are."""
    for pattern, replacement in _OPEN_CLIP_TO_HF:
        if pattern.match(path):
            return pattern.sub(replacement, path)
    return path


def kohya_name(prefix: str, path: str, unet_names: UnetNames = "diffusers", per_block: int = 2) -> str:
    """The kohya name of the module at ``path`` under the state-dict ``prefix`` (see the module doc)."""
    if prefix == UNET:
        path = diffusers_path(path, per_block) if unet_names == "diffusers" else path
    else:
        path = hf_text_path(path)
    return PREFIXES[prefix] + path.replace(".", "_")


def unet_names(model: nn.Module) -> UnetNames:
    """How kohya names this model's UNet modules: by its family (``ldm.families``), diffusers' blocks if unknown."""
    from ldm.families import FAMILIES, detect_family
    family = detect_family({k: tuple(v.shape) for k, v in plain_keys(model.state_dict()).items()})
    return FAMILIES[family].lora_unet_names if family else "diffusers"


def lora_pairs(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """(kohya name, down, up, alpha) of every adapter of the model: peft's layers and the packed q/k/v parts."""
    from peft.tuners.lora import LoraLayer
    # diffusers' block names count a UNet's res blocks per level; a transformer (FLUX.1) is named by its own paths
    names, per_block = unet_names(model), getattr(model.model.diffusion_model, "num_res_blocks", 2)
    for prefix, root in _roots(model).items():
        for path, module in root.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                down, up = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
                yield kohya_name(prefix, path, names, per_block), down, up, module.scaling[ADAPTER] * down.shape[0]
            elif isinstance(module, FusedQKVLoRA):
                attn = path.rpartition(".")[0]
                for p, down in module.lora_A.items():
                    yield (kohya_name(prefix, f"{attn}.{p}_proj"), down, module.lora_B[p],
                           module.scaling[p] * down.shape[0])


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in the kohya layout, float32, ready for ``save_checkpoint(... .safetensors)``."""
    out = {}
    for kohya, down, up, alpha in lora_pairs(model):
        out[f"{kohya}.lora_down.weight"] = down.detach().float().cpu().contiguous()
        out[f"{kohya}.lora_up.weight"] = up.detach().float().cpu().contiguous()
        out[f"{kohya}.alpha"] = torch.tensor(float(alpha))
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


@dataclass(frozen=True)
class Target:
    """Where a kohya module's weight lives in a state dict: its key, and for a q/k/v part of a packed in_proj,
    which third of its rows (0, 1, 2)."""
    key: str
    part: Optional[int] = None

    def shape(self, weight_shape: torch.Size) -> tuple[int, ...]:
        """The shape of the adapted weight: the whole tensor, or one third of its rows."""
        shape = tuple(int(d) for d in weight_shape)
        return shape if self.part is None else (shape[0] // len(QKV), *shape[1:])

    def rows(self, weight_shape: torch.Size) -> slice:
        n = self.shape(weight_shape)[0]
        return slice(0, n) if self.part is None else slice(self.part * n, (self.part + 1) * n)


def lora_targets(state_dict_keys) -> dict[str, Target]:
    """kohya name (every naming read: raw paths, diffusers' UNet blocks, transformers' CLIP names) -> ``Target``,
    for every weight under the prefixes, and the three q/k/v parts of every packed in_proj."""
    state_dict_keys = list(state_dict_keys)
    per_block = layers_per_block(state_dict_keys)
    out = {}
    for key in state_dict_keys:
        for prefix, kohya in PREFIXES.items():
            if not key.startswith(prefix):
                continue
            if key.endswith(".in_proj_weight"):
                attn = key[len(prefix):-len(".in_proj_weight")]
                out.update({kohya_name(prefix, f"{attn}.{p}_proj"): Target(key, i) for i, p in enumerate(QKV)})
            elif key.endswith(".weight"):
                path = key[len(prefix):-len(".weight")].replace(".base_layer", "")
                out[kohya + path.replace(".", "_")] = Target(key)
                out[kohya_name(prefix, path, "diffusers", per_block)] = Target(key)
    return out


def merge_lora(sd: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor],
               scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Bake an adapter into full weights: W + scale * alpha / rank * up @ down (computed in float32); a q/k/v
    part of a packed in_proj goes into its third of the rows."""
    merged = dict(sd)
    targets = lora_targets(sd.keys())
    for name, (down, up, alpha) in parse_lora(lora).items():
        if name not in targets:
            raise ValueError(f"{name}: no such module in the base checkpoint (a LoRA for another model?)")
        target = targets[name]
        w = merged[target.key]
        shape = target.shape(w.shape)
        check_shapes(name, down, up, shape)
        delta = (up.float().flatten(1) @ down.float().flatten(1)).reshape(shape)
        new = w.float().clone()
        new[target.rows(w.shape)] += scale * alpha / down.shape[0] * delta
        merged[target.key] = new.to(w.dtype)
    return merged


def load_lora(model: nn.Module, lora: Mapping[str, torch.Tensor], scale: float = 1.0) -> int:
    """Attach an adapter file's weights to ``model`` as live (unmerged) adapters; returns how many."""
    parsed = parse_lora(lora)
    own = model.state_dict()
    targets = lora_targets(own.keys())
    missing = [n for n in parsed if n not in targets]
    if missing:
        raise ValueError(f"{missing[0]}: no such module in this model (a LoRA for another model?)")
    for n, (down, up, _) in parsed.items():
        check_shapes(n, down, up, targets[n].shape(own[targets[n].key].shape))
    for prefix, root in _roots(model).items():
        mine = {n: v for n, v in parsed.items() if targets[n].key.startswith(prefix)}
        _load_linear(root, prefix, {n: v for n, v in mine.items() if targets[n].part is None}, targets, scale)
        _load_fused(root, prefix, {n: v for n, v in mine.items() if targets[n].part is not None}, targets, scale)
    return len(parsed)


def _load_linear(root: nn.Module, prefix: str, adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
                 targets: Mapping[str, Target], scale: float) -> None:
    """peft adapters with the files' ranks and alphas on the ``Linear`` layers ``adapters`` name."""
    from peft import LoraConfig, inject_adapter_in_model
    if not adapters:
        return
    paths = {n: targets[n].key[len(prefix):-len(".weight")] for n in adapters}
    ranks = {paths[n]: int(down.shape[0]) for n, (down, _, _) in adapters.items()}
    alphas = {paths[n]: alpha for n, (_, _, alpha) in adapters.items()}
    first = next(iter(ranks))
    config = LoraConfig(r=ranks[first], lora_alpha=alphas[first], target_modules=list(paths.values()),
                        rank_pattern={f"^{re.escape(p)}$": r for p, r in ranks.items()},
                        alpha_pattern={f"^{re.escape(p)}$": a for p, a in alphas.items()})
    inject_adapter_in_model(config, root, adapter_name=ADAPTER)
    modules = dict(root.named_modules())
    with torch.no_grad():
        for n, (down, up, _) in adapters.items():
            layer = modules[paths[n]]
            layer.lora_A[ADAPTER].weight.copy_(down)
            layer.lora_B[ADAPTER].weight.copy_(up * scale)


def _load_fused(root: nn.Module, prefix: str, adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
                targets: Mapping[str, Target], scale: float) -> None:
    """A ``FusedQKVLoRA`` on every attention whose q, k or v part ``adapters`` name."""
    by_attn: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for n, pair in adapters.items():
        attn = targets[n].key[len(prefix):-len(".in_proj_weight")]
        by_attn.setdefault(attn, {})[QKV[targets[n].part]] = pair
    for attn, parts in by_attn.items():
        module = root.get_submodule(attn)
        adapter = _attach(module, FusedQKVLoRA(module.out_proj.in_features,
                                               {p: int(down.shape[0]) for p, (down, _, _) in parts.items()},
                                               {p: alpha for p, (_, _, alpha) in parts.items()}))
        with torch.no_grad():
            for p, (down, up, _) in parts.items():
                adapter.lora_A[p].copy_(down.reshape(adapter.lora_A[p].shape))
                adapter.lora_B[p].copy_(up.reshape(adapter.lora_B[p].shape) * scale)


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
    from ldm.weights.checkpoint import CheckpointError, read_checkpoint, refuse_nonfinite
    try:
        path, strength = parse_lora_spec(spec)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    sd = read_checkpoint(path)[0]
    refuse_nonfinite(sd, path)
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
