"""Image I/O at the edge of the system: tensors in [-1, 1] to PNG files, grids, numbered files that never overwrite."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.files import atomic_write, reserve_numbered


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
    """Save as PNG with the given text chunks (prompt, seed, ...), readable later with ``Image.open(p).text``.

    Written atomically: a full disk or a kill leaves no truncated PNG under ``path``."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(metadata)))


def save_numbered_png(image: Image.Image, folder: str | Path, template: str = "{:05}.png",
                      metadata: Optional[Mapping[str, object]] = None) -> Path:
    """Save under the next free number in ``folder`` (``template`` with one ``{}``), never overwriting a file,
    also when another process writes into the same folder at the same time (see ``reserve_numbered``)."""
    head, tail = template.split("{", 1)
    tail = tail.split("}", 1)[1]
    pattern = "^" + re.escape(head) + r"(\d+)" + re.escape(tail) + "$"
    path = reserve_numbered(folder, template, pattern)
    try:
        return save_png(image, path, metadata)
    except BaseException:
        path.unlink(missing_ok=True)  # give the reserved (empty) name back
        raise


def save_sampling_grid(samples: torch.Tensor, folder: str | Path, nrow: int, batches: Sequence[Sequence[str]],
                       metadata: Mapping[str, object]) -> Path:
    """The sampling scripts' grid: every sample tiled ``nrow`` per row into the next ``grid-NNNN.png`` of ``folder``.
    ``samples`` ``[N, 3, H, W]`` are decoder output in [-1, 1] or composited 8-bit pictures (uint8); the PNG's
    prompt is every distinct prompt of ``batches`` in order, joined by " | ", followed by ``metadata``."""
    if samples.dtype == torch.uint8:
        image = Image.fromarray(make_grid(samples, nrow=nrow, pad_value=0).permute(1, 2, 0).numpy())
    else:
        image = to_pil(make_grid(samples, nrow=nrow, pad_value=-1.0))
    prompt = " | ".join(dict.fromkeys(p for batch in batches for p in batch))
    return save_numbered_png(image, folder, "grid-{:04}.png", {"prompt": prompt, **metadata})
