"""Time and peak memory: our SD v1 or SDXL UNet beside diffusers' (``--suite unet``), or our DreamBooth training step
in its memory-saving and lean variants, optionally beside diffusers' train_dreambooth.py step (``--suite
dreambooth``).

    python scripts/benchmark.py                                   # tiny config, CPU, a few seconds per row
    python scripts/benchmark.py --config v1 --latent 32 --batch 1 --repeat 1 --warmup 1 --steps 2 --markdown
    python scripts/benchmark.py --config v1 --device cuda --dtype fp16 --latent 64 --batch 2 --steps 50
    python scripts/benchmark.py --config v1 --latent 32 --batch 1 --only train,train_ckpt --profile 15
    python scripts/benchmark.py --config sdxl --latent 32 --batch 1 --only forward,ddim --steps 2
    python scripts/benchmark.py --suite dreambooth --config v1 --size 512 --repeat 1 --warmup 1 --markdown
    python scripts/benchmark.py --suite dreambooth --config v1 --variants full+ckpt,full+ckpt+fused --peer diffusers
    python scripts/benchmark.py --suite dreambooth --config sdxl --size 1024 --device cuda
    python scripts/benchmark.py --suite dreambooth --help         # the flags of that suite

Every cell (a row, or one implementation's half of a row) runs in a fresh subprocess, so each peak (CPU: peak
RSS of that process; CUDA: peak allocated) belongs to that one measurement; "+x" is the increment above the
memory held right after building the model. Ratios below 1 mean the first is faster or leaner.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.harness import RESULT_TAG, Suite, format_table, resolve_config, run_cells, run_worker, write_json
from benchmarks.suite_dreambooth import DreamBoothSuite
from benchmarks.suite_unet import UNetSuite

SUITES: dict[str, Suite] = {"unet": UNetSuite(), "dreambooth": DreamBoothSuite()}
DEFAULT_SUITE = "unet"


def build_parser(suite: str = DEFAULT_SUITE) -> argparse.ArgumentParser:
    """The harness's flags and those of ``suite`` only (two suites may each have a ``--batch``)."""
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=SUITES, default=DEFAULT_SUITE,
                   help="; ".join(f"{name}: {s.help}" for name, s in SUITES.items()))
    p.add_argument("--config", default="tiny",
                   help="tiny, v1, tiny-sdxl, sdxl or a YAML path; each suite names its own files (unet: "
                        "tiny-/v1-/tiny-sdxl-/sdxl-base-inference.yaml; dreambooth: tiny-finetune.yaml, "
                        "v1-finetune_unfrozen.yaml, tiny-sdxl-finetune.yaml, sdxl-dreambooth-lora.yaml)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every cell in this many fresh processes, the order reversed every other round "
                        "(A B, B A, ...), so a drifting machine affects both sides of a comparison alike; time: "
                        "median of all rounds, peak: the largest")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default). On a shared machine use fewer threads than "
                        "idle cores: an OpenMP team with a descheduled thread can run tens of times slower")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells run at once; more than 1 skews the timings and adds up the memory (smoke tests)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table instead of aligned text")
    p.add_argument("--json", type=Path, help="also write the raw numbers to this file (rewritten as cells finish)")
    SUITES[suite].add_arguments(p.add_argument_group(f"--suite {suite}"))
    p.add_argument("--fork", action="store_true",
                   help="fork each cell's process from one that has done the suite's imports (benchmarks/zygote.py; "
                        "Linux) instead of starting a new interpreter: ~11 s less per cell; shared libraries then "
                        "count only the pages the cell touches, so peaks read lower (~70 MiB on a CPU) than the "
                        "README's fresh-interpreter figures")
    p.add_argument("--_worker", help=argparse.SUPPRESS)  # the cell (JSON) a worker measures
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``--suite`` first, then every flag against that suite's parser."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", default=DEFAULT_SUITE)
    name = pre.parse_known_args(argv)[0].suite
    return build_parser(name if name in SUITES else DEFAULT_SUITE).parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Spawn one worker per cell and print the table; torch is imported by the workers only, so the parent's
    own footprint (which a forked child briefly shares) stays small."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    suite = SUITES[args.suite]
    if args._worker:
        print(RESULT_TAG + json.dumps(run_worker(suite, args, json.loads(args._worker))), flush=True)
        return 0
    resolve_config(args.config, suite.configs)
    results = run_cells(suite.cells(args), argv, args, getattr(suite, "cell_env", None))
    print(suite.describe(args, results))
    print(format_table(suite.header, suite.rows(results), args.markdown))
    extra = suite.after_table(args, results) if hasattr(suite, "after_table") else ""
    if extra:
        print("\n" + extra)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"{' '.join(v for k, v in r.items() if k != 'error')} failed: {r['error']}")
    if args.json:
        write_json(args, results)
    return 1 if failed else 0
