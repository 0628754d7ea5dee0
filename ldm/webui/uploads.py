"""Photos uploaded for training: checked exactly as training will read them, then kept in a folder of their own.

Every file goes through the training loader (``ldm.data.image_loading.load_image``) at the recipe's size, so a
photo that would stop ``main.py`` is refused here with the loader's own one-line message (naming the file as the
user called it, not the browser's temporary copy). Names are made safe, the number and size of files are
bounded, and the originals' bytes are copied unchanged into ``<data-dir>/uploads/<time>-<label>/``, a new folder
that nothing else writes to.
"""
from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ldm.webui.paths import safe_name

MAX_FILES = 30
RECOMMENDED_MIN = 5
MAX_FILE_BYTES = 50 * 2 ** 20
MAX_TOTAL_BYTES = 500 * 2 ** 20


class UploadError(ValueError):
    """An upload refused as a whole (too many files, too large); one line."""


@dataclass
class UploadResult:
    folder: Path | None = None
    accepted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = list(self.errors) + list(self.warnings)
        if self.folder is not None:
            lines.insert(0, f"{len(self.accepted)} photos saved to {self.folder}")
        return "\n".join(lines)


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


def save_photos(files: Sequence[str | os.PathLike], parent: Path, label: str, size: int) -> UploadResult:
    """Check ``files`` (Gradio's temporary copies) at training ``size`` and copy the good ones into a new folder
    below ``parent``. Nothing is saved when no file is good; bad files are listed, one line each."""
    paths = [Path(f) for f in files or []]
    if not paths:
        raise UploadError("no photos: choose 5-30 pictures of the subject")
    if len(paths) > MAX_FILES:
        raise UploadError(f"{len(paths)} files: at most {MAX_FILES} photos per subject (DreamBooth needs 5-30)")
    total = sum(p.stat().st_size for p in paths)
    if total > MAX_TOTAL_BYTES:
        raise UploadError(f"{total / 2 ** 20:.0f} MB in all: the limit is {MAX_TOTAL_BYTES // 2 ** 20} MB per upload")
    result = UploadResult()
    good: list[tuple[Path, str]] = []
    taken: set[str] = set()
    for path in paths:
        shown = original_name(path)
        error = check_photo(path, shown, size)
        if error:
            result.errors.append(error)
        else:
            good.append((path, _unique(safe_name(shown, "photo"), taken)))
    if not good:
        return result
    folder = _new_folder(parent, label)
    for path, name in good:
        shutil.copyfile(path, folder / name)
        result.accepted.append(name)
    result.folder = folder
    if len(good) < RECOMMENDED_MIN:
        result.warnings.append(f"only {len(good)} usable photos: DreamBooth works best with 5-30")
    return result
