"""Inpainting: repaint the masked part of an image, with any checkpoint, and return everything else untouched.

The steps, each a function here (``scripts/inpaint.py`` calls them in this order):

1. ``read_image_and_mask``: the image and a repaint mask (white = repaint, or the image's transparent pixels).
2. ``plan_region``: what is generated, and at which size. The whole image, padded to a multiple of the model's
   factor; or with ``only_masked`` the mask's box (plus ``padding``) resized to about the model's native area,
   so a small face in a large photo gets all the model's pixels.
3. ``region_image`` / ``region_mask``: the region at that size.
4. ``encode_inputs``: the image's latents and, by model kind:
   * a regular (4-channel) checkpoint: ``keep``, the known latent cells, pasted back at every step
     (``ldm.sampling.img2img.denoise_part_way``), so only the masked part is generated;
   * an inpainting checkpoint (9-channel UNet, ``conditioning_key: hybrid``): ``c_concat`` = [mask at latent
     resolution (1 = repaint), latent of the masked image (pixels under the mask set to 0, i.e. grey, in [-1, 1]
     terms, as diffusers' ``StableDiffusionInpaintPipeline`` does)], for both branches of guidance.
5. ``composite``: the decoded region back in place through the feathered mask (``ldm.sampling.masks.feather``): pixels
   farther from the mask than the feather width are the input's, bit for bit, and the result has the input's size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.config import ConfigError
from ldm.data.image_loading import open_image, to_rgb, to_tensor
from ldm.sampling.img2img import encode_images
from ldm.sampling.masks import Box, bounding_box, expand_box, latent_mask, padded_size, processing_size, resize_mask

#: How far the mask's aspect ratio may differ from the image's before it is refused rather than resized.
ASPECT_TOLERANCE = 0.01


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _mask_grey(mask: Image.Image) -> Image.Image:
    """A mask file as 8-bit grey; its transparent pixels count as black (keep), so white strokes drawn on a
    transparent layer are the mask."""
    if has_alpha(mask):
        rgba = mask.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("L")
    return to_rgb(mask).convert("L")


def read_image_and_mask(image_path: str | Path, mask_path: Optional[str | Path] = None
                        ) -> tuple[Image.Image, torch.Tensor]:
    """The image (RGB, transparency over white) and its repaint mask, ``[H, W]`` bool at the image's size.

    ``mask_path``: a picture where white (>= 50 % grey) is repainted, of any size with the image's aspect ratio
    (resized to the image, which is said on one line). Without it the image's alpha channel is the mask:
    transparent (alpha < 50 %) = repaint. Raises ``ConfigError`` / ``ImageError`` (one line)."""
    img = open_image(image_path, "--image")
    if mask_path is None:
        if not has_alpha(img):
            raise ConfigError(f"--image {image_path}: no --mask given and the image has no transparent pixels to "
                              f"repaint; give --mask FILE (white = repaint)")
        mask = np.asarray(img.convert("RGBA"))[..., 3] < 128
        source = f"--image {image_path}'s transparent pixels"
    else:
        grey = _mask_grey(open_image(mask_path, "--mask"))
        (w, h), (mw, mh) = img.size, grey.size
        if abs((mw / mh) / (w / h) - 1) > ASPECT_TOLERANCE:
            raise ConfigError(f"--mask {mask_path}: {mw}x{mh} pixels, another shape than --image {image_path} "
                              f"({w}x{h}); the mask must cover the same picture")
        if (mw, mh) != (w, h):
            print(f"--mask {mask_path}: resized from {mw}x{mh} to the image's {w}x{h} pixels")
            grey = grey.resize((w, h), Image.Resampling.BILINEAR)
        mask = np.asarray(grey) >= 128
        source = f"--mask {mask_path}"
    if not mask.any():
        raise ConfigError(f"{source}: nothing to repaint (no white pixel in the mask)")
    if mask.all():
        raise ConfigError(f"{source}: the mask covers the whole image; to change all of it use "
                          f"scripts/img2img.py")
    return to_rgb(img), torch.from_numpy(mask.copy())


@dataclass(frozen=True)
class Region:
    """The part of the image that is generated: ``box`` in the image, generated at ``size`` = (height, width)
    pixels, either by resizing the box (``resize``) or by padding it at the bottom and right."""
    box: Box
    size: tuple[int, int]
    resize: bool

    @property
    def source_size(self) -> tuple[int, int]:
        top, left, bottom, right = self.box
        return bottom - top, right - left


def plan_region(feathered: torch.Tensor, only_masked: bool, padding: int, native: int, factor: int) -> Region:
    """The whole image padded to a multiple of ``factor``; or, ``only_masked``, the box of the feathered mask
    grown by ``padding`` pixels, generated at about ``native``^2 pixels with the box's aspect ratio."""
    height, width = feathered.shape
    if not only_masked:
        return Region((0, 0, height, width), padded_size(height, width, factor), resize=False)
    top, left, bottom, right = expand_box(bounding_box(feathered > 0), padding, height, width)
    return Region((top, left, bottom, right), processing_size(bottom - top, right - left, native, factor), resize=True)


def region_image(image: Image.Image, region: Region) -> torch.Tensor:
    """The region's pixels at its processing size, ``[1, 3, H, W]`` in [-1, 1] (padding repeats the edge)."""
    top, left, bottom, right = region.box
    crop = image.crop((left, top, right, bottom))
    if region.resize:
        return to_tensor(crop.resize(region.size[::-1], Image.Resampling.LANCZOS))[None]
    h, w = region.source_size
    return F.pad(to_tensor(crop)[None], (0, region.size[1] - w, 0, region.size[0] - h), mode="replicate")


def region_mask(mask: torch.Tensor, region: Region) -> torch.Tensor:
    """The repaint mask of the region at its processing size, ``[H, W]`` bool (padding is never repainted)."""
    top, left, bottom, right = region.box
    crop = mask[top:bottom, left:right]
    if region.resize:
        return resize_mask(crop, *region.size)
    h, w = region.source_size
    return F.pad(crop, (0, region.size[1] - w, 0, region.size[0] - h))


def is_inpainting_model(model: Any) -> bool:
    """An inpainting checkpoint: its UNet also reads the mask and the masked image (``conditioning_key: hybrid``)."""
    return getattr(model.model, "conditioning_key", None) == "hybrid"


@dataclass
class Encoded:
    """What sampling needs from the image: its latents (one posterior sample per batch item), and either ``keep``
    (regular model: 1 = known latent cell) or ``concat`` (inpainting model: [mask, masked-image latent])."""
    x0: torch.Tensor
    keep: Optional[torch.Tensor] = None
    concat: Optional[list[torch.Tensor]] = None


def encode_inputs(model: Any, image: torch.Tensor, repaint: Optional[torch.Tensor], n: int,
                  generator: Optional[torch.Generator] = None) -> Encoded:
    """Encode the ``[1, 3, H, W]`` region image for a batch of ``n``; ``repaint`` is its ``[H, W]`` mask, or None
    for image-to-image (everything repainted: an inpainting model then gets a mask covering everything)."""
    device = model.betas.device
    image = image.to(device)
    x0 = encode_images(model, image.expand(n, -1, -1, -1), generator)
    if not is_inpainting_model(model):
        keep = None if repaint is None else 1 - latent_mask(repaint.to(device), model.vae_factor)
        return Encoded(x0, keep=keep)
    repaint = torch.ones(image.shape[-2:], dtype=torch.bool) if repaint is None else repaint
    repaint = repaint.to(device)
    masked = encode_images(model, image * ~repaint, generator)  # masked pixels 0 in [-1, 1], as diffusers
    lat = latent_mask(repaint, model.vae_factor).to(x0.dtype)
    return Encoded(x0, concat=[lat.expand(n, -1, -1, -1), masked.expand(n, -1, -1, -1)])


def with_concat(cond: Any, concat: Optional[list[torch.Tensor]]) -> Any:
    """Conditioning plus the inpainting model's ``c_concat`` (unchanged without one): a context tensor (SD v1)
    becomes ``{"c_crossattn": [ctx], "c_concat": concat}``, a dict gains the key."""
    if concat is None or cond is None:
        return cond
    if isinstance(cond, torch.Tensor):
        return {"c_crossattn": [cond], "c_concat": concat}
    return {**cond, "c_concat": concat}


def composite(original: np.ndarray, generated: Image.Image, region: Region, feathered: torch.Tensor) -> np.ndarray:
    """Paste ``generated`` (the region at its processing size) into ``original`` (``[H, W, 3]`` uint8) through the
    ``feathered`` mask; pixels where it is 0 are ``original``'s exactly. Returns a new ``[H, W, 3]`` uint8 array."""
    top, left, bottom, right = region.box
    h, w = region.source_size
    gen = generated.resize((w, h), Image.Resampling.LANCZOS) if region.resize else generated.crop((0, 0, w, h))
    f = feathered[top:bottom, left:right].numpy()[..., None].astype(np.float64)
    old = original[top:bottom, left:right]
    blend = np.clip(np.rint(f * np.asarray(gen, dtype=np.float64) + (1 - f) * old), 0, 255).astype(np.uint8)
    out = original.copy()
    out[top:bottom, left:right] = np.where(f > 0, blend, old)
    return out
