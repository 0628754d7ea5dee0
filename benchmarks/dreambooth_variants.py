"""The rows of ``--suite dreambooth``: a ``Variant`` is one row's config switches, parsed from its name
(``full+ckpt+8bit+fused``, ``lora16+ckpt+8bit+fp8+swap20``); the default rows of each family; the family a config
belongs to, and which rows it cannot train."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from benchmarks.dreambooth_flux import block_count

FLAGS = {"ckpt": "checkpointing", "8bit": "optimizer", "mixed": "mixed", "cached": "cached", "fused": "fused",
         "bf16w": "bf16_weights", "compile": "compile", "cl": "channels_last", "bf16": "frozen_dtype",
         "fp8": "frozen_dtype", "fp8t5": "text_encoder_fp8"}
#: Switches that set a value other than True.
VALUES = {"8bit": "adamw8bit", "bf16": "bf16", "fp8": "fp8"}
SWAP = re.compile(r"swap([1-9][0-9]*)")  # swapN: blocks_to_swap N
#: The families the suite tells apart by their config; the peer scripts of each (README names).
PEERS = {"sd": "train_dreambooth.py", "flux": "train_dreambooth_lora_flux.py"}


@dataclass(frozen=True)
class Variant:
    """The config switches of one row. Names: full / unet (text encoder trained or frozen), loraR (rank-R
    adapters on the frozen UNet's attention), +ckpt (UNet gradient checkpointing), +8bit (AdamW8bit),
    +mixed (autocast), +cached (VAE latents and text embeddings computed once, before the steps), +fused (fused
    backward), +bf16w (trainable weights stored in bf16), +compile (torch.compile of the UNet), +cl
    (channels-last), +bf16 / +fp8 (``frozen_dtype``: frozen weights in bf16, or the frozen network's linear
    weights in float8; both run under bf16 autocast), +fp8t5 (``text_encoder_fp8``), +swapN (``blocks_to_swap``;
    FLUX only). "unet" is the denoising network, FLUX's transformer included."""
    text_encoder: bool
    checkpointing: bool
    optimizer: str = "adamw"
    mixed: bool = False
    cached: bool = False
    lora_rank: Optional[int] = None
    fused: bool = False
    bf16_weights: bool = False
    compile: bool = False
    channels_last: bool = False
    frozen_dtype: str = "fp32"
    text_encoder_fp8: bool = False
    blocks_to_swap: int = 0

    @classmethod
    def parse(cls, name: str) -> "Variant":
        """``full+ckpt+8bit+fused``: a kind (full, unet, loraR), then switches; ValueError for an unknown part
        (or for both bf16 and fp8)."""
        kind, *flags = name.split("+")
        unknown = [f for f in flags if f not in FLAGS and not SWAP.fullmatch(f)]
        lora = kind[4:].isdigit() and kind.startswith("lora") and int(kind[4:]) > 0
        if unknown or not (kind in ("full", "unet") or lora):
            raise ValueError(str(unknown or [kind]))
        if {"bf16", "fp8"} <= set(flags):
            raise ValueError("['bf16' with 'fp8']")
        switches = {FLAGS[f]: VALUES.get(f, True) for f in flags if f in FLAGS}
        switches.update({"blocks_to_swap": int(m[1]) for m in map(SWAP.fullmatch, flags) if m})
        return cls(text_encoder=kind == "full", lora_rank=int(kind[4:]) if lora else None, **{
            "checkpointing": False, **switches})

    @property
    def autocast(self) -> bool:
        """Whether the step runs under autocast: +mixed, and frozen weights in bf16 or float8 (main.py refuses
        them without bf16-mixed: their arithmetic is bf16)."""
        return self.mixed or self.frozen_dtype != "fp32"

    def peer_name(self, family: str = "sd") -> Optional[str]:
        """The row of the family's diffusers script (``PEERS``) with the options it has, or None where it has no
        such run. SD v1's train_dreambooth.py: full / unet with ckpt, 8bit, mixed (no caches, none of the lean
        switches; LoRA is another script). FLUX.1's train_dreambooth_lora_flux.py: loraR with ckpt, 8bit, bf16 (its
        --mixed_precision bf16 stores every frozen part in bf16: our bf16 and fp8 rows) and cached
        (--cache_latents); no float8, no block swap, no full fine-tune (another script)."""
        if family == "flux":
            if not self.lora_rank:
                return None
            flags = [f for f, on in (("ckpt", self.checkpointing), ("8bit", self.optimizer == "adamw8bit"),
                                     ("bf16", self.frozen_dtype != "fp32"), ("cached", self.cached)) if on]
            return "+".join([f"lora{self.lora_rank}", *flags])
        if self.lora_rank or family not in PEERS:
            return None
        flags = [f for f, on in (("ckpt", self.checkpointing), ("8bit", self.optimizer == "adamw8bit"),
                                 ("mixed", self.mixed)) if on]
        return "+".join(["full" if self.text_encoder else "unet", *flags])

    def overrides(self) -> dict[str, Any]:
        """Dotted config keys -> values; everything else comes from the fine-tuning config (a LoRA rank merges into
        the config's ``lora_config``: FLUX's keep their alpha and target projections)."""
        return {"model.params.cond_stage_trainable": self.text_encoder,
                "model.params.unet_config.params.use_checkpoint": self.checkpointing,
                "model.params.optimizer_config.name": self.optimizer,
                "model.params.optimizer_config.fused_backward": self.fused,
                "model.params.weights_dtype": "bf16" if self.bf16_weights else "fp32",
                "model.params.compile": self.compile,
                "model.params.channels_last": self.channels_last,
                "model.params.cache_latents": self.cached,
                "model.params.frozen_dtype": self.frozen_dtype,
                "model.params.text_encoder_fp8": self.text_encoder_fp8,
                "model.params.blocks_to_swap": self.blocks_to_swap,
                "model.params.lora_config": {"rank": self.lora_rank} if self.lora_rank else None}


#: The rows of ``--variants all`` for SD v1: the memory savers of the README's table, then the lean switches alone
#: (on the reference recipe) and combined.
V1_VARIANTS = ("full", "full+ckpt", "unet+ckpt", "unet", "full+ckpt+8bit", "full+ckpt+8bit+mixed",
               "unet+ckpt+8bit+mixed+cached", "lora4+ckpt", "lora16+ckpt")
V1_LEAN = ("full+ckpt+fused", "full+ckpt+bf16w", "full+ckpt+cl", "full+ckpt+compile", "full+ckpt+8bit+fused+bf16w",
           "full+ckpt+8bit+fused+bf16w+cl+compile", "unet+ckpt+8bit+fused+bf16w+cached",
           "lora4+ckpt+fused+bf16w+cached")
#: SDXL: the LoRA recipe of sdxl-dreambooth-lora.yaml (its first row, the reference) and a full UNet fine-tune,
#: each as the recipe has it and with fused backward and bf16 weights.
SDXL_RECIPE = "lora4+ckpt+8bit+mixed+cached"
SDXL_VARIANTS = (SDXL_RECIPE, SDXL_RECIPE + "+fused+bf16w", "unet+ckpt+8bit+mixed+cached",
                 "unet+ckpt+8bit+mixed+cached+fused+bf16w")


def variant_config(path: Path, variant: Variant) -> Any:
    """The fine-tuning config at ``path`` with the variant's switches."""
    from omegaconf import OmegaConf
    config = OmegaConf.load(path)
    for key, value in variant.overrides().items():
        OmegaConf.update(config, key, value, force_add=True)
    return config


def config_family(path: Path) -> str:
    """``flux`` (a FLUX.1 transformer: ``conditioning_key: flux``), ``sdxl`` (sgm's conditioner) or ``sd``."""
    from omegaconf import OmegaConf
    params = OmegaConf.load(path).model.get("params") or {}
    if params.get("conditioning_key") == "flux":
        return "flux"
    return "sdxl" if "conditioner_config" in params else "sd"


def check_variant(name: str, variant: Variant, family: str, config: Any) -> None:
    """``SystemExit`` (one line, before any worker) for a row the family cannot train: SDXL's and FLUX's text
    encoders are frozen here; block swap moves a FLUX transformer's blocks, at least one of which stays."""
    title = {"sdxl": "SDXL", "flux": "FLUX.1"}.get(family)
    if title and variant.text_encoder:
        raise SystemExit(f"--variants {name}: {title}'s text encoders are frozen here; use unet+... or loraR+...")
    if variant.blocks_to_swap and family != "flux":
        raise SystemExit(f"--variants {name}: block swap moves a transformer's blocks (FLUX.1's); this network is a "
                         f"UNet")
    if variant.blocks_to_swap and variant.blocks_to_swap >= block_count(config):
        raise SystemExit(f"--variants {name}: at most {block_count(config) - 1} of the transformer's "
                         f"{block_count(config)} blocks can be swapped (one runs where it lives)")
