"""Configs as data: load and merge YAML files, apply dotted overrides, and check numbers against the range their
maths allows. What a *training* config must hold is checked in ``ldm.training.config``; sampling and the web UI use
these pieces alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

#: The seeds Lightning's ``seed_everything`` accepts (numpy's uint32).
MAX_SEED = 2 ** 32 - 1


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; one line naming the file or key."""


# ---- loading and merging ---------------------------------------------------------------------------------------

def load_configs(paths: Sequence[str | Path], flag: str = "--base") -> DictConfig:
    """Merge the ``--base`` files in order (later files win)."""
    configs = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{flag} {path}: config file not found")
        try:
            loaded = OmegaConf.load(path)
        except (OmegaConfBaseException, ValueError, yaml.YAMLError, UnicodeDecodeError) as e:
            first = " ".join(str(e).split())[:200]
            raise ConfigError(f"{flag} {path}: not a valid YAML config: {first}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{flag} {path}: not a config (its top level is a {type(loaded).__name__}, "
                              f"not a mapping of model:, data:, lightning:)")
        configs.append(loaded)
    return OmegaConf.merge(*configs) if configs else OmegaConf.create()


def apply_overrides(config: DictConfig, dotlist: Sequence[str]) -> DictConfig:
    """Trailing ``key.sub=value`` arguments, as in ``model.params.reg_weight=0.5``."""
    bad = [item for item in dotlist if "=" not in item or item.startswith("-")]
    if bad:
        raise ConfigError(f"unrecognised argument {bad[0]!r}: overrides look like model.params.reg_weight=0.5")
    try:
        return OmegaConf.merge(config, OmegaConf.from_dotlist(list(dotlist)))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"override {' '.join(dotlist)}: {str(e).splitlines()[0]}") from None


# ---- which values are allowed ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """A number's allowed interval; ``integer`` also refuses 2.5, ``optional`` also accepts null."""
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    optional: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        parts = []
        if self.lo > -math.inf:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi < math.inf:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return kind + (" " + " and ".join(parts) if parts else "") + (" (or null)" if self.optional else "")

    def check(self, key: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        number = _as_number(value)
        ok = number is not None and math.isfinite(number) and (not self.integer or float(number).is_integer())
        ok = ok and (number > self.lo if self.lo_open else number >= self.lo)
        ok = ok and (number < self.hi if self.hi_open else number <= self.hi)
        if not ok:
            raise ConfigError(f"{key}={value!r}: must be {self.describe()}")
        return int(number) if self.integer else number


def _as_number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, choices))}")
    return value


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
COUNT = Range(1, integer=True)
UNIT = Range(0, 1)
SEED = Range(0, MAX_SEED, integer=True)


def spatial_factor(config: DictConfig) -> int:
    """Pixels per latent cell times the UNet's total downsampling: image sides must be multiples of this, or the
    UNet's decoder cannot concatenate its skip connections (an odd side halves to a size that doubles back wrong)."""
    vae = OmegaConf.select(config, "model.params.first_stage_config.params.ddconfig.ch_mult", default=[1, 2, 4, 4])
    if OmegaConf.select(config, "model.params.conditioning_key") == "flux":
        return 2 ** (len(vae) - 1) * 2  # FLUX.1's transformer: one token per 2x2 patch of latents
    unet = OmegaConf.select(config, "model.params.unet_config.params.channel_mult", default=[1, 2, 4, 4])
    return 2 ** (len(vae) - 1) * 2 ** (len(unet) - 1)


def check_image_side(key: str, value: Any, factor: int, optional: bool = False) -> Optional[int]:
    if value is None and optional:
        return None
    side = Range(factor, integer=True).check(key, value)
    if side % factor:
        raise ConfigError(f"{key}={value!r}: must be a multiple of {factor} (the VAE's and the UNet's "
                          f"downsampling together; e.g. {side // factor * factor or factor} or "
                          f"{(side // factor + 1) * factor})")
    return side
