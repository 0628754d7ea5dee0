"""Aspect-ratio buckets: portrait and landscape photos are trained at their own shape instead of centre-cropped.

The resolutions of about the configured area (512 x 512 for SD v1, 1024 x 1024 for SDXL), both sides multiples
of ``step`` (64 px, so every side passes the VAE's and the UNet's downsampling), from 1:4 to 4:1 (NovelAI's
scheme, as kohya's trainer uses it). Each image goes to the bucket closest to its aspect ratio
(``image_loading.nearest_target``) and is resized and cropped minimally to it; a batch holds one bucket.
"""
from __future__ import annotations


def bucket_resolutions(size: int, step: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """``(width, height)`` buckets with ``width * height <= size**2``: for every portrait width up to ``size`` the
    largest height (so the area is as close to ``size**2`` as the step allows), the same mirrored for landscape,
    aspect ratios up to ``max_aspect``, sorted by aspect ratio; the square ``(size, size)`` is one of them."""
    if size % step:
        raise ValueError(f"bucket size {size} must be a multiple of the bucket step {step}")
    area = size * size
    buckets = {(size, size)}
    for width in range(step, size + 1, step):  # the portrait side, mirrored for landscape
        height = (area // width) // step * step
        if height / width <= max_aspect:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets, key=lambda wh: wh[0] / wh[1])
