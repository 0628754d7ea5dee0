"""Configs for main.py: load and merge YAML files, apply dotted overrides, and map the DreamBooth flags in."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

#: Flag -> config key, for the flags that only set one config value.
FLAG_KEYS = {
    "data_root": "data.params.data_root",
    "reg_data_root": "data.params.reg_data_root",
    "class_word": "data.params.class_word",
    "token": "data.params.token",
    "max_steps": "lightning.trainer.max_steps",
    "num_class_images": "class_images.num",
    "lora_rank": "model.params.lora_config.rank",
}


class ConfigError(ValueError):
    """A config file or override that cannot be used; one line naming the file or key."""


def load_configs(paths: Sequence[str | Path]) -> DictConfig:
    """Merge the ``--base`` files in order (later files win)."""
    configs = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--base {path}: config file not found")
        try:
            configs.append(OmegaConf.load(path))
        except (OmegaConfBaseException, ValueError) as e:
            raise ConfigError(f"--base {path}: not a valid YAML config: {str(e).splitlines()[0]}") from None
    return OmegaConf.merge(*configs) if configs else OmegaConf.create()


def apply_overrides(config: DictConfig, dotlist: Sequence[str]) -> DictConfig:
    """Trailing ``key.sub=value`` arguments, as in ``model.params.reg_weight=0.5``."""
    bad = [item for item in dotlist if "=" not in item or item.startswith("-")]
    if bad:
        raise ConfigError(f"unrecognised argument {bad[0]!r}: overrides look like model.params.reg_weight=0.5")
    try:
        return OmegaConf.merge(config, OmegaConf.from_dotlist(list(dotlist)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {dotlist}: {str(e).splitlines()[0]}") from None


def apply_flags(config: DictConfig, opt: argparse.Namespace) -> DictConfig:
    """Copy the DreamBooth flags that were given into their config keys (flags beat the YAML)."""
    for flag, key in FLAG_KEYS.items():
        value = getattr(opt, flag, None)
        if value is not None:
            if flag == "class_word":
                value = " ".join(value) if isinstance(value, (list, tuple)) else value
            OmegaConf.update(config, key, value, force_add=True)
    return config


def require(config: DictConfig, key: str, flag: Optional[str] = None) -> object:
    value = OmegaConf.select(config, key)
    if value is None or value == "":
        how = f"{flag} (or {key}=...)" if flag else key
        raise ConfigError(f"missing {how}")
    return value
