"""Image I/O at the edge of the system: tensors in [-1, 1] to PNG files, grids, non-overwriting file names."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def to_pil(x: torch.Tensor) -> Image.Image:
    """A ``[C, H, W]`` tensor in [-1, 1] (decoder output) -> 8-bit RGB image, rounding as the original did."""
    x = torch.clamp((x.detach().float().cpu() + 1.0) / 2.0, min=0.0, max=1.0)
    arr = 255. * x.permute(1, 2, 0).numpy()
    return Image.fromarray(arr.astype(np.uint8))


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """Tile ``[N, C, H, W]`` into one ``[C, H', W']`` image, ``nrow`` per row, the layout torchvision's make_grid
    gives (which the original scripts used): a ``padding``-pixel border around and between cells."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    cell_h, cell_w = h + padding, w + padding
    grid = images.new_full((c, nrows * cell_h + padding, ncol * cell_w + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, ncol)
        grid[:, y * cell_h + padding: y * cell_h + padding + h, x * cell_w + padding: x * cell_w + padding + w] = \
            images[k]
    return grid


def png_info(metadata: Optional[Mapping[str, object]]) -> Optional[PngInfo]:
    if not metadata:
        return None
    info = PngInfo()
    for k, v in metadata.items():
        info.add_text(str(k), str(v))
    return info


def save_png(image: Image.Image, path: str | Path, metadata: Optional[Mapping[str, object]] = None) -> Path:
    """Save as PNG with the given text chunks (prompt, seed, ...), readable later with ``Image.open(p).text``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=png_info(metadata))
    return path


def next_index(folder: str | Path, pattern: str = r"^(\d+)\.png$") -> int:
    """One past the highest number already used by files in ``folder`` matching ``pattern`` (0 if none), so a
    new run never overwrites earlier outputs, even when some files were deleted in between."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    used = [int(m.group(1)) for p in folder.iterdir() if (m := re.match(pattern, p.name))]
    return max(used) + 1 if used else 0
