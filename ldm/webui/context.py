"""What every tab shares: the folders, the job manager, the pickers' choices, and how a refusal is shown."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ldm.webui.jobs import DeviceBusy, JobManager
from ldm.webui.paths import PathRefused, Roots, inside
from ldm.webui.recipes import REPO, RequestError
from ldm.webui.tools import SHIPPED, ToolError, model_files, weights_label
from ldm.webui.uploads import UploadError


def user_errors() -> tuple[type[BaseException], ...]:
    """Refusals a handler shows as one line (the scripts' and loaders' own errors included)."""
    from ldm.config import ConfigError
    from ldm.data.image_loading import ImageError
    from ldm.files import DiskFullError, OutputError
    from ldm.weights.checkpoint import CheckpointError
    return (PathRefused, RequestError, DeviceBusy, ToolError, UploadError, ImageError, ConfigError,
            CheckpointError, OutputError, DiskFullError)


def refusal(e: BaseException) -> str:
    """One line for the page."""
    return "⚠ " + " ".join(str(e).split())


@dataclass
class WebUI:
    roots: Roots
    jobs: JobManager
    cuda: bool

    @classmethod
    def create(cls, roots: Roots, env: Optional[dict[str, str]] = None) -> "WebUI":
        import torch
        return cls(roots, JobManager(roots.log_dir, REPO, env), torch.cuda.is_available())

    def label(self, path: Path) -> str:
        """A path as the pickers show it: relative to the folder it is in."""
        for root in self.roots.all:
            if path == root or root in path.parents:
                return f"{root.name}/{path.relative_to(root)}"
        return str(path)

    def weights(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """``(checkpoints, LoRA adapters)`` of the model and log folders (and the shipped models), as (label,
        path) choices: run, file, step and size (``tools.weights_label``)."""
        ckpts, loras = model_files(self.roots.model_dir, self.roots.log_dir)
        where = lambda p: f"{p.stem} (shipped)" if p in SHIPPED else self.label(p)  # noqa: E731
        return [(weights_label(p, where(p)), str(p)) for p in ckpts], [(weights_label(p, where(p)), str(p))
                                                                      for p in loras]

    @staticmethod
    def keep_choice(current: Optional[str], choices: list[tuple[str, str]]) -> Optional[str]:
        """A picker's value after its choices were refreshed: the user's choice while it is there, except the
        shipped model (the default before any training), which gives way to the newest file (a run that just
        finished); with nothing chosen, the newest."""
        shipped = bool(current) and Path(current).resolve() in SHIPPED
        if current in [v for _, v in choices] and not shipped:
            return current
        return choices[0][1] if choices else None

    def readable_weights(self, path: Optional[str], what: str) -> Path:
        """A checkpoint or adapter the browser named, if it lies in the model or log folder (or is a shipped
        model)."""
        if path and Path(path).resolve() in SHIPPED:
            return Path(path).resolve()
        resolved = inside(path, [self.roots.model_dir, self.roots.log_dir], what)
        if not resolved.is_file():
            raise PathRefused(f"{what} {self.label(resolved)}: file not found")
        return resolved
