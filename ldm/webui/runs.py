"""Reading runs back from the log folder: their state, progress, losses and validation grids.

A run folder is any ``<log-dir>/<name>/`` with a ``configs/`` folder (what ``main.py`` writes). Runs the UI
started are matched to their job records, so their state comes from the process; runs started from the command
line are judged from their files: a ``progress.json`` updated in the last minute means running, a finished step
count means finished, a checkpoint means stopped (resumable).
"""
from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ldm.webui.jobs import JobManager, JobRecord
from ldm.webui.progress import PROGRESS_FILE

#: A command-line run whose progress file is older than this is taken to have ended.
STALE_S = 60.0


@dataclass
class Progress:
    """Where a run is: its phase (``class images`` before the run folder exists, ``preparing`` while the model
    loads, ``training``), how far (images or steps), at what speed."""
    step: Optional[int] = None
    max_steps: Optional[int] = None
    steps_per_s: Optional[float] = None
    phase: str = "training"
    then_s: Optional[float] = None  # the training after the class images, estimated (benchmarks/measured.json)

    @property
    def eta_s(self) -> Optional[float]:
        if self.step is None or not self.max_steps or not self.steps_per_s:
            return None
        return max(0.0, (self.max_steps - self.step) / self.steps_per_s)

    def text(self, running: bool = True) -> str:
        """One line; the time left only while the run runs (a stopped run has no time left)."""
        if self.phase == "preparing" or (self.step is None and self.phase == "training"):
            return "preparing: loading the model" if running else "no step yet"
        unit = "image" if self.phase == "class images" else "step"
        parts = [(f"class images {self.step}" if unit == "image" else f"step {self.step}")
                 + (f" / {self.max_steps}" if self.max_steps else "")]
        if self.steps_per_s:
            speed = self.steps_per_s
            parts.append(f"{speed:.2f} {unit}s/s" if speed >= 1 else f"{1 / speed:.1f} s/{unit}")
        if running and self.eta_s is not None and self.step < (self.max_steps or 0):
            then = "" if unit != "image" else ", then training" + (
                f" (about {format_seconds(self.then_s)}, estimated)" if self.then_s else "")
            parts.append(f"{format_seconds(self.eta_s)} left{then}")
        return " · ".join(parts)


#: Lines of a run's output that are not the project's: Lightning's banners, model table and tips, progress bars
#: (the page draws its own), warnings with their source lines, blank lines.
_NOISE = re.compile("|".join([
    r"^(GPU|TPU|HPU|IPU) available", r"💡|litlogger|\bTip:", r"^[┏┃┡│└━┗┌├╭╰|]", r"^\s*\|",
    r"^(Trainable|Non-trainable|Total) (params|estimated model params|FLOPs)", r"^Modules in (train|eval) mode",
    r"^(LOCAL_RANK|Seed set to|`Trainer\.fit` stopped|You are using a CUDA device)", r"\d+%\|", r"^Epoch \d+:", r"\d(it/s|s/it)\b",
    r"(Warning|warn)\b.*:|^\s+(warnings\.warn|rank_zero_warn|warn)\(", r"/site-packages/", r"^\s*$",
    r"^(DDIM|PLMS) Sampler|^Data shape for", r"^Traceback \(most recent call last\)|^\s{2,}\S",
]))


def project_lines(output: str, repo: Path) -> list[str]:
    """The project's own lines of a run's output, in order: what main.py says (run folder, class images,
    checkpoints, the end, a one-line error), without what Lightning and Python add around it (:data:`_NOISE`);
    paths inside the repository are shown relative to it."""
    prefix = str(repo).rstrip("/") + "/"
    return [line.replace(prefix, "") for line in output.splitlines() if not _NOISE.search(line)]


def output_progress(output: str) -> Progress:
    """The phase of a run that has no run folder yet, from its output: the last class-image progress line
    (``ldm.training.class_images.CLASS_PROGRESS``), else preparing."""
    from ldm.training.class_images import CLASS_PROGRESS
    found = re.findall(CLASS_PROGRESS, output, re.M)
    if not found:
        return Progress(phase="preparing")
    done, total, seconds = found[-1]
    rate = 1 / float(seconds) if seconds and float(seconds) > 0 else None
    return Progress(int(done), int(total), rate, "class images")


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}" if m else f"{s} s"


@dataclass
class RunView:
    key: str  # "job:<id>" for a run started from the page (its latest start), else the run folder's name
    name: str
    state: str  # running / stopped / finished / failed
    folder: Optional[Path]
    record: Optional[JobRecord]

    @property
    def label(self) -> str:
        return f"{self.folder.name if self.folder else self.name} ({self.state})"


def saved_config_value(folder: Path, key: str) -> Optional[object]:
    from omegaconf import OmegaConf
    saved = sorted((folder / "configs").glob("*-project.yaml"))
    if not saved:
        return None
    try:
        return OmegaConf.select(OmegaConf.load(saved[-1]), key, default=None)
    except Exception:  # noqa: BLE001 - a damaged config file only costs the step limit in the view
        return None


def read_losses(folder: Path) -> list[dict[str, float]]:
    """Rows of ``step``, ``loss_subject``, ``loss_prior`` from ``csv/metrics.csv`` (and the ``csv-resumed-*``
    files of resumed runs), in step order; a term a run does not log is left out of its rows."""
    rows: dict[int, dict[str, float]] = {}
    for path in sorted(folder.glob("csv*/metrics.csv")):
        try:
            with open(path, newline="") as f:
                for line in csv.DictReader(f):
                    values = {k.split("/")[-1]: float(v) for k, v in line.items()
                              if k in ("train/loss_subject", "train/loss_prior") and v not in (None, "")}
                    if values and line.get("step") not in (None, ""):
                        rows.setdefault(int(float(line["step"])), {}).update(values)
        except (OSError, ValueError, csv.Error):
            continue
    return [{"step": step, **values} for step, values in sorted(rows.items())]


def read_progress(folder: Path) -> Progress:
    """From ``progress.json`` (runs the UI started), else the last logged step of the CSV metrics."""
    try:
        data = json.loads((folder / PROGRESS_FILE).read_text())
        return Progress(int(data["step"]), int(data["max_steps"]) if data.get("max_steps", -1) > 0 else None,
                        data.get("steps_per_s"))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    losses = read_losses(folder)
    max_steps = saved_config_value(folder, "lightning.trainer.max_steps")
    return Progress(losses[-1]["step"] + 1 if losses else None, int(max_steps) if max_steps else None)


def grids(folder: Path) -> list[Path]:
    return sorted((folder / "images" / "train").glob("step-*.png"))


def checkpoints(folder: Path) -> list[Path]:
    return sorted((folder / "checkpoints").glob("*.ckpt"))


def external_state(folder: Path) -> str:
    """The state of a run the UI did not start, from its files."""
    progress_file = folder / PROGRESS_FILE
    if progress_file.exists() and time.time() - progress_file.stat().st_mtime < STALE_S:
        return "running"
    progress = read_progress(folder)
    if progress.step is not None and progress.max_steps and progress.step >= progress.max_steps:
        return "finished"
    return "stopped" if checkpoints(folder) else "failed"


def list_runs(jobs: JobManager) -> list[RunView]:
    """Every run of the log folder, newest first: folders with their latest job record, and jobs that have not
    made a folder (yet, or ever: a run that failed before training)."""
    by_folder: dict[Path, JobRecord] = {}
    pending: list[RunView] = []
    for record in jobs.records():
        folder = jobs.run_folder(record)
        if folder is None:
            pending.append(RunView(f"job:{record.id}", record.name, jobs.state(record), None, record))
        else:
            by_folder[folder.resolve()] = record  # records are in start order: the latest wins
    views = []
    for folder in sorted(p for p in jobs.log_dir.iterdir() if (p / "configs").is_dir()):
        record = by_folder.get(folder.resolve())
        state = jobs.state(record) if record else external_state(folder)
        # A page's run keeps its job key when main.py makes its folder, so the picker's value never changes under
        # the user (a refresh answered late would otherwise put the renamed run back over a newer choice).
        key = f"job:{record.id}" if record else folder.name
        views.append(RunView(key, record.name if record else folder.name, state, folder, record))
    started = {v.key: (v.record.started if v.record else v.folder.stat().st_mtime) for v in views + pending}
    return sorted(views + pending, key=lambda v: started[v.key], reverse=True)
