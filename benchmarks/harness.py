"""What every benchmark suite shares: the ``Suite`` interface, the worker that measures one cell in a fresh
process, the memory and time readings, ``--json`` and the table.

A *cell* is one row's measurement, a small dict of strings (``{"impl": "ours", "measurement": "train"}``,
``{"variant": "lora4+ckpt"}``). The parent never imports torch: it runs ``python -m benchmarks ... --_worker
CELL`` per cell in a new interpreter (or, with ``--fork``, forked from a zygote that has done the imports:
``benchmarks/zygote.py``), so each peak belongs to that one measurement, and reads back one tagged JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from ldm.util import fmt_bytes

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCHMARK_RESULT "
Cell = dict[str, str]
Result = dict[str, Any]


class Meter:
    """What a worker reads off its device: memory held now, the peak, and timings of whole calls.

    CPU: the resident set of this process (Linux /proc) and its peak RSS, which covers the whole process, model
    building included. CUDA: allocated memory and its peak since ``model_built``; timings synchronise, so they
    measure the kernels rather than their launches.
    """

    def __init__(self, device: str, warmup: int, repeat: int) -> None:
        self.device, self.warmup, self.repeat = device, warmup, repeat
        self.model_bytes: Optional[int] = None

    def now(self) -> int:
        import torch
        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak(self) -> int:
        import resource
        import torch
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes

    def sync(self) -> None:
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()

    def model_built(self) -> int:
        """Call right after building the model: restarts the CUDA peak and records the memory held now."""
        import torch
        self.sync()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.model_bytes = self.now()
        return self.model_bytes

    def time(self, fn: Callable[[], Any]) -> list[float]:
        """Seconds of each of the ``repeat`` calls of ``fn`` that follow ``warmup`` untimed ones."""
        seconds = []
        for i in range(self.warmup + self.repeat):
            self.sync()
            tic = time.perf_counter()
            fn()
            self.sync()
            if i >= self.warmup:
                seconds.append(time.perf_counter() - tic)
        return seconds

    def device_name(self) -> str:
        import torch
        return torch.cuda.get_device_name() if self.device == "cuda" else cpu_name()


class Suite(Protocol):
    """One benchmark. The parent asks it for cells and turns the workers' results into a table; a worker asks it
    to measure one cell. Suite modules import torch and the models inside their methods only."""

    help: str  # one line for ``--suite``'s help
    configs: Mapping[str, Path]  # ``--config`` names (tiny, v1) -> files; any other value is a path
    header: Sequence[str]  # the table's column names

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """The suite's own flags (added only when it is the ``--suite`` chosen, so suites may reuse names)."""

    def cells(self, args: argparse.Namespace) -> list[Cell]:
        """The cells to measure, in table order; ``SystemExit`` for a selection it does not know."""

    def run_cell(self, args: argparse.Namespace, config: Path, cell: Cell, meter: Meter) -> Result:
        """In a fresh worker: build, call ``meter.model_built()``, time with ``meter.time``; return ``seconds``
        (per the unit the table reports) and whatever else the table and the tests read."""

    def rows(self, results: list[Result]) -> list[list[str]]:
        """One table row per result (failed cells carry an ``error`` and their cell fields only)."""

    def describe(self, args: argparse.Namespace, results: list[Result]) -> str:
        """The lines above the table: machine, versions, settings, what the columns mean."""


def fill_zero_parameters_(module: Any, std: float = 0.02) -> Any:
    """Give the parameters that initialise to zero (the UNet's ``zero_module`` output layers, norm biases)
    seeded noise from torch's global generator. A pretrained model has no such layers; with them the output and
    the loss would not depend on any other layer, and no comparison of outputs or losses between cells could
    tell two networks apart."""
    import torch
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0.0, std)
    return module


def resolve_config(name: str, configs: Mapping[str, Path]) -> Path:
    """``tiny`` / ``v1`` name one of the suite's configs; anything else is a path."""
    path = configs.get(name, Path(name))
    if not path.is_file():
        raise SystemExit(f"--config: {name!r} is neither {', '.join(configs)} nor an existing file")
    return path


def run_worker(suite: Suite, args: argparse.Namespace, cell: Cell) -> Result:
    """Measure ``cell`` in this (fresh) process: the suite's numbers plus what every row reports."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    meter = Meter(args.device, args.warmup, args.repeat)
    result = suite.run_cell(args, resolve_config(args.config, suite.configs), cell, meter)
    if meter.model_bytes is None:
        raise RuntimeError("run_cell must call meter.model_built() once the model is built")
    return dict(cell, **result, median_s=statistics.median(result["seconds"]), model_bytes=meter.model_bytes,
                peak_bytes=meter.peak(), threads=torch.get_num_threads(), device_name=meter.device_name(),
                pid=os.getpid())


class Zygote:
    """``benchmarks/zygote.py``: one process with the suite's imports done, forking a fresh child per cell."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.zygote", *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(env))
        if self.answer("ready") is None:
            raise RuntimeError(f"benchmark zygote did not start (exit {self.proc.wait()})")

    def answer(self, key: str) -> Any:
        """The value of ``key`` in the zygote's next JSON line that has it (what a library prints is skipped);
        None if it exited."""
        for line in self.proc.stdout:
            if line.startswith(f'{{"{key}": '):
                return json.loads(line)[key]
        return None

    def run(self, cmd: Sequence[str]) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            self.proc.stdin.write(json.dumps({"argv": list(cmd), "out": str(out), "err": str(err)}) + "\n")
            self.proc.stdin.flush()
            code = self.answer("returncode")
            if code is None:
                raise RuntimeError(f"benchmark zygote exited ({self.proc.wait()})")
            read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
            return subprocess.CompletedProcess(cmd, code, read(out), read(err))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


_zygotes = threading.local()  # each job slot (a pool thread) has its own zygote per environment
_all_zygotes: list[Zygote] = []


def cell_process(argv: Sequence[str], cell: Cell, env: Mapping[str, str],
                 fork: bool) -> subprocess.CompletedProcess:
    """Run ``python -m benchmarks ARGV --_worker CELL`` in a new interpreter, or with ``fork`` (on Linux) forked
    from this job slot's zygote for ``env`` (made on first use)."""
    cmd = [*argv, "--_worker", json.dumps(cell)]
    if not fork or sys.platform != "linux":
        return subprocess.run([sys.executable, "-m", "benchmarks", *cmd], capture_output=True, text=True, cwd=REPO,
                              env=dict(env))
    pool = _zygotes.__dict__.setdefault("by_env", {})
    key = tuple(sorted(env.items()))
    if key not in pool:
        pool[key] = Zygote(argv, env)
        _all_zygotes.append(pool[key])
    return pool[key].run(cmd)


def process_words(args: argparse.Namespace) -> str:
    """How the table's text names a cell's process: a new interpreter, or forked after the imports (``--fork``)."""
    if getattr(args, "fork", False) and sys.platform == "linux":
        return "a process forked after the imports (shared libraries count the pages it touches)"
    return "a fresh process"


def close_zygotes() -> None:
    while _all_zygotes:
        _all_zygotes.pop().close()


def spawn(suite_name: str, cell: Cell, argv: Sequence[str], threads: int = 0,
          extra_env: Optional[Mapping[str, str]] = None, fork: bool = False) -> Result:
    """Run one cell in a process of its own (``cell_process``), so its peak RSS is its own; the result, or
    ``cell`` with an ``error``. ``extra_env``: variables the cell's program would have set (ours: what ``main.py``
    sets)."""
    print(f"[benchmark] {suite_name}: {' '.join(cell.values())} ...", file=sys.stderr, flush=True)
    # Native libraries with their own OpenMP team (bitsandbytes' CPU kernels) honour only the environment.
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(extra_env or {})}
    try:
        proc = cell_process(argv, cell, env, fork)
    except RuntimeError as e:  # the zygote could not start or died (its stderr is the caller's)
        return dict(cell, error=str(e))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    if proc.returncode < 0:  # SIGKILL with no traceback is, in practice, the kernel's out-of-memory killer
        hint = " (out of memory?)" if proc.returncode == -9 else ""
        return dict(cell, error=f"killed by signal {-proc.returncode}{hint}")
    last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]  # the exception, usually
    return dict(cell, error=f"exit {proc.returncode}: {last}")


def run_cells(cells: list[Cell], argv: Sequence[str], args: argparse.Namespace,
              cell_env: Optional[Callable[[Cell], Mapping[str, str]]] = None) -> list[Result]:
    """Every cell in its own worker, ``--jobs`` at a time. One at a time by default: cells would share the cores,
    and two v1 training steps would not fit in 24 GiB. ``--json`` is rewritten as each cell finishes, so a long
    run that is interrupted keeps the cells it measured.

    ``--rounds N`` measures every cell in N workers, the cells' order reversed every other round (A B, B A, A B),
    so that a machine that gets slower or faster during the run moves both sides of a comparison alike; a cell's
    time is then the median of all its rounds' timed calls and its peak the largest of its rounds' peaks.
    ``cell_env(cell)``: environment variables for that cell's worker (the suite's ``cell_env``, if it has one)."""
    rounds = max(1, getattr(args, "rounds", 1))
    order = [i for r in range(rounds) for i in (range(len(cells)) if r % 2 == 0 else reversed(range(len(cells))))]
    runs: list[list[Result]] = [[] for _ in cells]
    fork = getattr(args, "fork", False)
    try:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = {pool.submit(spawn, args.suite, cells[i], argv, args.threads,
                                   cell_env(cells[i]) if cell_env else None, fork): i for i in order}
            for future in as_completed(futures):
                runs[futures[future]].append(future.result())
                if args.json:
                    write_json(args, [merge_rounds(r) for r in runs if r], complete=False)
    finally:
        close_zygotes()
    return [merge_rounds(r) for r in runs if r]


def merge_rounds(runs: list[Result]) -> Result:
    """One cell's results from several workers as one: all timed calls (median), the largest peak with the
    memory after building of that same worker; an error if any round failed."""
    failed = [r for r in runs if "error" in r]
    if failed or len(runs) == 1:
        return failed[0] if failed else runs[0]
    seconds = [s for r in runs for s in r["seconds"]]
    top = max(runs, key=lambda r: r["peak_bytes"])
    return dict(top, seconds=seconds, median_s=statistics.median(seconds), rounds=len(runs),
                round_medians=[r["median_s"] for r in runs])


def write_json(args: argparse.Namespace, results: list[Result], complete: bool = True) -> None:
    """The settings and the raw results; ``complete`` is false while cells are still running."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "_worker"}
    args.json.write_text(json.dumps(dict(settings=settings, complete=complete, results=results), indent=2))


def format_table(header: Sequence[str], rows: list[list[str]], markdown: bool) -> str:
    """A Markdown table, or the same columns aligned for a terminal."""
    if markdown:
        lines = [list(header), ["---"] + ["---:"] * (len(header) - 1), *rows]
        return "\n".join("| " + " | ".join(r) + " |" for r in lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows])


def ratio(a: Optional[float], b: Optional[float]) -> str:
    """a / b to two decimals, or "-" when a cell is missing."""
    return f"{a / b:.2f}" if a and b else "-"


def fmt_peak(r: Result) -> str:
    """``peak (+over model)``; the increment is negative on CUDA when a step moved frozen parts to the CPU."""
    over = r["peak_bytes"] - r["model_bytes"]
    return f"{fmt_bytes(r['peak_bytes'])} ({'+' if over >= 0 else '-'}{fmt_bytes(abs(over))})"


def comparison_header(ours: str, peer: str) -> list[str]:
    return ["measurement", ours, peer, "time ratio", f"{ours} peak (+over model)", f"{peer} peak (+over model)",
            "peak ratio", "+over ratio"]


def comparison_rows(results: list[Result], labels: Mapping[str, str], ours: str, peer: str) -> list[list[str]]:
    """For suites that measure the same thing in two implementations (cells ``{"impl", "measurement"}``): one
    row per measurement in ``labels``' order with both times and peaks and the ratios ours / peer (below 1:
    ours is faster or leaner)."""
    by = {(r["impl"], r["measurement"]): r for r in results}
    rows = []
    for m, label in labels.items():
        pair = [by.get((ours, m), {}), by.get((peer, m), {})]
        if not any(pair):
            continue
        times = [f"{r['median_s']:.4g}" if "median_s" in r else ("failed" if "error" in r else "-") for r in pair]
        peaks = [fmt_peak(r) if "peak_bytes" in r else "-" for r in pair]
        over = [r["peak_bytes"] - r["model_bytes"] if "peak_bytes" in r else None for r in pair]
        rows.append([label, *times, ratio(*(r.get("median_s") for r in pair)), *peaks,
                     ratio(*(r.get("peak_bytes") for r in pair)), ratio(*over)])
    return rows


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def summary_line(args: argparse.Namespace, results: list[Result], packages: Sequence[str],
                 settings: Sequence[str]) -> str:
    """``machine | versions | config | the suite's settings | median of N after M warm-up``."""
    ok = [r for r in results if "device_name" in r]
    machine = f"{ok[0]['device_name']}, {ok[0]['threads']} torch threads" if ok else args.device
    versions = [f"{p} {package_version(p)}" for p in ("torch", *packages)]
    rounds = getattr(args, "rounds", 1)
    timing = (f"median of {args.repeat} after {args.warmup} warm-up" if rounds <= 1 else
              f"median of {rounds} rounds x {args.repeat} after {args.warmup} warm-up, order reversed every other "
              f"round")
    return " | ".join([machine, *versions, f"config {args.config}", *settings, timing])


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
