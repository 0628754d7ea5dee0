"""Config instantiation (``target:``/``params:``) and the few helpers the model code shares.

Configs are data: a ``target:`` string may only name an object inside this project's package or in the
libraries the configs need (torch, Lightning). A config from elsewhere (a run folder someone sent you, a
downloaded YAML) therefore cannot make ``instantiate_from_config`` import and run arbitrary code; the command-line
tools accept any import only when the user passes ``--allow_any_target``.
"""
from __future__ import annotations

import hashlib
import importlib
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

#: Module prefixes a config's ``target`` may name without ``--allow_any_target``.
ALLOWED_TARGET_PREFIXES = ("ldm.", "torch.", "pytorch_lightning.", "lightning.")
_allow_any = False


class TargetNotAllowed(ValueError):
    """A config ``target`` outside the allowed packages; one line naming it."""


@contextmanager
def any_target_allowed(allow: bool = True) -> Iterator[None]:
    """Within the body, ``target`` strings may name any importable object (the ``--allow_any_target`` flag)."""
    global _allow_any
    before, _allow_any = _allow_any, allow
    try:
        yield
    finally:
        _allow_any = before


def allow_any_target(allow: bool) -> None:
    """Set the ``--allow_any_target`` switch for the rest of the process (a command line's whole run)."""
    global _allow_any
    _allow_any = allow


def check_target(string: str) -> str:
    if not isinstance(string, str) or "." not in string:
        raise TargetNotAllowed(f"target {string!r}: expected a dotted path such as ldm.models.autoencoder.AutoencoderKL")
    if not _allow_any and not string.startswith(ALLOWED_TARGET_PREFIXES):
        raise TargetNotAllowed(
            f"target {string!r}: configs may only name objects in {', '.join(p[:-1] for p in ALLOWED_TARGET_PREFIXES)}"
            f" (pass --allow_any_target to import other modules from a config you trust)")
    return string


#: Modules that moved when ``ldm/`` was grouped by job: configs saved before (a run folder's ``configs/``, a
#: config someone sent you) name them by their old path, which keeps working. Old path -> new path.
MOVED_MODULES = {
    "ldm.train": "ldm.training.run",
    "ldm.callbacks": "ldm.training.callbacks",
    "ldm.validation": "ldm.training.validation",
    "ldm.class_images": "ldm.training.class_images",
    "ldm.lr_scheduler": "ldm.optim.lr_scheduler",
    "ldm.models.diffusion.optim": "ldm.optim.build",
    "ldm.models.diffusion.per_tensor_optim": "ldm.optim.per_tensor",
    "ldm.models.diffusion.rounding": "ldm.optim.rounding",
    "ldm.models.diffusion.speed": "ldm.modules.speed",
    "ldm.models.diffusion.cache": "ldm.data.cache",
    "ldm.models.diffusion.training": "ldm.models.diffusion.dreambooth",
    "ldm.models.diffusion.k_samplers": "ldm.sampling.k_samplers",
    "ldm.models.diffusion.k_schedules": "ldm.sampling.k_schedules",
    "ldm.models.diffusion.samplers": "ldm.sampling.samplers",
    "ldm.cli": "ldm.sampling.cli",
    "ldm.img2img": "ldm.sampling.img2img",
    "ldm.inpaint": "ldm.sampling.inpaint",
    "ldm.masks": "ldm.sampling.masks",
    "ldm.checkpoint": "ldm.weights.checkpoint",
    "ldm.vae_file": "ldm.weights.vae",
    "ldm.lora": "ldm.weights.lora",
    "ldm.prune": "ldm.export.prune",
    "ldm.export_diffusers": "ldm.export.diffusers",
    "ldm.export_diffusers_sdxl": "ldm.families.sdxl.diffusers",
}


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Resolve a dotted path such as ``ldm.models.autoencoder.AutoencoderKL`` to the object it names (a module's
    path from before the layout change is read as its new one, :data:`MOVED_MODULES`)."""
    module, cls = check_target(string).rsplit(".", 1)
    module = MOVED_MODULES.get(module, module)
    if reload:
        importlib.reload(importlib.import_module(module))
    try:
        return getattr(importlib.import_module(module, package=None), cls)
    except (ImportError, AttributeError) as e:
        raise TargetNotAllowed(f"target {string!r}: cannot be imported ({e})") from None


def instantiate_from_config(config: Mapping[str, Any], **kwargs: Any) -> Any:
    """Build ``config.target(**config.params, **kwargs)``: the one way configs become objects."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    params = dict(config.get("params", None) or {})
    params.update(kwargs)
    return get_obj_from_str(config["target"])(**params)


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    if exists(val):
        return val
    return d() if callable(d) else d


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def fmt_bytes(n: float, decimal: bool = False) -> str:
    """A size for people: binary units (``1.50 GiB``, ``12 MiB``, ``3 KiB``) for memory, or decimal ones
    (``2.132 GB``, ``4.1 MB``) as file managers and download pages show file sizes."""
    if decimal:
        return f"{n / 1e9:.3f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.1f} MB"
    if abs(n) >= 2 ** 30:
        return f"{n / 2 ** 30:.2f} GiB"
    return f"{n / 2 ** 20:.0f} MiB" if abs(n) >= 2 ** 20 else f"{n / 2 ** 10:.0f} KiB"


#: What ``main.py`` puts in the environment before torch is imported (unless already set): torch's CPU allocator
#: places tensors of 2 MiB and more on transparent huge pages, so the large tensors a CPU run hands back to the OS
#: after use (:class:`ldm.training.callbacks.ReleaseFreedMemory`) cost a page fault per 2 MiB instead of per 4 KiB.
TRAINING_ENVIRONMENT = {"THP_MEM_ALLOC_ENABLE": "1"}

#: Allocations from this size up get their own pages from the OS and give them back when freed (glibc's
#: ``M_MMAP_THRESHOLD``); smaller ones stay in the heap.
LARGE_ALLOCATION = 4 << 20


def return_large_frees_to_the_os() -> bool:
    """Make the C library give each freed allocation of 4 MiB or more back to the operating system at once
    (glibc's ``mallopt(M_MMAP_THRESHOLD, 4 MiB)``); True where it took effect.

    PyTorch's CPU tensors come from malloc, and glibc serves anything up to 32 MiB from its heaps once a large
    block has been freed (its threshold adapts upwards). What a training step frees there (activations, the
    optimizer's temporaries) stays resident between the blocks that are kept, and a step's next allocations
    do not fit the holes: the process grows from step to step, 1.5 GiB above the memory in use for a lean SD v1
    step. With a fixed threshold large tensors never enter the heap. The price is a page fault per page of
    each large tensor (a lean v1 step on a 2-core CPU: 37 s -> 44 s with ``THP_MEM_ALLOC_ENABLE=1``, which
    ``main.py`` sets, 52 s without).
    """
    libc = _libc()
    return bool(libc) and libc.mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION) == 1


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the operating system (glibc's ``malloc_trim(0)``); True where it ran.

    The complement of :func:`return_large_frees_to_the_os` for the allocations under its threshold: the free
    space between kept blocks of the heap is resident until trimmed. The trim takes a fraction of a second.
    """
    libc = _libc()
    if not libc:
        return False
    libc.malloc_trim(0)
    return True


_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
_libc_handle: Any = None  # glibc once looked up; False where there is none (macOS, Windows, musl)


def _libc() -> Any:
    global _libc_handle
    if _libc_handle is None:
        import ctypes
        import ctypes.util
        import sys
        _libc_handle = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.malloc_trim, libc.mallopt  # both glibc-only
                _libc_handle = libc
            except (OSError, AttributeError):
                pass
    return _libc_handle
