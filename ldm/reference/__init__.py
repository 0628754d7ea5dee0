"""The state-dict layouts (key, shape, dtype) of the released checkpoints, shipped with the package.

Copies of ``shared/reference/*.tsv`` (a test checks that they stay identical), so that tools such as
``prune_ckpt.py --report`` work from an installed package, far from the source tree. Format: one tensor per line,
``key<TAB>[d0,d1,...]<TAB>dtype``.
"""
from __future__ import annotations

from pathlib import Path

LAYOUT_DIR = Path(__file__).resolve().parent
SD_V1 = "sd-v1-state-dict.tsv"
SD_V1_EMA = "sd-v1-state-dict-ema.tsv"
SDXL_BASE = "sdxl-base-state-dict.tsv"
FLUX1_DEV = "flux1-dev-state-dict.tsv"
FLUX1_SCHNELL = "flux1-schnell-state-dict.tsv"
FLUX_AE = "flux-ae-state-dict.tsv"
T5XXL_ENCODER = "t5xxl-encoder-state-dict.tsv"


def read_layout(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``key -> (shape, dtype)`` from a layout TSV (a bare file name is looked up in the shipped copies)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = LAYOUT_DIR / path
    rows = {}
    for line in path.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        dims = shape.strip("[]")
        rows[key] = (tuple(int(d) for d in dims.split(",")) if dims else (), dtype)
    return rows
