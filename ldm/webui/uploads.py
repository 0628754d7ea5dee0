"""Photos uploaded for training: checked exactly as training will read them, then kept in a folder of their own.

Every file goes through the training loader (``ldm.data.image_loading.load_image``) at the recipe's size, so a
photo that would stop ``main.py`` is refused here with the loader's own one-line message (naming the file as the
user called it, not the browser's temporary copy). Names are made safe, the number and size of files are
bounded, and the originals' bytes are copied unchanged into ``<data-dir>/uploads/<time>-<label>/``, a folder of
the upload's own that holds exactly the photos the page lists: the same picture twice is one photo, a photo
removed from the list leaves the folder, and a folder a run trained from is never changed (a new one is made).
"""
from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ldm.files import sha256
from ldm.webui.paths import safe_name

MAX_FILES = 30
RECOMMENDED_MIN = 5
MAX_FILE_BYTES = 50 * 2 ** 20
MAX_TOTAL_BYTES = 500 * 2 ** 20


class UploadError(ValueError):
    """An upload refused as a whole (too many files, too large); one line."""


@dataclass
class UploadResult:
    """What :func:`sync_photos` left: the folder and its photos in the order shown, and what it refused."""
    folder: Path | None = None
    photos: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> list[str]:
        return [p.name for p in self.photos]

    def report(self) -> str:
        lines = list(self.errors) + list(self.warnings)
        if self.folder is not None:
            lines.insert(0, f"{plural(len(self.photos), 'photo')} in {self.folder}")
        return "\n".join(lines)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def original_name(path: Path) -> str:
    """Gradio keeps the browser's file name as the last path component of its temporary copy."""
    return path.name


def check_photo(path: Path, shown_name: str, size: int) -> str | None:
    """The loader's one-line error for ``path`` with the temporary path replaced by ``shown_name``; None if good."""
    from ldm.data.image_loading import IMAGE_SUFFIXES, ImageError, load_image
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"{shown_name}: not a PNG, JPEG, WebP or BMP file"
    if path.stat().st_size > MAX_FILE_BYTES:
        return f"{shown_name}: larger than the upload limit of {MAX_FILE_BYTES // 2 ** 20} MB"
    try:
        load_image(path, size)
    except ImageError as e:
        return str(e).replace(str(path), shown_name, 1)
    return None


def _new_folder(parent: Path, label: str) -> Path:
    """A folder of its own, created exclusively (two uploads in the same second get ``_2``)."""
    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{safe_name(label, 'photos')}"
    for attempt in range(1, 1000):
        folder = parent / (stem if attempt == 1 else f"{stem}_{attempt}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise UploadError(f"{parent}: could not create a new upload folder")


def _unique(name: str, taken: set[str]) -> str:
    stem, suffix = os.path.splitext(name)
    candidate, n = name, 2
    while candidate.lower() in taken:
        candidate, n = f"{stem}_{n}{suffix}", n + 1
    taken.add(candidate.lower())
    return candidate


def folder_photos(folder: Path) -> list[Path]:
    """The training photos of a folder (not their masks)."""
    from ldm.data.image_loading import IMAGE_SUFFIXES, MASK_SUFFIXES
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.endswith(MASK_SUFFIXES))


def sync_photos(files: Sequence[str | os.PathLike], parent: Path, label: str, size: int,
                folder: Optional[Path] = None, frozen: Sequence[Path] = ()) -> UploadResult:
    """Make a photo folder hold exactly the good pictures of ``files``, the upload list as the page shows it
    (Gradio's temporary copies, or the folder's own files shown back), each picture once.

    Every file is checked at training ``size`` (a refused one is listed, one line each, and left out); files with
    the same bytes are one photo (named once in ``warnings``). ``folder``, the folder an earlier call made, is
    brought to that set: photos no longer listed are removed, new ones copied in under safe, unique names. A new
    folder below ``parent`` is made when there is none yet, or when ``folder`` is in ``frozen`` (a run trained from
    it: its photos stay as they were). With no good photo left, an earlier folder is emptied and ``folder`` is
    None. Raises :class:`UploadError` for a list over the count or size limits."""
    paths = [Path(f) for f in files or []]
    if len(paths) > MAX_FILES:
        raise UploadError(f"{len(paths)} files: at most {MAX_FILES} photos per subject (DreamBooth needs 5-30)")
    total = sum(p.stat().st_size for p in paths)
    if total > MAX_TOTAL_BYTES:
        raise UploadError(f"{total / 2 ** 20:.0f} MB in all: the limit is {MAX_TOTAL_BYTES // 2 ** 20} MB per upload")
    result = UploadResult()
    good: dict[str, tuple[Path, str]] = {}  # digest -> (file, the name the user gave it), in the order listed
    for path in paths:
        shown = original_name(path)
        key = sha256(path)
        if key in good:
            first = good[key][1]
            result.warnings.append(f"{shown} twice: kept once" if shown == first else
                                   f"{shown} is the same picture as {first}: kept once")
            continue
        error = check_photo(path, shown, size)
        if error:
            result.errors.append(error)
        else:
            good[key] = (path, shown)
    frozen = {Path(f).resolve() for f in frozen}
    if folder is not None and (not Path(folder).is_dir() or Path(folder).resolve() in frozen):
        folder = None
    if folder is None and not good:
        return result
    folder = Path(folder) if folder is not None else _new_folder(parent, label)
    have = {sha256(p): p for p in folder_photos(folder)}
    for key, path in have.items():
        if key not in good:
            from ldm.data.image_loading import mask_path
            path.unlink()
            path.with_suffix(".txt").unlink(missing_ok=True)  # its caption and mask go with it
            mask_path(path).unlink(missing_ok=True)
    taken = {p.name.lower() for k, p in have.items() if k in good}
    for key, (path, shown) in good.items():
        if key not in have:
            have[key] = folder / _unique(safe_name(shown, "photo"), taken)
            shutil.copyfile(path, have[key])
    result.photos = [have[key] for key in good]
    if not result.photos:
        return result
    result.folder = folder
    if len(result.photos) < RECOMMENDED_MIN:
        result.warnings.append(f"only {plural(len(result.photos), 'usable photo')}: DreamBooth works best with 5-30")
    return result


def photo_entries(folder: Optional[Path]) -> list[tuple[str, str]]:
    """The photos of a folder as the thumbnails show them: (file, its caption, or "(template)" when it has none;
    "+ mask" when it has one)."""
    from ldm.data.image_loading import mask_path
    if folder is None or not Path(folder).is_dir():
        return []
    out = []
    for photo in folder_photos(Path(folder)):
        caption = photo.with_suffix(".txt")
        text = caption.read_text(encoding="utf-8", errors="replace").strip() if caption.is_file() else "(template)"
        out.append((str(photo), text + (" + mask" if mask_path(photo).is_file() else "")))
    return out


def save_caption(photo: Path, text: str) -> Optional[Path]:
    """``photo.txt`` beside the photo, which training uses instead of the prompt template; an empty text removes
    it (the template again). One line, UTF-8, written atomically."""
    from ldm.files import atomic_write
    caption = photo.with_suffix(".txt")
    line = " ".join((text or "").split())
    if not line:
        caption.unlink(missing_ok=True)
        return None
    if len(line) > 1000:
        raise UploadError(f"caption of {photo.name}: {len(line)} characters; at most 1000")
    atomic_write(caption, lambda tmp: Path(tmp).write_text(line + "\n", encoding="utf-8"))
    return caption


def save_mask(photo: Path, mask: Optional[Path]) -> Optional[Path]:
    """``photo.mask.png`` (white = subject) from the picture the user gave, as one grey channel at the photo's
    size; None removes it. The training loader's checks apply: an unreadable file is refused in one line."""
    from PIL import Image

    from ldm.data.image_loading import ImageError, check_pixel_count, mask_path
    from ldm.images import save_png
    target = mask_path(photo)
    if mask is None:
        target.unlink(missing_ok=True)
        return None
    try:
        with Image.open(mask) as im, Image.open(photo) as ph:
            check_pixel_count(mask, *im.size)
            grey = im.convert("L")
            size = ph.size
    except ImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UploadError(f"mask for {photo.name}: not a readable picture ({' '.join(str(e).split())})") from None
    if grey.getextrema()[1] < 128:
        raise UploadError(f"mask for {photo.name}: no white (subject) pixel; white marks the subject")
    return save_png(grey.resize(size, Image.NEAREST), target)
