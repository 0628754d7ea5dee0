"""The one checkpoint loader and saver.

Reading never executes pickled code: ``.ckpt`` files go through ``torch.load(weights_only=True)`` (globals that
are not plain data, such as a Lightning callback class pickled into old checkpoints, are replaced by an inert
stub, never imported or called), and ``.safetensors`` through safetensors. Before any tensor is copied, the file's
keys are audited against the model: what is missing, what has another shape, and what the file probably is
instead (an SD 2 checkpoint, a LoRA adapter, a diffusers folder), all said in one line.
Writing is atomic (``ldm.files.atomic_write``): a temporary file in the same folder, fsync, then ``os.replace``.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ldm.files import atomic_write

#: Key prefixes of the three SD v1 sub-models, with the names used in messages.
GROUPS = {
    "model.diffusion_model.": "UNet (model.diffusion_model.*)",
    "first_stage_model.": "VAE (first_stage_model.*)",
    "cond_stage_model.": "text encoder (cond_stage_model.*)",
    "conditioner.": "text encoders (conditioner.*)",
    "model_ema.": "EMA (model_ema.*)",
}
#: Keys a file may lack without harm: transformers releases after 4.x stopped saving CLIP's ``position_ids``
#: (SD v1's text encoder, and every CLIP text model other families hold).
OPTIONAL_SUFFIXES = ("text_model.embeddings.position_ids",)
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
MAX_STUBS = 32


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the file and the problem."""


class _Inert:
    """Stands in for any non-data global found in a pickle: accepts anything, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _stubs_for(path: Path) -> list:
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    if len(names) > MAX_STUBS:
        raise CheckpointError(f"{path}: the pickle names {len(names)} non-tensor globals; refusing to load it")
    return [(type(n.rsplit(".", 1)[-1], (_Inert,), {}), n) for n in names]


_BLOCKED = re.compile(r"GLOBAL (\S+) whose module \S+ is blocked")


def _torch_load(path: Path) -> Any:
    # Memory-map the zip format (every file since torch 1.6) so tensors are paged in as they are used;
    # the legacy format cannot be mapped and is read whole.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as first:  # noqa: BLE001 - re-raised below with the file named
        text = str(first)
        blocked = _BLOCKED.search(text)
        if blocked:
            raise CheckpointError(
                f"{path}: refused to load: its pickle asks to call {blocked.group(1)}, which is code, not data "
                f"(nothing was run); a checkpoint holds only tensors: use a file from a trusted source, or "
                f".safetensors") from None
        if "Unsupported global" not in text:
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint (truncated download, or not a .ckpt file): "
                f"{type(first).__name__}: {_weights_only_reason(text)}") from None
    with torch.serialization.safe_globals(_stubs_for(path)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as second:  # noqa: BLE001
            raise CheckpointError(f"{path}: refused to load: its pickle needs more than plain data "
                                  f"({_weights_only_reason(str(second))}); nothing was run") from None


def _weights_only_reason(text: str) -> str:
    """The informative line of torch's weights-only error (its first lines are generic advice)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                              "Please file an issue"))]
    return (useful or lines or ["unknown error"])[0][:200]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(state_dict, meta)`` from a ``.ckpt``/``.pt``/``.pth`` or ``.safetensors`` file.

    ``meta`` holds ``global_step`` when the file records it. A bare state dict is accepted as well as a dict
    with a ``state_dict`` entry (the Lightning/CompVis layout).
    """
    path = Path(path)
    if path.is_dir():
        hint = " (a diffusers folder? this loader reads single .ckpt/.safetensors files)" \
            if (path / "model_index.json").exists() else ""
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        what = "not a regular file" if path.exists() else "checkpoint file not found"
        raise CheckpointError(f"{path}: {what}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes): an interrupted download or copy?")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
                meta: dict[str, Any] = dict(f.metadata() or {})
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a readable safetensors file: {str(e).splitlines()[0][:200]}") \
                from None
        if "global_step" in meta:
            meta["global_step"] = int(meta["global_step"])
        return sd, meta
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: its 'state_dict' entry is a {type(sd).__name__}, not a mapping")
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:5]))
        raise CheckpointError(f"{path}: holds no tensors, so no state dict (top-level keys: {keys or 'none'})")
    meta = {k: obj[k] for k in ("global_step", "epoch") if k in obj and isinstance(obj[k], int)}
    if isinstance(obj.get("lora_alpha"), (int, float)):
        meta["lora_alpha"] = float(obj["lora_alpha"])
    return tensors, meta


#: A LoRA training checkpoint's adapter tensors (peft's names; the packed q/k/v parts of OpenCLIP's in_proj).
_PEFT_ADAPTER = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")
_PACKED_ADAPTER = re.compile(r"^(?P<attn>.+)\.in_proj_lora\.lora_A\.(?P<part>[qkv])$")


def adapter_keys(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of LoRA adapters a training checkpoint carries beside its base weights (a LoRA run's last.ckpt)."""
    return [k for k in sd if ".lora_A." in k or ".lora_B." in k]


def run_lora_alpha(path: Path, meta: Mapping[str, Any]) -> Optional[float]:
    """The adapters' alpha for a LoRA run's checkpoint: recorded in the file (``lora_alpha``), else read from the
    run's own config beside it (``<run>/configs/*-project.yaml``, ``model.params.lora_config``: its alpha, else its
    rank, the default). None when neither says."""
    if "lora_alpha" in meta:
        return float(meta["lora_alpha"])
    configs = sorted(path.resolve().parent.parent.glob("configs/*-project.yaml"))
    if not configs:
        return None
    from omegaconf import OmegaConf
    lora = OmegaConf.select(OmegaConf.load(configs[-1]), "model.params.lora_config")
    if lora is None:
        return None
    alpha = lora.get("alpha")
    return float(alpha if alpha is not None else lora.get("rank", 4))


def bake_adapters(sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any], path: str | os.PathLike
                  ) -> tuple[dict[str, torch.Tensor], int]:
    """A LoRA run's checkpoint as plain weights: each adapter added into the weight it adapts,
    ``W + alpha / rank * B @ A`` (float32, stored back in W's dtype; a packed q/k/v part into its third of
    ``in_proj_weight``), the adapter tensors dropped. Returns ``(state_dict, adapters baked)``; a file without
    adapters comes back as it is. ``CheckpointError`` when the alpha cannot be found or a tensor does not fit."""
    keys = adapter_keys(sd)
    if not keys:
        return dict(sd), 0
    path = Path(path)
    alpha = run_lora_alpha(path, meta)
    if alpha is None:
        raise CheckpointError(f"{path}: a LoRA training checkpoint ({len(keys) // 2} adapters) whose alpha is "
                              f"neither in the file nor in a run config beside it; sample the base model with "
                              f"--lora <run>/checkpoints/lora-last.safetensors instead")
    out = {k: v for k, v in sd.items() if k not in set(keys)}
    baked = 0
    for key in keys:
        m, packed = _PEFT_ADAPTER.match(key), _PACKED_ADAPTER.match(key)
        if m:
            target, up_key, rows = f"{m['module']}.weight", f"{m['module']}.lora_B.{m['adapter']}.weight", None
        elif packed:
            attn = packed["attn"]
            target, up_key = f"{attn}.in_proj_weight", f"{attn}.in_proj_lora.lora_B.{packed['part']}"
            rows = "qkv".index(packed["part"])
        else:
            continue  # a lora_B: handled with its lora_A
        down, up, w = sd[key], sd.get(up_key), out.get(target)
        if up is None or w is None:
            raise CheckpointError(f"{path}: adapter {key} has no {'up weight' if up is None else 'base weight'} "
                                  f"({up_key if up is None else target}): not a complete LoRA run checkpoint")
        rank = down.shape[0]
        delta = (up.float().flatten(1) @ down.float().flatten(1)) * (alpha / rank)
        new = w.float().clone()
        block = new if rows is None else new[rows * new.shape[0] // 3:(rows + 1) * new.shape[0] // 3]
        if block.flatten(1).shape != delta.shape:
            raise CheckpointError(f"{path}: adapter {key} is {list(delta.shape)} as a weight update, but {target} "
                                  f"is {list(block.shape)}")
        block += delta.reshape(block.shape)
        out[target] = new.to(w.dtype)
        baked += 1
    return out, baked


def nonfinite_tensors(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``sd`` that hold a NaN or an Inf (in file order)."""
    return [k for k, v in sd.items() if v.is_floating_point() and v.device.type != "meta"
            and not bool(torch.isfinite(v).all())]


def refuse_nonfinite(sd: Mapping[str, torch.Tensor], source: str | os.PathLike,
                     why: str = "broken weights (a training run that diverged, or a damaged file)") -> None:
    """One-line ``CheckpointError`` naming the tensors of ``sd`` that hold NaN or Inf: such weights sample black
    pictures and train nothing, so they are never loaded, sampled or written."""
    bad = nonfinite_tensors(sd)
    if bad:
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"{source}: {len(bad)} of {len(sd)} tensors hold NaN or Inf values ({names}): {why}; "
                              f"refusing to use them")


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` of a checkpoint's tensors without reading their data (a safetensors header, or a
    memory-mapped pickle), for recognising its family before building a model."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file() and path.stat().st_size > 0:
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a readable safetensors file: {str(e).splitlines()[0][:200]}") \
                from None
    return {k: tuple(v.shape) for k, v in read_checkpoint(path)[0].items()}


def ema_key(model_key: str) -> str:
    """``model.diffusion_model.a.0.weight`` -> ``model_ema.diffusion_modela0weight`` (the LitEma naming)."""
    return "model_ema." + model_key[len("model."):].replace(".", "")


def guess_kind(keys: set[str], shapes: Optional[Mapping[str, torch.Tensor]] = None,
               expected: Optional[Mapping[str, torch.Size]] = None) -> str:
    """What a file whose keys do not fit the model probably is, as the start of a one-line message."""
    from ldm.families import FAMILIES, detect_family
    family = detect_family({k: tuple(v.shape) for k, v in shapes.items()}) if shapes is not None else None
    wanted = detect_family({k: tuple(v) for k, v in expected.items()}) if expected is not None else None
    if family is not None and family == wanted:
        return f"it is a {FAMILIES[family].label} checkpoint, but of another size than the config builds"
    if family is not None:
        f = FAMILIES[family]
        return f"it is a {f.label} checkpoint, but the config builds another model (use --config configs/{f.config})"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "it looks like a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder)"
    if any("lora" in k.lower() for k in keys):
        return "it looks like a LoRA adapter, not a full model"
    if any(k.startswith(("down_blocks.", "conv_in.", "time_embedding.", "encoder.down_blocks.")) for k in keys):
        return "it looks like a diffusers model file"
    if any(k.startswith(("conditioner.", "model.diffusion_model.label_emb")) for k in keys):
        return "it looks like a Stable Diffusion XL checkpoint"
    return "it is not a Stable Diffusion v1 checkpoint"


def _group(key: str) -> str:
    return next((label for prefix, label in GROUPS.items() if key.startswith(prefix)), "schedule buffers")


def audit(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Compare the keys and shapes a model expects with those a file has. ``None`` when they fit, else a reason."""
    missing: dict[str, list[str]] = {}
    wrong: dict[str, list[str]] = {}
    for k, shape in expected.items():
        if k not in found:
            if not k.endswith(OPTIONAL_SUFFIXES):
                missing.setdefault(_group(k), []).append(k)
        elif tuple(found[k].shape) != tuple(shape):
            wrong.setdefault(_group(k), []).append(k)
    if not missing and not wrong:
        return None
    parts = [f"{label}: {len(keys)} keys missing (e.g. {keys[0]})" for label, keys in missing.items()]
    parts += [f"{label}: {len(keys)} tensors of another shape (e.g. {keys[0]} is {list(found[keys[0]].shape)}, "
              f"expected {list(expected[keys[0]])})" for label, keys in wrong.items()]
    return f"{guess_kind(set(found), found, expected)}: " + "; ".join(parts)


def select_weights(model_keys: Mapping[str, torch.Size], sd: Mapping[str, torch.Tensor], use_ema: bool,
                   prefer_ema: bool = True) -> tuple[dict[str, torch.Tensor], bool]:
    """Pick the tensors for a model from a file's state dict. Returns ``(state_dict, used_ema_weights)``.

    A model without its own EMA (``use_ema: False``) loaded from a full-EMA file takes the EMA weights as its
    UNet weights when ``prefer_ema``: they are the ones the released files were meant to be sampled with.
    """
    out = {k: sd[k] for k in model_keys if k in sd}
    unet_keys = [k for k in model_keys if k.startswith("model.diffusion_model.")]
    has_ema = bool(unet_keys) and all(ema_key(k) in sd for k in unet_keys)
    used_ema = not use_ema and has_ema and prefer_ema
    for k in unet_keys:
        if used_ema:
            out[k] = sd[ema_key(k)]
        elif use_ema and not has_ema and k in sd:
            # The file carries no EMA (an EMA-only release, say): the EMA starts from the model weights.
            out[ema_key(k)] = sd[k]
    return out, used_ema


def load_checkpoint(model: nn.Module, path: str | os.PathLike, prefer_ema: bool = True,
                    assign: bool = False, verbose: bool = True,
                    state: Optional[tuple[Mapping[str, torch.Tensor], dict[str, Any]]] = None) -> dict[str, Any]:
    """Load a checkpoint into ``model`` after auditing it; returns the file's meta (``global_step``...).

    ``assign=True`` lets a model built on the meta device take the file's tensors without a copy. ``state``: the
    ``(state_dict, meta)`` to load instead of reading ``path`` (a model assembled from several files, which
    ``path`` then names in messages).
    """
    sd, meta = state if state is not None else read_checkpoint(path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    baked = 0
    if not adapter_keys(expected):  # a LoRA run's checkpoint loaded for use: its adapters go into the weights
        sd, baked = bake_adapters(sd, meta, path)
    use_ema = bool(getattr(model, "use_ema", False))
    chosen, used_ema = select_weights(expected, sd, use_ema=use_ema, prefer_ema=prefer_ema)
    # The EMA step counters may be absent (then the EMA starts afresh); everything else must be there.
    problem = audit({k: s for k, s in expected.items() if k not in EMA_COUNTERS}, sd | chosen)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    own = model.state_dict()
    for k in expected:
        if k not in chosen:  # optional keys and a freshly started EMA keep the model's own values
            chosen[k] = own[k] if own[k].device.type != "meta" else _default_for(k, own[k], model)
        chosen[k] = chosen[k].to(own[k].dtype) if own[k].dtype != chosen[k].dtype else chosen[k]
    refuse_nonfinite(chosen, path)
    model.load_state_dict(chosen, strict=True, assign=assign)
    meta["used_ema"] = used_ema
    ignored = sorted(set(sd) - set(chosen) - {k for k in sd if k.startswith("model_ema.")})
    if verbose:
        step = f" (global_step {meta['global_step']})" if "global_step" in meta else ""
        print(f"Loaded {path}{step}" + ("; sampling with its EMA weights" if used_ema else "")
              + (f"; its {baked} LoRA adapters baked into the weights" if baked else "")
              + (f"; ignored {len(ignored)} unused keys (e.g. {ignored[0]})" if ignored else ""))
    return meta


def _default_for(key: str, like: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A value for a key the file lacks, on a model built on the meta device (which has none of its own)."""
    if key.endswith("position_ids"):
        return torch.arange(like.shape[-1], dtype=like.dtype).expand(like.shape).clone()
    if key in EMA_COUNTERS:  # a fresh EMA: the configured decay (model.params.ema_decay), not a constant
        return torch.tensor(model.model_ema.start_values[key.split(".")[-1]], dtype=like.dtype)
    raise CheckpointError(f"no value for {key}")


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                    global_step: Optional[int] = None, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``state_dict`` atomically: ``.safetensors`` by extension, else a ``{"state_dict", "global_step"}``
    pickle of tensors and ints that ``torch.load(weights_only=True)`` and every SD v1 tool read."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        from ldm.families import FAMILIES, detect_family
        meta = {"format": "pt"}
        family = detect_family({k: tuple(v.shape) for k, v in tensors.items()})
        if family is not None:  # what every SD tool reads to know the file's architecture
            meta["modelspec.architecture"] = FAMILIES[family].architecture
        if global_step is not None:
            meta["global_step"] = str(int(global_step))
        # safetensors refuses tensors that share memory; clone the few that do.
        seen: set[int] = set()
        for k, v in tensors.items():
            ptr = v.untyped_storage().data_ptr()
            if ptr in seen:
                tensors[k] = v.clone()
            seen.add(ptr)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    else:
        obj: dict[str, Any] = {"state_dict": tensors}
        if global_step is not None:
            obj["global_step"] = int(global_step)
        obj.update(extra or {})
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path
