"""Saved Train-tab settings ("presets"): a recipe with all its fields, as JSON in ``<data-dir>/presets/``, with the
``main.py`` command line it makes beside them, so a preset is also the recipe written down for a terminal."""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ldm.files import atomic_write
from ldm.webui.paths import Roots, safe_name
from ldm.webui.recipes import RequestError, TrainRequest


def folder(roots: Roots) -> Path:
    return roots.data_dir / "presets"


def names(roots: Roots) -> list[str]:
    return sorted(p.stem for p in folder(roots).glob("*.json")) if folder(roots).is_dir() else []


def save(roots: Roots, name: str, request: TrainRequest, command: str) -> Path:
    """Write the preset ``name`` (made safe; an existing one of that name is replaced, as a user re-saving
    expects); returns its file."""
    if not name or not name.strip():
        raise RequestError("preset name: empty")
    path = folder(roots) / f"{safe_name(name.strip(), 'preset').removesuffix('.json')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"settings": asdict(request), "command": command}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(body, indent=1) + "\n"))
    return path


def load(roots: Roots, name: str) -> dict[str, Any]:
    """The settings of preset ``name``: TrainRequest's fields only, each of the field's type (a hand-edited file
    with another key or type is refused in one line)."""
    path = folder(roots) / f"{safe_name(name or '', 'preset')}.json"
    if not path.is_file():
        raise RequestError(f"preset {name!r}: not found in {folder(roots)}")
    try:
        settings = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RequestError(f"preset {path.name}: not a preset file ({e})") from None
    known = {f.name: f for f in fields(TrainRequest)}
    if not isinstance(settings, dict) or set(settings) - set(known):
        raise RequestError(f"preset {path.name}: unknown settings {sorted(set(settings) - set(known))}")
    for key, value in settings.items():
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise RequestError(f"preset {path.name}: {key} is a {type(value).__name__}")
    return settings
