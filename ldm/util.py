"""Small helpers shared by the whole codebase: config instantiation and a few tensor utilities."""
from __future__ import annotations

import importlib
from typing import Any, Mapping


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Resolve a dotted path such as ``ldm.models.autoencoder.AutoencoderKL`` to the object it names."""
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config: Mapping[str, Any], **kwargs: Any) -> Any:
    """Build ``config.target(**config.params, **kwargs)``: the one way configs become objects."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    params = dict(config.get("params", None) or {})
    params.update(kwargs)
    return get_obj_from_str(config["target"])(**params)


def count_params(model, verbose: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {total * 1.e-6:.2f} M params.")
    return total


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    if exists(val):
        return val
    return d() if callable(d) else d
