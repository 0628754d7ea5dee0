#!/usr/bin/env python
"""Prior preservation three ways on the toy world, side by side: class images (the paper's), the base model's own
prediction for the class prompt (no class images: ``model.params.prior_preservation=base_model``), and none. Each
way with several seeds, each run ``scripts/demo.py`` in a fresh process (the same recipe, steps and measures).

    python scripts/compare_priors.py                       # 3 ways x 3 seeds, 23 min on a 2-core CPU
    python scripts/compare_priors.py --seeds 0 1 --out outputs/priors

Writes ``OUT/priors.md``: per way the mean and standard deviation over the seeds of subject fidelity, prompt
fidelity, prior drift, the colour drift of "photo of a robot" against the base model (with the base model's own
seed-to-seed colour drift to read it against), and a run's wall time; ``OUT/priors.json``: every run's scores.
A finished run (its ``scores.json``) is kept when the comparison is run again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
WAYS = {"class_images": "class images (the paper's)", "base_model": "base model's prediction, no class images",
        "none": "no prior preservation"}
#: (column, key in a run's "after" scores)
COLUMNS = [("subject fidelity", "subject_fidelity"), ("prompt fidelity", "prompt_fidelity"),
           ("prior drift", "prior_drift"), ("colour drift of 'a robot'", "colour_drift")]


def table(runs: dict[str, list[dict]]) -> str:
    """The markdown table of ``runs`` (way -> the seeds' demo scores): mean ± sd over seeds per column."""
    def cell(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.2f} ± {sd:.2f}"
    head = ["prior from", "seeds", *(c for c, _ in COLUMNS), "base's own colour drift", "seconds per run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for way, scores in runs.items():
        after = [s["after"] for s in scores]
        seconds = statistics.fmean(s["seconds"] for s in scores)
        row = [WAYS.get(way, way), str(len(scores)), *(cell([a[key] for a in after]) for _, key in COLUMNS),
               cell([a["colour_drift_base_seeds"] for a in after]), f"{seconds:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/priors"), help="run folders, priors.md, priors.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each way (default: 0 1 2)")
    p.add_argument("--ways", nargs="+", choices=list(WAYS), default=list(WAYS), help="which priors to compare")
    p.add_argument("--max_steps", type=int, default=None, help="fine-tuning steps (default: the demo's)")
    opt = p.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    for way in opt.ways:
        for seed in opt.seeds:
            folder = opt.out / f"{way}-seed{seed}"
            done = folder / "scores.json"
            if not done.is_file():
                cmd = [sys.executable, str(REPO / "scripts" / "demo.py"), "--prior", way, "--seed", str(seed),
                       "--outdir", str(folder)] + (["--max_steps", str(opt.max_steps)] if opt.max_steps else [])
                print("$ " + " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ))
            runs.setdefault(way, []).append(json.loads(done.read_text()))
    opt.out.mkdir(parents=True, exist_ok=True)
    (opt.out / "priors.json").write_text(json.dumps(runs, indent=2) + "\n")
    text = table(runs)
    (opt.out / "priors.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
