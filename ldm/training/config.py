"""The one check of a training run's settings: every key is read by code, every value lies in the range its maths
allows, and the lean-training switches come in combinations that can train.

``check_training_config`` runs before anything is built: a key that no code reads (``model.paramz.reg_weight=0.5``,
a misspelt trainer flag) and a value outside its range (``max_steps: -1``, a negative learning rate, an image size
the UNet cannot halve evenly) each stop the run with one line before any model is loaded.
"""
from __future__ import annotations

import argparse
import difflib
import inspect
from dataclasses import fields
from typing import Any, Callable, Iterable, Mapping, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.config import (COUNT, NON_NEGATIVE, POSITIVE, SEED, UNIT, ConfigError, Range, check_choice,
                        check_image_side, spatial_factor)

#: Flag -> config key, for the flags that only set one config value.
FLAG_KEYS = {
    "data_root": "data.params.data_root",
    "reg_data_root": "data.params.reg_data_root",
    "class_word": "data.params.class_word",
    "token": "data.params.token",
    "max_steps": "lightning.trainer.max_steps",
    "num_class_images": "class_images.num",
    "lora_rank": "model.params.lora_config.rank",
    "vae": "model.params.vae_path",
    # FLUX.1's separate files (Family.components); --t5_tokenizer is a setting of its T5 (Family.config_flags)
    "ae": "model.params.component_paths.ae",
    "t5": "model.params.component_paths.t5",
    "clip": "model.params.component_paths.clip",
}

# ---- the DreamBooth flags --------------------------------------------------------------------------------------

def apply_flags(config: DictConfig, opt: argparse.Namespace) -> DictConfig:
    """Copy the DreamBooth flags that were given into their config keys (flags beat the YAML)."""
    for flag, key in FLAG_KEYS.items():
        value = getattr(opt, flag, None)
        if value is not None:
            if flag == "class_word":
                value = " ".join(value) if isinstance(value, (list, tuple)) else value
            OmegaConf.update(config, key, value, force_add=True)
    return config


# ---- which keys exist ------------------------------------------------------------------------------------------

#: Keys of the sections that are plain data rather than ``target``/``params`` objects.
PLAIN_SECTIONS: dict[str, set[str]] = {
    "": {"model", "data", "lightning", "class_images", "actual_resume"},
    "class_images": {"num", "ddim_steps", "scale", "batch_size", "seed"},
    "lightning": {"trainer", "callbacks", "modelcheckpoint", "export", "validation", "release_freed_memory"},
    "lightning.modelcheckpoint": {"params"},
    "model.params.optimizer_config": {"name", "weight_decay", "betas", "eps", "fused_backward"},
}


def _signature_keys(target: Callable, skip: Iterable[str] = ()) -> Optional[set[str]]:
    """The keyword parameters ``target`` takes, or None when it takes ``**kwargs`` (anything goes)."""
    params = inspect.signature(target).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - set(skip)


def _unknown(where: str, key: str, known: Iterable[str], owner: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    name = f"{where}.{key}" if where else key
    return ConfigError(f"config key {name}: {owner} has no setting {key!r}{hint}")


def _check_keys(node: Mapping[str, Any], where: str, known: Optional[set[str]], owner: str) -> None:
    if known is None:
        return
    for key in node:
        if key not in known:
            raise _unknown(where, str(key), known, owner)


def unread_keys(node: Mapping[str, Any], where: str) -> list[str]:
    """The keys under a ``target``/``params`` node (and its nested ones) that its classes accept only because the
    original configs carry them (their ``UNREAD_PARAMS``): they change nothing."""
    from ldm.util import get_obj_from_str
    found = []
    params = node.get("params") or {}
    for key, value in params.items():
        if key in getattr(get_obj_from_str(node["target"]), "UNREAD_PARAMS", ()):
            found.append(f"{where}.params.{key}")
        if isinstance(value, Mapping) and "target" in value:
            found += unread_keys(value, f"{where}.params.{key}")
    return found


def _check_object(node: Mapping[str, Any], where: str, extra: Iterable[str] = ()) -> None:
    """A ``target``/``params`` node: the target may be imported, and every param is one it takes."""
    from ldm.util import TargetNotAllowed, get_obj_from_str
    _check_keys(node, where, {"target", "params", *extra}, "an object node (target/params)")
    try:
        obj = get_obj_from_str(node["target"])
    except TargetNotAllowed as e:
        raise ConfigError(f"{where}.target: {e}") from None
    params = node.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.params: expected a mapping, got {params!r}")
    _check_keys(params, f"{where}.params", _signature_keys(obj), getattr(obj, "__name__", str(obj)))
    for key, value in params.items():
        if isinstance(value, Mapping) and "target" in value:
            _check_object(value, f"{where}.params.{key}")


def check_keys(config: DictConfig) -> None:
    """Every key of a training config is one that code reads; a misspelt or invented key is a ConfigError."""
    import pytorch_lightning as pl

    from ldm.training.callbacks import ExportWeights
    from ldm.weights.lora import LoraSettings
    data = OmegaConf.to_container(config, resolve=False)
    _check_keys(data, "", PLAIN_SECTIONS[""], "the config")
    for section in ("model", "data"):
        if section not in data:
            raise ConfigError(f"config has no {section}: section (target and params)")
        _check_object(data[section], section, extra=("base_learning_rate",) if section == "model" else ())
    model_params = data["model"].get("params") or {}
    _check_keys(model_params.get("optimizer_config") or {}, "model.params.optimizer_config",
                PLAIN_SECTIONS["model.params.optimizer_config"], "the optimizer config")
    _check_keys(model_params.get("lora_config") or {}, "model.params.lora_config",
                {f.name for f in fields(LoraSettings)}, "the LoRA config")
    _check_keys(data.get("class_images") or {}, "class_images", PLAIN_SECTIONS["class_images"], "class_images")
    lightning = data.get("lightning") or {}
    _check_keys(lightning, "lightning", PLAIN_SECTIONS["lightning"], "the lightning section")
    _check_keys(lightning.get("trainer") or {}, "lightning.trainer", _signature_keys(pl.Trainer), "Trainer")
    _check_keys(lightning.get("modelcheckpoint") or {}, "lightning.modelcheckpoint", {"params"}, "modelcheckpoint")
    _check_keys((lightning.get("modelcheckpoint") or {}).get("params") or {}, "lightning.modelcheckpoint.params",
                _signature_keys(pl.callbacks.ModelCheckpoint), "ModelCheckpoint")
    _check_keys(lightning.get("export") or {}, "lightning.export",
                _signature_keys(ExportWeights, skip=("ckptdir", "every_n_train_steps")), "ExportWeights")
    from ldm.training.validation import ValidationMetrics
    _check_keys(lightning.get("validation") or {}, "lightning.validation", _signature_keys(ValidationMetrics),
                "ValidationMetrics")
    for name, cb in (lightning.get("callbacks") or {}).items():
        if not isinstance(cb, Mapping) or "target" not in cb:
            raise ConfigError(f"lightning.callbacks.{name}: expected target and params")
        _check_object(cb, f"lightning.callbacks.{name}")
    for key in unread_keys(data["model"], "model"):
        print(f"Note: {key} is accepted for the original configs and has no effect here")


# ---- which values are allowed ----------------------------------------------------------------------------------

def _ranges(timesteps: int) -> dict[str, Range]:
    steps = Range(1, timesteps, integer=True)
    return {
        "model.base_learning_rate": POSITIVE,
        "model.params.reg_weight": NON_NEGATIVE,
        "model.params.timesteps": COUNT,
        "model.params.linear_start": Range(0, 1, lo_open=True, hi_open=True),
        "model.params.linear_end": Range(0, 1, lo_open=True, hi_open=True),
        "model.params.scale_factor": POSITIVE,
        "model.params.ema_decay": UNIT,
        "model.params.lr_warmup_steps": Range(0, integer=True),
        "model.params.offset_noise": NON_NEGATIVE,
        "model.params.caption_dropout": UNIT,
        "model.params.mask_floor": UNIT,
        "model.params.min_snr_gamma": Range(0, lo_open=True, optional=True),
        "model.params.blocks_to_swap": Range(0, integer=True),
        "model.params.sigmoid_scale": POSITIVE,
        "model.params.discrete_flow_shift": POSITIVE,
        "model.params.train_guidance": NON_NEGATIVE,
        "model.params.lora_config.rank": COUNT,
        "model.params.lora_config.alpha": Range(0, lo_open=True, optional=True),
        "model.params.lora_config.dropout": Range(0, 1, hi_open=True),
        "model.params.optimizer_config.weight_decay": NON_NEGATIVE,
        "model.params.optimizer_config.eps": POSITIVE,
        "data.params.batch_size": COUNT,
        "data.params.num_workers": Range(0, integer=True),
        "data.params.repeats": COUNT,
        "data.params.reg_repeats": COUNT,
        "data.params.flip_p": UNIT,
        "data.params.recolour_p": UNIT,
        "data.params.min_size": Range(1, integer=True, optional=True),
        "class_images.num": Range(0, integer=True),
        "class_images.ddim_steps": steps,
        "class_images.scale": Range(),
        "class_images.batch_size": COUNT,
        "class_images.seed": SEED,
        "lightning.trainer.accumulate_grad_batches": COUNT,
        "lightning.trainer.gradient_clip_val": Range(0, optional=True),
        "lightning.trainer.log_every_n_steps": COUNT,
        "lightning.modelcheckpoint.params.every_n_train_steps": Range(0, integer=True, optional=True),
        "lightning.callbacks.image_logger.params.batch_frequency": COUNT,
        "lightning.callbacks.image_logger.params.ddim_steps": steps,
        "lightning.callbacks.image_logger.params.n_per_prompt": COUNT,
        "lightning.callbacks.image_logger.params.max_images": COUNT,
        "lightning.callbacks.image_logger.params.scale": Range(),
        "lightning.callbacks.image_logger.params.seed": SEED,
        "lightning.validation.every_n_steps": COUNT,
        "lightning.validation.num_images": COUNT,
        "lightning.validation.seed": SEED,
        "lightning.validation.ddim_steps": steps,
        "lightning.validation.scale": Range(),
        "lightning.validation.pres_margin": NON_NEGATIVE,
        "lightning.validation.loss_timesteps": COUNT,
        "lightning.validation.max_class_images": Range(0, integer=True),
    }


def check_values(config: DictConfig) -> None:
    """Every number of a training config in the range its maths allows; numbers given as text are converted."""
    timesteps = Range(1, integer=True).check("model.params.timesteps",
                                             OmegaConf.select(config, "model.params.timesteps", default=1000))
    for key, rule in _ranges(timesteps).items():
        node, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(config, node)
        if isinstance(parent, DictConfig) and leaf in parent:
            OmegaConf.update(config, key, rule.check(key, parent[leaf]), merge=False)
    betas = OmegaConf.select(config, "model.params.optimizer_config.betas")
    if betas is not None:
        if not isinstance(betas, (list, ListConfig)) or len(betas) != 2:
            raise ConfigError(f"model.params.optimizer_config.betas={betas!r}: expected two numbers in [0, 1)")
        for b in betas:
            Range(0, 1, hi_open=True).check("model.params.optimizer_config.betas", b)
    choices = {"model.params.lr_schedule": ("constant", "cosine"), "model.params.loss_type": ("l2", "l1"),
               "model.params.optimizer_config.name": ("adamw", "adamw8bit"),
               "model.params.optimizer_config.fused_backward": (False, True),
               "model.params.weights_dtype": ("fp32", "bf16"),
               "model.params.frozen_dtype": ("fp32", "bf16", "fp8"),
               "model.params.parameterization": ("eps", "flow"),
               "model.params.timestep_sampling": ("flux_shift", "sigmoid", "shift", "uniform"),
               "model.params.compile": (False, True), "model.params.channels_last": (False, True),
               "model.params.prior_preservation": ("class_images", "base_model"),
               "lightning.export.dtype": (None, "fp32", "fp16", "bf16")}
    for key, allowed in choices.items():
        value = OmegaConf.select(config, key, default=allowed[0])
        check_choice(key, value, allowed)
    _check_steps(config)
    check_lean_training(config)
    check_base_model_prior(config)
    factor = spatial_factor(config)
    check_image_side("data.params.size", OmegaConf.select(config, "data.params.size", default=512), factor)
    for side in ("height", "width"):
        key = f"lightning.callbacks.image_logger.params.{side}"
        check_image_side(key, OmegaConf.select(config, key), factor, optional=True)


def _check_steps(config: DictConfig) -> None:
    """Training must end: ``max_steps`` >= 1, or -1 (Lightning's 'no limit') with a finite ``max_epochs``."""
    trainer = OmegaConf.select(config, "lightning.trainer") or {}
    max_steps = trainer.get("max_steps", -1)
    max_epochs = trainer.get("max_epochs", -1)
    if max_steps == -1 and max_epochs not in (None, -1):
        COUNT.check("lightning.trainer.max_epochs", max_epochs)
        return
    steps = COUNT.check("lightning.trainer.max_steps (--max_steps)", max_steps)
    OmegaConf.update(config, "lightning.trainer.max_steps", steps, merge=False)


#: Lightning's names of fp16 mixed precision, the one that needs a GradScaler.
FP16_MIXED = ("16", "16-mixed")


def check_lean_training(config: DictConfig) -> None:
    """The combinations that fused backward, bf16-stored weights and DeepSpeed's offload cannot train, each refused
    in one line that says why (README: "Training on small GPUs")."""
    trainer = OmegaConf.select(config, "lightning.trainer") or {}
    precision = str(trainer.get("precision", "auto"))
    strategy = str(trainer.get("strategy", ""))
    fused_key = "model.params.optimizer_config.fused_backward"
    fused = OmegaConf.select(config, fused_key, default=False)
    bf16 = OmegaConf.select(config, "model.params.weights_dtype", default="fp32") == "bf16"
    if fused:
        accumulate = trainer.get("accumulate_grad_batches", 1) or 1
        if accumulate > 1:
            raise ConfigError(f"{fused_key} with lightning.trainer.accumulate_grad_batches={accumulate}: fused backward "
                              f"updates each weight as soon as its gradient is ready, so gradients cannot be summed "
                              f"over batches; use accumulate_grad_batches: 1 (or a larger batch_size)")
        clip = trainer.get("gradient_clip_val") or 0
        if clip > 0:
            raise ConfigError(f"{fused_key} with lightning.trainer.gradient_clip_val={clip}: clipping by the global "
                              f"norm needs every gradient before the first update, and fused backward updates "
                              f"during backward; set gradient_clip_val: 0")
        if precision in FP16_MIXED:
            raise ConfigError(f"{fused_key} with lightning.trainer.precision={precision}: fp16's GradScaler must see "
                              f"every gradient (inf/NaN check) before any update; use bf16-mixed or 32-true")
    if bf16 and precision.startswith("16"):
        raise ConfigError(f"model.params.weights_dtype=bf16 with lightning.trainer.precision={precision}: fp16 "
                          f"arithmetic on bf16 weights loses their range; use bf16-mixed, 32-true or auto")
    frozen = OmegaConf.select(config, "model.params.frozen_dtype", default="fp32")
    if frozen == "fp8" or OmegaConf.select(config, "model.params.text_encoder_fp8", default=False):
        from ldm.modules.lowmem import fp8_supported
        if not fp8_supported():
            raise ConfigError("model.params.frozen_dtype=fp8 / text_encoder_fp8: this torch has no usable "
                              "float8_e4m3fn (torch >= 2.1 has it); use frozen_dtype: bf16")
    swap = OmegaConf.select(config, "model.params.blocks_to_swap", default=0) or 0
    if swap:
        net = OmegaConf.select(config, "model.params.unet_config.params") or {}
        if OmegaConf.select(config, "model.params.conditioning_key") != "flux":
            raise ConfigError(f"model.params.blocks_to_swap={swap}: swaps a transformer's blocks (FLUX.1's); this "
                              f"network is a UNet")
        blocks = int(net.get("depth", 19)) + int(net.get("depth_single_blocks", 38))
        if not 0 < swap < blocks:
            raise ConfigError(f"model.params.blocks_to_swap={swap}: must be between 1 and {blocks - 1} (the network "
                              f"has {blocks} blocks; at least one runs where it lives)")
        if not net.get("use_checkpoint", False):
            raise ConfigError(f"model.params.blocks_to_swap={swap} needs unet_config.params.use_checkpoint: true (a "
                              f"swapped block's weights must not wait in accelerator memory for backward)")
    if strategy.startswith("deepspeed"):
        for on, what in ((fused, fused_key), (bf16, "model.params.weights_dtype=bf16")):
            if on:
                raise ConfigError(f"{what} with lightning.trainer.strategy={strategy}: DeepSpeed runs its own "
                                  f"optimizer step and weight precision; turn one of them off")
        name = OmegaConf.select(config, "model.params.optimizer_config.name", default="adamw")
        if "offload" in strategy and name != "adamw":
            raise ConfigError(f"model.params.optimizer_config.name={name} with lightning.trainer.strategy="
                              f"{strategy}: the offloaded optimizer is DeepSpeed's CPU AdamW; use name: adamw")


def full_base_prior(config: DictConfig) -> bool:
    """Whether the run is a full fine-tune whose prior target is a frozen copy of its base weights
    (``prior_preservation: base_model`` without LoRA)."""
    return (OmegaConf.select(config, "model.params.prior_preservation", default="class_images") == "base_model"
            and not OmegaConf.select(config, "model.params.lora_config"))


def check_base_model_prior(config: DictConfig) -> None:
    """``prior_preservation: base_model``: a run without class images (the base model's prediction is the prior's
    target: the LoRA model with its adapters off, or a full fine-tune's frozen copy of its starting weights, which
    must then come from a file); the data then serves each subject example's class prompt
    (``data.params.prior_captions``)."""
    if OmegaConf.select(config, "model.params.prior_preservation", default="class_images") != "base_model":
        return
    key = "model.params.prior_preservation=base_model"
    if full_base_prior(config) and not config.get("actual_resume"):
        raise ConfigError(f"{key} on a full fine-tune needs the base model's weights (--actual_resume): its frozen "
                          f"copy is the prior, and random weights have nothing to preserve")
    concepts = OmegaConf.select(config, "data.params.concepts") or []
    with_images = [f"concepts entry {k + 1}" for k, c in enumerate(concepts) if c.get("reg_data_root")]
    if OmegaConf.select(config, "data.params.reg_data_root"):
        with_images.insert(0, "--reg_data_root")
    if with_images or int(OmegaConf.select(config, "class_images.num", default=0) or 0) > 0:
        raise ConfigError(f"{key} takes no class images (the base model's own prediction is the prior): drop "
                          f"{', '.join(with_images) or 'class_images.num / --num_class_images'}")
    OmegaConf.update(config, "data.params.prior_captions", True, force_add=True)


def check_training_config(config: DictConfig) -> DictConfig:
    """The one check of a training run's settings (keys, then values); returns ``config`` with numbers typed."""
    check_keys(config)
    check_values(config)
    return config
