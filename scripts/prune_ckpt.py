#!/usr/bin/env python
"""Prune a SD v1 or SDXL checkpoint to what sampling needs: UNet, VAE, text encoder(s) (and for SD v1 the schedule
buffers).

    python scripts/prune_ckpt.py logs/.../last.ckpt sks-dog.ckpt --fp16           # ~2.1 GB instead of ~12 GB
    python scripts/prune_ckpt.py last.ckpt sks-dog.safetensors --fp16 --no-ema    # live weights, safetensors
    python scripts/prune_ckpt.py sdxl-last.ckpt sks-dog-xl.safetensors --fp16     # SDXL: conditioner.* kept
    python scripts/prune_ckpt.py flux-last.ckpt sks-dog-flux.safetensors --bf16   # FLUX.1: the transformer alone
    python scripts/prune_ckpt.py --report                                         # sizes of the v1 files

Optimizer, LR-scheduler, callback and loop states and ``model_ema.*`` are dropped; ``global_step`` is kept.
With full EMA weights in the file the UNet is written from them unless ``--no-ema`` (the output says which).
``--fp16``/``--bf16`` halve the floating weights; ``position_ids`` stay int64 and the 12 schedule buffers
float32 (48 KB; the samplers' coefficients come from them). The family is recognised from the keys; an SDXL
file keeps ``model.diffusion_model.*``, ``first_stage_model.*`` and ``conditioner.*`` and has no schedule buffers.
A ``.safetensors`` output carries ``modelspec.architecture`` in its metadata. ``--report`` is SD v1 only. See
``ldm/export/prune.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.export.prune import format_size_report, full_size_report, prune_file  # noqa: E402
from ldm.files import DiskFullError, OutputError  # noqa: E402
from ldm.reference import LAYOUT_DIR  # noqa: E402
from ldm.weights.checkpoint import CheckpointError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", type=Path, help="checkpoint to prune (.ckpt or .safetensors)")
    p.add_argument("output", nargs="?", type=Path,
                   help="file to write; .safetensors writes safetensors, anything else a {state_dict, global_step} "
                        "pickle")
    half = p.add_mutually_exclusive_group()
    half.add_argument("--fp16", action="store_true", help="store floating weights as float16")
    half.add_argument("--bf16", action="store_true", help="store floating weights as bfloat16")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_const", const=True, default=None,
                     help="write the EMA weights as the UNet (error if the file has none)")
    ema.add_argument("--no-ema", dest="use_ema", action="store_const", const=False,
                     help="keep the live (non-EMA) UNet weights")
    p.add_argument("--safetensors", action="store_true",
                   help="write safetensors (the output's suffix becomes .safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input)")
    p.add_argument("--whole", action="store_true",
                   help="FLUX.1: keep every part (transformer, ae, T5, CLIP) in one file instead of the transformer "
                        "alone in its released layout (what --ckpt takes beside --ae, --t5 and --clip)")
    p.add_argument("--report", action="store_true",
                   help="print the sizes of the full-size SD v1 files (full EMA, training, pruned) and exit "
                        "(SD v1 only)")
    p.add_argument("--reference", type=Path, default=LAYOUT_DIR,
                   help="folder with sd-v1-state-dict.tsv and sd-v1-state-dict-ema.tsv (for --report; default: "
                        "the copies shipped in the ldm package)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Run the script; returns the file written (``None`` for ``--report``)."""
    parser = build_parser()
    opt = parser.parse_args(argv)
    if opt.report:
        try:
            print(format_size_report(full_size_report(opt.reference)))
        except FileNotFoundError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        return None
    if opt.input is None or opt.output is None:
        parser.error("give the input and the output checkpoint (or --report)")
    out = opt.output
    if opt.safetensors and out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    dtype = torch.float16 if opt.fp16 else torch.bfloat16 if opt.bf16 else None
    try:
        result = prune_file(opt.input, out, dtype=dtype, use_ema=opt.use_ema, overwrite=opt.overwrite,
                            whole=opt.whole)
    except (CheckpointError, OutputError, DiskFullError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    stored = f"floating weights stored as {str(dtype).replace('torch.', '')}" if dtype else "dtypes unchanged"
    print(f"{result.summary()}; {stored}")
    return result.dst


if __name__ == "__main__":
    main()
