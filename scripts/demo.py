#!/usr/bin/env python
"""The whole DreamBooth pipeline on the shipped tiny model and pictures, on a CPU, with nothing to download.

    python scripts/demo.py [--outdir outputs/demo] [--max_steps 60]

1. generates class images ("photo of a robot") with the starting model into OUTDIR/class-images,
2. fine-tunes on assets/demo/subject (six drawn pictures of a toy robot) with prior preservation,
3. samples "photo of a sks robot" from the resulting last.ckpt into OUTDIR/samples.

The tiny model starts from random weights, so the pictures only show that the plumbing works; real results
need the original Stable Diffusion weights (see the README for the real commands).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: --family -> (fine-tuning config, inference config) of the toy models.
FAMILIES = {"v1": ("tiny-finetune.yaml", "tiny-inference.yaml"),
            "sdxl": ("tiny-sdxl-finetune.yaml", "tiny-sdxl-inference.yaml")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", default="outputs/demo", help="where the run, class images and samples go")
    p.add_argument("--max_steps", type=int, default=60, help="training steps")
    p.add_argument("--family", choices=sorted(FAMILIES), default="v1",
                   help="v1: the SD v1-shaped toy model; sdxl: the SDXL-shaped one (two text encoders, size "
                        "conditioning, the LoRA recipe of sdxl-dreambooth-lora.yaml)")
    opt = p.parse_args()
    out = Path(opt.outdir).resolve()
    tic = time.time()
    finetune, inference = (REPO / "configs/stable-diffusion" / name for name in FAMILIES[opt.family])
    train = [sys.executable, str(REPO / "main.py"), "--base", str(finetune),
             "-t", "-n", "demo", "--logdir", str(out / "logs"), "--data_root", str(REPO / "assets/demo/subject"),
             "--reg_data_root", str(out / "class-images"), "--num_class_images", "12", "--class_word", "robot",
             "--max_steps", str(opt.max_steps)]
    # A toy model gains nothing from more threads, and OpenMP threads that wait on a busy core are very slow.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print("$ " + " ".join(train), flush=True)
    subprocess.run(train, check=True, cwd=REPO, env=env)
    last = max((out / "logs").glob("*_demo/checkpoints/last.ckpt"), key=lambda q: q.stat().st_mtime)
    sample = [sys.executable, str(REPO / "scripts/stable_txt2img.py"), "--config", str(inference), "--ckpt", str(last),
              "--outdir",
              str(out / "samples"), "--H", "64", "--W", "64", "--ddim_steps", "20", "--scale", "3", "--n_samples", "4",
              "--n_iter", "1", "--seed", "1", "--prompt", "photo of a sks robot"]
    print("$ " + " ".join(sample), flush=True)
    subprocess.run(sample, check=True, cwd=REPO, env=env)
    print(f"\nDemo done in {time.time() - tic:.0f} s: checkpoint {last}, samples in {out / 'samples'}, "
          f"training grids in {last.parent.parent / 'images'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
