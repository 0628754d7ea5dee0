"""Reading the user's training photos: find them, decode them robustly, square-crop them, caption them.

DreamBooth users bring a handful of phone photos and a folder of class images, in whatever format their
camera or browser produced: rotated JPEGs that only EXIF says are upright, two-frame MPOs, PNGs with
transparency, CMYK or 16-bit scans. Every one of those must become the same thing, an RGB ``size x size``
crop, and every file that cannot must stop the run with one line that names it, before training starts.
"""
from __future__ import annotations

import io
import logging
import math
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

try:  # LittleCMS is optional in Pillow builds; without it embedded ICC profiles are ignored
    from PIL import ImageCms
except ImportError:  # pragma: no cover - present in the PyPI wheels
    ImageCms = None

logger = logging.getLogger(__name__)

# Suffixes we try to decode; everything else in a data folder is skipped (captions) or reported (HEIC, GIF...).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".mpo"})
CAPTION_SUFFIX = ".txt"
# Per-photo loss masks (``photo.mask.png`` beside ``photo.jpg``) are not training images.
MASK_SUFFIXES = (".mask.png",)
# Pillow's guidance: a reducing_gap of 3 is indistinguishable from a full Lanczos resample, and much faster
# on 12-megapixel phone photos because most of the reduction is done by cheap box averaging first.
REDUCING_GAP = 3.0
# Decompression bombs: a small file that declares a huge image (a 100 KB PNG can decode to gigabytes). An image is
# refused before decoding when it has more than MAX_PIXELS pixels (134 MP, 400 MB as RGB; Pillow itself refuses
# 179 MP and more while opening, which we report the same way), or more than MAX_PIXELS_PER_BYTE pixels per byte of file beyond BOMB_MIN_PIXELS (16.7 MP):
# photos compress to 0.1-3 bytes per pixel, so 1024 pixels per byte is a forged header, not a photo.
MAX_PIXELS = 2 ** 27
MAX_PIXELS_PER_BYTE = 1024
BOMB_MIN_PIXELS = 2 ** 24
# Exceptions that Pillow's plugins raise on broken files (SyntaxError and EOFError come from older plugins).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageError(ValueError):
    """A training image or caption that cannot be used; the message is one line: ``<file>: <problem>``."""


def _error(path: str | Path, problem: object) -> ImageError:
    # Pillow's own messages sometimes span lines; the user should get one line to grep for.
    text = " ".join(str(problem).split())
    return ImageError(f"{path}: {text}")


def _not_a_file(path: Path) -> str | None:
    """What a folder entry is when it is not a regular file (None for a regular file)."""
    try:
        mode = path.stat().st_mode  # follows links
    except OSError as exc:
        return "a broken or looping link" if path.is_symlink() else f"unreadable ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a device", stat.S_ISBLK: "a device"}
    return next((what for test, what in kinds.items() if test(mode)), "not a regular file")


def find_images(folder: str | Path, role: str, warn: bool = True) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name.

    ``role`` names where the folder came from (e.g. ``"--data_root"``) so that the error points at the flag.
    Caption files (``.txt``) and hidden files (``.DS_Store``, macOS ``._IMG.jpg`` forks) are skipped silently;
    everything else that is not used is named in one logged warning: other formats (HEIC, GIF, ...), and entries
    that are not regular files (sub-folders, FIFOs, devices, broken or looping links), which are never opened.
    A user who exported from a phone would otherwise train on fewer photos than they think (``warn=False``: a
    check ahead of loading, which warns itself).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "folder not found"
        raise ImageError(f"{role} {folder}: {what}")
    images, others = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        kind = _not_a_file(path)
        if kind is not None:
            others.append(f"{path.name} ({kind})")
        elif path.suffix.lower() == CAPTION_SUFFIX or path.name.endswith(MASK_SUFFIXES):
            continue
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            others.append(path.name)
    if not images:
        hint = f" (skipped {len(others)} other entries, e.g. {others[0]})" if others else ""
        raise ImageError(f"{role} {folder}: no images (PNG, JPEG, WebP, BMP) in this folder{hint}")
    if others and warn:
        logger.warning("%s %s: skipping %d entries that are not PNG/JPEG/WebP/BMP files: %s", role, folder,
                       len(others), ", ".join(others[:5]) + (" ..." if len(others) > 5 else ""))
    return images


def check_pixel_count(path: Path, width: int, height: int) -> None:
    """Refuse a decompression bomb before decoding it (see MAX_PIXELS and MAX_PIXELS_PER_BYTE)."""
    pixels = width * height
    size = max(1, os.path.getsize(path))
    if pixels > MAX_PIXELS or (pixels > BOMB_MIN_PIXELS and pixels > MAX_PIXELS_PER_BYTE * size):
        raise _error(path, f"declares {width}x{height} pixels in a {size}-byte file: refused as a possible "
                           f"decompression bomb (limits: {MAX_PIXELS} pixels, or {MAX_PIXELS_PER_BYTE} pixels per "
                           f"byte above {BOMB_MIN_PIXELS} pixels)")


def _on_white(img: Image.Image) -> Image.Image:
    """Composite an image with alpha (or a palette/grey transparency key) over white.

    Converting RGBA straight to RGB keeps the colour under fully transparent pixels, which is often black or
    garbage; white is what the user saw in their viewer and is a neutral background for the model.
    """
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale -> 8-bit RGB, scaling the range instead of clipping it.

    Pillow's own ``convert("RGB")`` clips these modes at 255, turning a 16-bit scan almost entirely white.
    ``I;16*`` says its range (0..65535). ``I`` and ``F`` do not, so the range is inferred from the values:
    [0, 1] floats, then 8-bit, then 16-bit data, else a min-max stretch.
    """
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        lo, peak = 0.0, 65535.0
    else:
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0 and hi <= 1 and img.mode == "F":
            lo, peak = 0.0, 1.0
        elif lo >= 0 and hi <= 255:
            lo, peak = 0.0, 255.0
        elif lo >= 0 and hi <= 65535:
            lo, peak = 0.0, 65535.0
        else:
            peak = max(hi - lo, 1e-12)
    grey = np.clip(np.round((a - lo) * (255.0 / peak)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _icc_to_srgb(img: Image.Image) -> Image.Image | None:
    """Colour-manage an RGB or CMYK image with an embedded ICC profile into sRGB, or None if it has none.

    Phones tag photos Display P3 and print files carry CMYK press profiles; reading their numbers as sRGB
    shifts colours. A profile LittleCMS cannot use is ignored (we fall back to the plain conversion).
    """
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "CMYK") or ImageCms is None:
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB as a viewer would show it (alpha over white, ranges scaled, ICC applied)."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        return _on_white(img)
    if img.mode.startswith("I") or img.mode == "F":
        return _high_bit_depth_to_rgb(img)
    managed = _icc_to_srgb(img)
    if managed is not None:
        return managed
    # "1", "L", "P", "CMYK", "YCbCr", "RGB": Pillow's conversions are right for these.
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass(frozen=True)
class Crop:
    """Where a training crop came from (SDXL's micro-conditioning, Podell et al. 2023, sec. 2.2): the image's size
    as the user sees it, ``(height, width)``, and the crop's top-left corner in the resized image, ``(top, left)``."""
    original_size: tuple[int, int]
    top_left: tuple[int, int]


def _cover_box(width: int, height: int, target_w: int, target_h: int) -> tuple[float, float, float, float]:
    """The centred box of the source that, resized to ``target_w x target_h``, covers it with the least cropping
    (the source scaled so that its short side relative to the target fits, the excess split evenly)."""
    scale = max(target_w / width, target_h / height)
    bw, bh = min(target_w / scale, width), min(target_h / scale, height)  # rounding can overshoot by 1e-13
    return max(0.0, (width - bw) / 2), max(0.0, (height - bh) / 2), (width + bw) / 2, (height + bh) / 2


def crop_of(width: int, height: int, target_w: int, target_h: int) -> Crop:
    """The :class:`Crop` of :func:`fit`'s box, in the resized image's pixels."""
    left, top, _, _ = _cover_box(width, height, target_w, target_h)
    scale = max(target_w / width, target_h / height)
    return Crop((height, width), (round(top * scale), round(left * scale)))


def square_crop(width: int, height: int, size: int) -> Crop:
    """The centre square's :class:`Crop`."""
    return crop_of(width, height, size, size)


def fit(img: Image.Image, target_w: int, target_h: int, resample: int = Image.Resampling.LANCZOS) -> Image.Image:
    """Resize and centre-crop to exactly ``target_w x target_h`` with the least cropping, in one resample.

    Resampling only the centre box (``box=``) is the same as crop-then-resize but never builds the large
    intermediate; half-pixel box edges keep the crop exactly centred for odd size differences. A square target
    is the classic "short side to size, centre square"."""
    box = _cover_box(img.width, img.height, target_w, target_h)
    return img.resize((target_w, target_h), resample, box=box, reducing_gap=REDUCING_GAP)


@dataclass
class TrainingImage:
    """A decoded training photo at its target size: ``pixels`` ``[H, W, 3]`` uint8, the :class:`Crop`, and the
    loss mask ``[H, W]`` float32 in [0, 1] (1 = subject) when one was asked for and found."""
    pixels: np.ndarray
    crop: Crop
    mask: np.ndarray | None = None


#: A photo's mask file: ``photo.mask.png`` beside ``photo.jpg`` (white = subject).
def mask_path(path: Path) -> Path:
    return path.with_name(path.stem + MASK_SUFFIXES[0])


def _alpha(img: Image.Image) -> Image.Image | None:
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return img.convert("RGBA").getchannel("A")
    return None


def load_training_image(path: str | Path, targets: Sequence[tuple[int, int]], min_size: int | None = None,
                        with_mask: bool = False) -> TrainingImage:
    """Decode ``path`` and fit it to the target ``(width, height)`` closest to its aspect ratio (one target: a
    fixed size; several: aspect-ratio buckets). ``min_size`` (default: a quarter of the smallest target side)
    rejects thumbnails. ``with_mask`` also reads the loss mask: ``photo.mask.png`` beside the photo (any size of
    the same aspect ratio, white = subject), else the photo's alpha channel, else None."""
    path = Path(path)
    smallest = min(min(t) for t in targets)
    min_size = smallest // 4 if min_size is None else min_size

    def check_size(w: int, h: int) -> None:  # the short side is the same before and after EXIF rotation
        if min(w, h) < min_size:
            raise _error(path, f"image is {w}x{h} pixels; its short side must be at least {min_size} "
                               f"(training size {max(max(t) for t in targets)})")

    # JPEG only: let libjpeg decode at 1/2..1/8 scale while keeping >= 2x the target, as Pillow's thumbnail()
    # does; the remaining reduction is done by the high-quality resample in fit().
    draft = (2 * max(max(t) for t in targets),) * 2
    img = open_image(path, draft=draft, check=check_size)
    target = nearest_target(img.width, img.height, targets)
    mask = None
    if with_mask:
        mask_img = _alpha(img)
        if mask_path(path).is_file():
            mask_img = open_image(mask_path(path)).convert("L")
            if abs(mask_img.width / mask_img.height - img.width / img.height) > 0.01 * img.width / img.height:
                raise _error(mask_path(path), f"mask is {mask_img.width}x{mask_img.height} but the photo is "
                                              f"{img.width}x{img.height}: not the same aspect ratio")
        if mask_img is not None:
            mask = np.asarray(fit(mask_img, *target, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    pixels = np.asarray(fit(to_rgb(img), *target))
    return TrainingImage(pixels, crop_of(img.width, img.height, *target), mask)


def nearest_target(width: int, height: int, targets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The ``(w, h)`` of ``targets`` whose aspect ratio is closest to ``width / height`` (in log ratio)."""
    aspect = math.log(width / height)
    return min(targets, key=lambda t: (abs(math.log(t[0] / t[1]) - aspect), -t[0] * t[1]))


def load_image(path: str | Path, size: int, min_size: int | None = None, with_crop: bool = False
               ) -> Image.Image | tuple[Image.Image, Crop]:
    """Decode ``path`` fully and return an RGB ``size x size`` centre crop (short side resized to ``size``).

    The first frame of multi-frame files is used (MPO from phones hold the photo then a depth/preview frame).
    EXIF orientation is applied, so the crop is taken from the image as the user sees it. ``min_size``
    (default ``size // 4``) rejects thumbnails that would be upscaled into blur. Raises :class:`ImageError`
    naming the file for unreadable, empty, truncated or too-small images. ``with_crop`` also returns the
    :class:`Crop` the square was taken with.
    """
    loaded = load_training_image(path, [(size, size)], min_size)
    image = Image.fromarray(loaded.pixels)
    return (image, loaded.crop) if with_crop else image


def open_image(path: str | Path, role: str | None = None, draft: tuple[int, int] | None = None,
               check: Callable[[int, int], None] | None = None) -> Image.Image:
    """Decode the first frame of ``path`` fully, EXIF orientation applied, in its own mode (alpha kept).

    Decompression bombs are refused from the header, before decoding; ``check(width, height)`` may refuse more.
    Every problem is one :class:`ImageError` line naming the file (after ``role``, e.g. ``"--init-img"``)."""
    path = Path(path)
    name = f"{role} {path}" if role else path
    try:
        with warnings.catch_warnings():  # our own limit (check_pixel_count) replaces Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            img.seek(0)
            check_pixel_count(path, *img.size)
            if check is not None:
                check(*img.size)
            if draft is not None:
                img.draft(None, draft)
            img.load()  # a full decode: lazy opening only reads the header and would miss truncation
            try:
                upright = ImageOps.exif_transpose(img)
            except _DECODE_ERRORS + (KeyError, IndexError, TypeError) as exc:
                # Malformed EXIF is common in edited photos; the pixels are still good.
                logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, exc)
                upright = img
            return upright.copy() if upright is img else upright  # ``with`` closes ``img``
    except ImageError as exc:
        raise _error(name, str(exc).removeprefix(f"{path}: ")) from None
    except FileNotFoundError:
        raise _error(name, "file not found") from None
    except IsADirectoryError:
        raise _error(name, "is a folder, not an image") from None
    except Image.DecompressionBombError as exc:
        raise _error(name, f"refused as a possible decompression bomb ({exc})") from None
    except Image.UnidentifiedImageError:
        problem = "empty file" if path.stat().st_size == 0 else "not an image Pillow can read (corrupt file?)"
        raise _error(name, problem) from None
    except _DECODE_ERRORS as exc:
        raise _error(name, f"cannot decode image ({exc})") from None


def uint8_to_tensor(array: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, H, W]`` float32 in [-1, 1], the range the autoencoder was trained on."""
    # np.array copies: arrays viewed from PIL images are read-only, which torch.from_numpy warns about.
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> ``[3, H, W]`` float32 tensor in [-1, 1]."""
    return uint8_to_tensor(np.asarray(img.convert("RGB"), dtype=np.uint8))


def load_caption(path: str | Path) -> str | None:
    """The stripped text of the caption file next to an image (``img.txt`` for ``img.png``), or None.

    An empty caption file is an error rather than "no caption": it is almost always an unfinished edit,
    and training on an empty prompt would silently teach the subject as the unconditional image.
    """
    caption_path = Path(path).with_suffix(CAPTION_SUFFIX)
    if not caption_path.is_file():
        return None
    try:
        text = caption_path.read_text(encoding="utf-8-sig").strip()  # -sig: Windows editors add a BOM
    except UnicodeDecodeError as exc:
        raise _error(caption_path, f"caption file is not UTF-8 text ({exc.reason})") from None
    if not text:
        raise _error(caption_path, "caption file is empty (delete it to use the prompt template)")
    return " ".join(text.split())  # one line: CLIP sees whitespace runs as one space anyway
