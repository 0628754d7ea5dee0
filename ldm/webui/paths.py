"""The folders the web UI may touch, and the one check every browser-named path goes through.

A browser can send any string in any field, so no path it names is trusted: each is resolved (links and ``..``
followed) and must lie inside one of the folders the command line gave (``--model-dir``, ``--log-dir``,
``--data-dir``), or it is refused with one line. Names of new files and folders are reduced to a safe set of
characters first, so an upload called ``../../.bashrc`` becomes ``bashrc`` inside its folder.
"""
from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

#: Checkpoint and adapter files the pickers list.
WEIGHT_SUFFIXES = (".ckpt", ".safetensors")
#: How deep the pickers look below a folder (a model folder may hold a few levels of sub-folders, not a disk).
MAX_DEPTH = 4
MAX_NAME = 80


class PathRefused(ValueError):
    """A path outside the allowed folders, or a name that cannot be made safe; the message is one line."""


@dataclass(frozen=True)
class Roots:
    """The three folders of a web UI session, resolved once (``resolve`` follows links)."""
    model_dir: Path
    log_dir: Path
    data_dir: Path

    @classmethod
    def create(cls, model_dir: str | Path, log_dir: str | Path, data_dir: str | Path) -> "Roots":
        folders = [Path(d).expanduser().resolve() for d in (model_dir, log_dir, data_dir)]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        return cls(*folders)

    @property
    def all(self) -> tuple[Path, Path, Path]:
        return self.model_dir, self.log_dir, self.data_dir

    @property
    def uploads(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def class_images(self) -> Path:
        return self.data_dir / "class-images"

    @property
    def outputs(self) -> Path:
        return self.data_dir / "outputs"


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def inside(path: str | os.PathLike, roots: Iterable[Path], what: str) -> Path:
    """``path`` resolved, if it lies inside one of ``roots``; otherwise :class:`PathRefused` naming ``what``."""
    text = os.fspath(path) if path is not None else ""
    if not text or "\0" in text:
        raise PathRefused(f"{what}: none chosen" if not text else f"{what}: not a valid path")
    roots = list(roots)
    resolved = Path(text).expanduser().resolve()
    if not any(_within(resolved, root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise PathRefused(f"{what} {text}: outside the folders this UI may use ({allowed})")
    return resolved


def safe_name(name: str, fallback: str = "file") -> str:
    """A file or folder name made of letters, digits, ``.``, ``-`` and ``_`` only: no separators, no leading dot
    (hidden files, ``..``), at most ``MAX_NAME`` characters, the suffix kept."""
    text = unicodedata.normalize("NFKD", os.path.basename(str(name).replace("\\", "/")))
    text = text.encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or fallback
    stem, dot, suffix = text.rpartition(".")
    if dot and stem and len(suffix) <= 10:
        return stem[: MAX_NAME - len(suffix) - 1].rstrip("._-") + "." + suffix
    return text[:MAX_NAME]


def _walk(folder: Path, depth: int = 0) -> Iterator[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and depth < MAX_DEPTH:
            yield from _walk(entry, depth + 1)
        elif entry.is_file():
            yield entry


def weight_files(*folders: Path) -> list[Path]:
    """Every ``.ckpt`` / ``.safetensors`` file below ``folders`` (newest first)."""
    found = [p for folder in folders for p in _walk(folder) if p.suffix in WEIGHT_SUFFIXES]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def image_folders(root: Path) -> list[Path]:
    """Folders below ``root`` that directly hold at least one image (the photo-folder picker)."""
    from ldm.data.image_loading import IMAGE_SUFFIXES
    folders = {p.parent for p in _walk(root) if p.suffix.lower() in IMAGE_SUFFIXES}
    return sorted(folders)
