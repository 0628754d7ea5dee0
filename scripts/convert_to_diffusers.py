#!/usr/bin/env python
"""Convert a Stable Diffusion checkpoint (.ckpt or .safetensors; SD v1 or SDXL base) into a diffusers folder.

    python scripts/convert_to_diffusers.py sks-dog.ckpt sks-dog-diffusers [--half] [--no-ema]

SD v1 gives a ``StableDiffusionPipeline`` folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/ and
model_index.json, no safety checker); SDXL a ``StableDiffusionXLPipeline`` folder (also text_encoder_2/ and
tokenizer_2/). Either loads offline:

    StableDiffusionPipeline.from_pretrained("sks-dog-diffusers", local_files_only=True)    # or ...XLPipeline

The diffusers configs come from ``--config`` (the model config the checkpoint was trained with), by default the
inference config of the checkpoint's family, recognised from its keys. With full EMA weights in the file the UNet
is exported from them, as the sampling script does, unless ``--no-ema``. Needs ``pip install diffusers
transformers``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from ldm.config import ConfigError  # noqa: E402
from ldm.export.diffusers import MissingDependency, UnsupportedModel, export_diffusers  # noqa: E402
from ldm.families import config_family  # noqa: E402
from ldm.files import DiskFullError  # noqa: E402
from ldm.sampling.cli import config_for_checkpoint  # noqa: E402
from ldm.weights.checkpoint import CheckpointError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path, help="SD v1 or SDXL base checkpoint (.ckpt or .safetensors)")
    p.add_argument("outdir", type=Path, help="folder to create (must not exist, or be empty)")
    p.add_argument("--config", type=Path, default=None,
                   help="model config the checkpoint belongs to (default: the inference config of its family, "
                        "recognised from its keys)")
    p.add_argument("--half", action="store_true", help="store the weights as float16")
    p.add_argument("--safetensors", action=argparse.BooleanOptionalAction, default=True,
                   help="write .safetensors weight files (default) or, with --no-safetensors, .bin pickles")
    p.add_argument("--no-ema", dest="prefer_ema", action="store_false",
                   help="with a full-EMA checkpoint, export the live (non-EMA) UNet weights")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run the script; returns the folder written."""
    parser = build_parser()
    opt = parser.parse_args(argv)
    if opt.config is not None and not opt.config.is_file():
        parser.error(f"--config {opt.config}: file not found")
    if opt.config is None and not opt.ckpt.exists():
        parser.exit(2, f"{parser.prog}: error: {opt.ckpt}: checkpoint file not found\n")
    try:
        config = OmegaConf.load(opt.config if opt.config is not None else config_for_checkpoint(opt.ckpt))
        out = export_diffusers(config, opt.ckpt, opt.outdir, half=opt.half, safetensors=opt.safetensors,
                               prefer_ema=opt.prefer_ema)
    except (CheckpointError, ConfigError, MissingDependency, UnsupportedModel, FileExistsError,
            DiskFullError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    pipeline = "StableDiffusionXLPipeline" if config_family(config) == "sdxl-base" else "StableDiffusionPipeline"
    print(f"Wrote {out} (weights {'float16' if opt.half else 'float32'}, "
          f"{'safetensors' if opt.safetensors else '.bin'}); load it with "
          f"{pipeline}.from_pretrained({str(out)!r}, local_files_only=True)")
    return out


if __name__ == "__main__":
    main()
