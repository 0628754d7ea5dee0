#!/usr/bin/env python
"""Convert a checkpoint (.ckpt or .safetensors; SD v1, SDXL base or FLUX.1) into a diffusers folder.

    python scripts/convert_to_diffusers.py sks-dog.ckpt sks-dog-diffusers [--half] [--no-ema]
    python scripts/convert_to_diffusers.py flux1-dev.safetensors flux-dev-diffusers --ae ae.safetensors \
        --t5 t5xxl.safetensors --clip clip_l.safetensors --t5_tokenizer spiece.model

SD v1 gives a ``StableDiffusionPipeline`` folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/ and
model_index.json, no safety checker); SDXL a ``StableDiffusionXLPipeline`` folder (also text_encoder_2/ and
tokenizer_2/); FLUX.1 a ``FluxPipeline`` folder (transformer/ in place of unet/, T5 as text_encoder_2/). FLUX.1's
parts released as separate files are named as for sampling (``--ae``, ``--t5``, ``--clip``; none are needed for a
checkpoint of the whole model, as training saves), and its T5 tokenizer file always (``--t5_tokenizer``, unless
the config names it). Each folder loads offline:

    StableDiffusionPipeline.from_pretrained("sks-dog-diffusers", local_files_only=True)    # or ...XLPipeline, ...

The diffusers configs come from ``--config`` (the model config the checkpoint was trained with), by default the
inference config of the checkpoint's family, recognised from its keys. With full EMA weights in the file the UNet
is exported from them, as the sampling script does, unless ``--no-ema``. Needs ``pip install diffusers
transformers``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from ldm.config import ConfigError  # noqa: E402
from ldm.export.diffusers import MissingDependency, UnsupportedModel, export_diffusers  # noqa: E402
from ldm.files import DiskFullError  # noqa: E402
from ldm.sampling.cli import check_parts, load_model_config  # noqa: E402
from ldm.weights.checkpoint import CheckpointError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path, help="SD v1, SDXL base or FLUX.1 checkpoint (.ckpt or .safetensors; FLUX.1: "
                                           "the transformer, or the whole model)")
    p.add_argument("outdir", type=Path, help="folder to create (must not exist, or be empty)")
    p.add_argument("--config", type=Path, default=None,
                   help="model config the checkpoint belongs to (default: the inference config of its family, "
                        "recognised from its keys)")
    p.add_argument("--half", action="store_true", help="store the weights as float16")
    p.add_argument("--safetensors", action=argparse.BooleanOptionalAction, default=True,
                   help="write .safetensors weight files (default) or, with --no-safetensors, .bin pickles")
    p.add_argument("--no-ema", dest="prefer_ema", action="store_false",
                   help="with a full-EMA checkpoint, export the live (non-EMA) UNet weights")
    flux = p.add_argument_group("FLUX.1 (released as separate files)")
    flux.add_argument("--ae", type=str, default=None, help="the autoencoder, ae.safetensors")
    flux.add_argument("--t5", type=str, default=None, help="the T5 v1.1 XXL text encoder (transformers' layout)")
    flux.add_argument("--clip", type=str, default=None, help="the CLIP ViT-L text model (transformers' layout)")
    flux.add_argument("--t5_tokenizer", type=str, default=None,
                      help="T5's SentencePiece model, spiece.model (written to tokenizer_2/)")
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
        config = load_model_config(opt)  # --config or the checkpoint family's, with --t5_tokenizer put in
        parts = check_parts(vars(opt), config)  # --ae, --t5, --clip: the files load_model_from_config assembles
        if parts:
            OmegaConf.update(config, "model.params.component_paths", parts, force_add=True)
        out = export_diffusers(config, opt.ckpt, opt.outdir, half=opt.half, safetensors=opt.safetensors,
                               prefer_ema=opt.prefer_ema)
    except (CheckpointError, ConfigError, MissingDependency, UnsupportedModel, FileExistsError,
            DiskFullError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    pipeline = json.loads((out / "model_index.json").read_text())["_class_name"]
    print(f"Wrote {out} (weights {'float16' if opt.half else 'float32'}, "
          f"{'safetensors' if opt.safetensors else '.bin'}); load it with "
          f"{pipeline}.from_pretrained({str(out)!r}, local_files_only=True)")
    return out


if __name__ == "__main__":
    main()
