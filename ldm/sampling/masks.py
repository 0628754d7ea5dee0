"""Inpainting masks in pixel space: feathering, the region to work on, and the mask at latent resolution.

Conventions: a mask is a ``[H, W]`` tensor, 1 (or True) = repaint. Boxes are ``(top, left, bottom, right)`` with
exclusive bottom/right, as slices take them.

The feathered mask is what the generated pixels are pasted back through. Its support is exactly the pixels within
``radius`` (Euclidean) of the mask, so every pixel farther away keeps its input value bit for bit: value 1 on the
mask, then ``1 - d / (radius + 1)`` at distance d <= radius, 0 beyond.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]


def _shift(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``out[y, x] = x[y + dy, x + dx]``, ``fill`` where that falls outside."""
    h, w = x.shape
    out = x.new_full((h, w), fill)
    if abs(dy) >= h or abs(dx) >= w:  # shifted wholly outside (a feather wider than the image)
        return out
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[yd, xd] = x[ys, xs]
    return out


def distance_to_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Euclidean distance of every pixel to the nearest mask pixel, exact up to ``radius`` (``inf`` beyond).

    The two-pass form of the exact distance transform: first the vertical distance g(y, x) to the nearest mask
    pixel in the same column, then d^2(y, x) = min over x' of (x - x')^2 + g(y, x')^2 (Felzenszwalb and
    Huttenlocher 2012, sec. 2), both passes limited to offsets of at most ``radius``: O(radius * H * W)."""
    inf = float("inf")
    m = mask.bool()
    g = torch.where(m, 0.0, inf).to(torch.float64)
    # Offsets beyond the image's sides reach no pixel: stop there (a feather may be wider than the image).
    for dy in range(1, min(radius, m.shape[0] - 1) + 1):
        for s in (dy, -dy):
            g = torch.minimum(g, torch.where(_shift(m.double(), s, 0, 0.0) > 0, float(dy), inf))
    g2 = g ** 2
    d2 = g2.clone()
    for dx in range(1, min(radius, m.shape[1] - 1) + 1):
        for s in (dx, -dx):
            d2 = torch.minimum(d2, _shift(g2, 0, s, inf) + dx * dx)
    d = d2.sqrt()
    return torch.where(d <= radius, d, inf)


def feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """The mask blurred outwards by ``radius`` pixels: 1 on the mask, ``1 - d / (radius + 1)`` at distance
    ``d <= radius``, exactly 0 farther away (float32). ``radius`` 0 gives the mask itself. Computed only in the
    mask's box grown by ``radius``, which holds every nonzero value, so a small mask in a large photo is cheap."""
    out = torch.zeros(mask.shape)
    box = bounding_box(mask)
    if box is None:
        return out
    top, left, bottom, right = expand_box(box, radius, *mask.shape)
    d = distance_to_mask(mask[top:bottom, left:right], radius)
    out[top:bottom, left:right] = torch.where(torch.isfinite(d), 1 - d / (radius + 1), 0.0).float()
    return out


def bounding_box(mask: torch.Tensor) -> Optional[Box]:
    """The smallest box holding every nonzero pixel, or None for an empty mask."""
    rows, cols = mask.bool().any(dim=1).nonzero(), mask.bool().any(dim=0).nonzero()
    if len(rows) == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def expand_box(box: Box, padding: int, height: int, width: int) -> Box:
    """``box`` grown by ``padding`` pixels on every side, clipped to the image."""
    top, left, bottom, right = box
    return max(top - padding, 0), max(left - padding, 0), min(bottom + padding, height), min(right + padding, width)


def processing_size(height: int, width: int, native: int, factor: int) -> tuple[int, int]:
    """The size to generate a ``height`` x ``width`` region at: about ``native``^2 pixels (all the model was trained
    on, whatever the region's own size), the region's aspect ratio, both sides multiples of ``factor``."""
    scale = native / math.sqrt(height * width)
    return (max(factor, round(height * scale / factor) * factor), max(factor, round(width * scale / factor) * factor))


def padded_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """Each side rounded up to a multiple of ``factor``."""
    return -(-height // factor) * factor, -(-width // factor) * factor


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A repaint mask at another size, kept conservative: a target pixel is masked when any of the source pixels
    under it is (antialiased bilinear coverage > 0), so a thin mask does not vanish when shrunk."""
    if tuple(mask.shape) == (height, width):
        return mask.bool()
    x = mask.float()[None, None]
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0, 0] > 1e-3


def latent_mask(mask: torch.Tensor, vae_factor: int) -> torch.Tensor:
    """The repaint mask at latent resolution, ``[1, 1, H/f, W/f]`` float: a latent cell is repainted when any of
    its ``f x f`` pixels is (max pooling; nearest sampling would let a small mask fall between samples)."""
    return F.max_pool2d(mask.float()[None, None], vae_factor)
