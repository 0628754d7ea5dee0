#!/usr/bin/env python
"""Train the toy world's evaluator (ldm/eval/toy.py) and save it as safetensors, with its accuracy on fresh renders.

    python scripts/train_toy_classifier.py --out assets/toy/classifier.safetensors --seed 0 --steps 1500

The weights are a deterministic function of --seed and --steps (one thread, same torch build).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.eval.toy import render_accuracy, save_classifier, train_toy_classifier  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval_seed", type=int, default=10_000, help="seed of the fresh renders it is scored on")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model = train_toy_classifier(seed=args.seed, steps=args.steps, log_every=max(1, args.steps // 10))
    seconds = time.perf_counter() - start
    report = {"train_seconds": round(seconds, 1), **render_accuracy(model, seed=args.eval_seed),
              **{f"blur1.5_{k}": v for k, v in render_accuracy(model, seed=args.eval_seed, blur=1.5).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model, args.out, seed=args.seed, steps=args.steps, **report)
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
