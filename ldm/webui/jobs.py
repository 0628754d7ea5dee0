"""Training runs as child processes, one job on the device at a time.

``main.py`` runs in its own process and session: an error, an out-of-memory kill or a segfault there ends that
process only, and the page shows the last lines it wrote. Each start leaves a record in
``<log-dir>/.webui-jobs/<id>.json`` (command, pid, run folder, exit code) beside the process output
``<id>.log``, so a reloaded page or a restarted UI finds every run again; a run whose exit the UI did not see
(it was restarted meanwhile) is judged from the last lines of its output. Stop sends SIGTERM, on which
``main.py`` writes ``last.ckpt`` and exits with 143; Resume runs ``main.py -r <run folder>``.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ldm.files import atomic_write

JOBS_DIR = ".webui-jobs"
LOG_TAIL_BYTES = 64 * 1024
LOG_HEAD_BYTES = 2 ** 20  # main.py names its run folder early, after class images and the model are ready
#: Exit codes of a run stopped on purpose: SIGTERM (main.py's 143, or -15 when killed before training began)
#: and Ctrl-C.
STOPPED_CODES = {143, -signal.SIGTERM, 130, -signal.SIGINT}
_RUN_FOLDER = re.compile(r"^Run folder: (.+?) \(config saved to ", re.M)


class DeviceBusy(RuntimeError):
    """A second job for the device while one runs; the message says which one."""


@dataclass
class JobRecord:
    id: str
    name: str
    argv: list[str]
    recipe: str = ""
    inference_config: Optional[str] = None
    started: float = field(default_factory=time.time)
    pid: Optional[int] = None
    run_folder: Optional[str] = None
    returncode: Optional[int] = None
    settings: Optional[dict] = None  # the Train tab's fields it was started with (shown again, read-only)
    queued: bool = False  # waiting for the device: started when the jobs before it have ended

    def save(self, folder: Path) -> None:
        atomic_write(folder / f"{self.id}.json", lambda tmp: Path(tmp).write_text(json.dumps(asdict(self), indent=1)))

    @classmethod
    def load(cls, path: Path) -> Optional["JobRecord"]:
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (OSError, ValueError, TypeError, KeyError):
            return None


def read_head(path: Path, limit: int = LOG_HEAD_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def read_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The end of a process output file, progress-bar carriage returns resolved to their last state."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(line.rsplit("\r", 1)[-1] if line.rstrip("\r") else "" for line in data.split("\n"))


def outcome_from_output(text: str) -> str:
    """finished / stopped / failed, judged from a run's last output (when its exit code was not seen)."""
    if re.search(r"^Done: \d+ steps", text, re.M):
        return "finished"
    if "Stopped by SIGTERM" in text or re.search(r"^Interrupted at step", text, re.M):
        return "stopped"
    return "failed"


def _pid_runs(pid: Optional[int], marker: str) -> bool:
    """Is ``pid`` alive and still our ``main.py`` (not a recycled pid)? ``marker`` must be in its command line."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            parts = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        return marker.encode() in parts
    return True  # no /proc (macOS): a live pid is the best evidence there is


class JobManager:
    """Starts, stops and finds the training processes of one log folder."""

    def __init__(self, log_dir: Path, cwd: Path, env: Optional[dict[str, str]] = None):
        self.log_dir, self.cwd, self.env = log_dir, cwd, env
        self.folder = log_dir / JOBS_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._records_lock = threading.Lock()
        self._in_process: Optional[str] = None  # what holds the device inside the UI (sampling), if anything
        self.start_next()  # a restarted UI carries on with the queue

    # ---- records -----------------------------------------------------------------------------------------------
    def records(self) -> list[JobRecord]:
        found = (JobRecord.load(p) for p in sorted(self.folder.glob("*.json")))
        return sorted((r for r in found if r is not None), key=lambda r: r.started)

    def output(self, record: JobRecord) -> str:
        return read_tail(self.folder / f"{record.id}.log")

    def run_folder(self, record: JobRecord) -> Optional[Path]:
        """The run folder of ``record``, learnt from main.py's "Run folder:" line once it has printed it."""
        if record.run_folder is None:
            match = _RUN_FOLDER.search(read_head(self.folder / f"{record.id}.log"))
            if match:
                record.run_folder = match.group(1)
                self._update(record, run_folder=record.run_folder)
        return Path(record.run_folder) if record.run_folder else None

    def _returncode(self, record: JobRecord) -> Optional[int]:
        child = self._children.get(record.id)
        return child.poll() if child is not None else record.returncode

    def is_running(self, record: JobRecord) -> bool:
        if record.id in self._children:
            return self._children[record.id].poll() is None
        marker = record.argv[1] if len(record.argv) > 1 else "main.py"
        return record.returncode is None and _pid_runs(record.pid, marker)

    def state(self, record: JobRecord) -> str:
        """queued / running / stopped / finished / failed."""
        if record.queued:
            return "queued"
        if self.is_running(record):
            return "running"
        code = self._returncode(record)
        if code is None:
            return outcome_from_output(self.output(record))
        return "finished" if code == 0 else "stopped" if code in STOPPED_CODES else "failed"

    def running(self) -> Optional[JobRecord]:
        return next((r for r in reversed(self.records()) if self.is_running(r)), None)

    # ---- the device ----------------------------------------------------------------------------------------------
    def busy(self) -> Optional[str]:
        """What occupies the device now, in words, or None."""
        record = self.running()
        if record is not None:
            return f"training run {record.name} is running: stop it or wait until it ends"
        if self._in_process:
            return f"{self._in_process} is running: wait until it ends"
        return None

    def check_free(self) -> None:
        """:class:`DeviceBusy` when something holds the device now."""
        reason = self.busy()
        if reason:
            raise DeviceBusy(f"The device is busy: {reason}.")

    @contextmanager
    def device(self, what: str) -> Iterator[None]:
        """Hold the device for in-UI work (sampling); :class:`DeviceBusy` if anything else holds it."""
        with self._lock:
            reason = self.busy()
            if reason:
                raise DeviceBusy(f"The device is busy: {reason}.")
            self._in_process = what
        try:
            yield
        finally:
            self._in_process = None
        self.start_next()

    # ---- processes ---------------------------------------------------------------------------------------------
    def start(self, argv: list[str], name: str, recipe: str = "", inference_config: Optional[str] = None,
              run_folder: Optional[Path] = None, settings: Optional[dict] = None) -> JobRecord:
        """Start ``argv`` (a main.py command line) in its own session, output to ``<id>.log``."""
        with self._lock:
            reason = self.busy() or (f"{len(self.queue())} queued job(s) go first" if self.queue() else None)
            if reason:
                raise DeviceBusy(f"Not started: {reason}.")
            record = self._new(argv, name, recipe, inference_config, run_folder, settings)
            return self._launch(record)

    def enqueue(self, argv: list[str], name: str, recipe: str = "", inference_config: Optional[str] = None,
                run_folder: Optional[Path] = None, settings: Optional[dict] = None) -> JobRecord:
        """Queue ``argv``: it starts when the device is free and the jobs queued before it have started and
        ended (one job on the device at a time); at once when nothing runs."""
        with self._lock:
            record = self._new(argv, name, recipe, inference_config, run_folder, settings)
            record.queued = True
            record.save(self.folder)
        self.start_next()
        return self.load(record.id) or record

    def queue(self) -> list[JobRecord]:
        """The queued jobs, in the order they will start."""
        return [r for r in self.records() if r.queued]

    def dequeue(self, record: JobRecord) -> str:
        """Take a job that has not started out of the queue (its record is removed)."""
        with self._lock:
            saved = self.load(record.id)
            if saved is None or not saved.queued:
                return f"{record.name} is not queued."
            (self.folder / f"{record.id}.json").unlink(missing_ok=True)
        return f"Removed {record.name} from the queue."

    def start_next(self) -> Optional[JobRecord]:
        """Start the first queued job if the device is free; the job that ends starts the next (and a restarted
        UI, which calls this when it starts)."""
        with self._lock:
            waiting = self.queue()
            if not waiting or self.busy():
                return None
            record = waiting[0]
            record.queued, record.started = False, time.time()
            return self._launch(record)

    def load(self, record_id: str) -> Optional[JobRecord]:
        return JobRecord.load(self.folder / f"{record_id}.json")

    def _new(self, argv: list[str], name: str, recipe: str, inference_config: Optional[str],
             run_folder: Optional[Path], settings: Optional[dict]) -> JobRecord:
        return JobRecord(id=f"{datetime.datetime.now():%Y%m%d-%H%M%S-%f}", name=name, argv=argv, recipe=recipe,
                         inference_config=inference_config, run_folder=str(run_folder) if run_folder else None,
                         settings=settings)

    def _launch(self, record: JobRecord) -> JobRecord:
        """Run a record's command (the caller holds the lock and has checked the device is free)."""
        log = open(self.folder / f"{record.id}.log", "wb")
        try:
            child = subprocess.Popen(record.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        record.pid = child.pid
        record.save(self.folder)
        self._children[record.id] = child
        threading.Thread(target=self._wait, args=(record, child), daemon=True).start()
        return record

    def _wait(self, record: JobRecord, child: subprocess.Popen) -> None:
        record.returncode = child.wait()
        self._update(record, returncode=record.returncode)
        self.run_folder(record)
        self.start_next()

    def _update(self, record: JobRecord, **changes: object) -> None:
        """Change fields of the saved record (read again first: the page and the waiting thread both write)."""
        with self._records_lock:
            saved = JobRecord.load(self.folder / f"{record.id}.json") or record
            for key, value in changes.items():
                setattr(saved, key, value)
            saved.save(self.folder)

    def stop(self, record: JobRecord) -> str:
        """SIGTERM: main.py saves ``last.ckpt`` and exits (143)."""
        if not self.is_running(record):
            return f"{record.name} is not running."
        os.kill(record.pid, signal.SIGTERM)
        return f"Stopping {record.name}: it saves last.ckpt, then exits."
