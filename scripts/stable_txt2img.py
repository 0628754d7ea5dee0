#!/usr/bin/env python
"""Text-to-image with a Stable Diffusion v1 checkpoint (the original ``scripts/stable_txt2img.py`` interface).

    python scripts/stable_txt2img.py --ckpt sd-v1-4.ckpt --prompt "photo of a sks dog" \
        --ddim_steps 50 --scale 10 --n_samples 8 --seed 1

Writes ``OUTDIR/samples/NNNNN.png`` (one per image) and ``OUTDIR/grid-NNNN.png`` (one per run), never overwriting
earlier files; each PNG carries prompt, seed, steps, scale, sampler and checkpoint in its text chunks.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.checkpoint import CheckpointError, load_model_from_config, read_checkpoint  # noqa: E402
from ldm.lora import load_lora, parse_lora_spec  # noqa: E402
from ldm.images import make_grid, next_index, save_png, to_pil  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.models.diffusion.plms import PLMSSampler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                   help="the prompt to render")
    p.add_argument("--negative_prompt", type=str, default="",
                   help="what to steer away from: replaces the empty unconditional prompt of guidance")
    p.add_argument("--outdir", type=str, nargs="?", default="outputs/txt2img-samples", help="dir to write results to")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of ddim sampling steps")
    p.add_argument("--plms", action="store_true", help="use plms sampling")
    p.add_argument("--fixed_code", action="store_true",
                   help="use the same starting code for every iteration (n_iter)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="ddim eta (eta=0.0 is deterministic sampling)")
    p.add_argument("--n_iter", type=int, default=2, help="sample this often")
    p.add_argument("--H", type=int, default=512, help="image height, in pixel space")
    p.add_argument("--W", type=int, default=512, help="image width, in pixel space")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor")
    p.add_argument("--n_samples", type=int, default=3, help="how many samples to produce for each given prompt "
                   "(the batch size)")
    p.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    p.add_argument("--scale", type=float, default=7.5,
                   help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))")
    p.add_argument("--from-file", type=str, help="if specified, load prompts from this file, one per line")
    p.add_argument("--config", type=str, default=str(REPO / "configs/stable-diffusion/v1-inference.yaml"),
                   help="path to config which constructs model")
    p.add_argument("--ckpt", type=str, default="models/ldm/stable-diffusion-v1/model.ckpt",
                   help="path to checkpoint of model (.ckpt or .safetensors)")
    p.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    p.add_argument("--precision", type=str, choices=["full", "autocast", "fp16", "bf16"], default="autocast",
                   help="evaluate at this precision on CUDA (autocast = fp16); CPU always runs in full fp32")
    p.add_argument("--device", type=str, default=None, help="cuda, cuda:1, cpu... (default: cuda if available)")
    p.add_argument("--no_ema", action="store_true", help="with a full-EMA checkpoint, sample the non-EMA weights")
    p.add_argument("--lora", type=str, default=None, metavar="FILE[:SCALE]",
                   help="apply a LoRA adapter (.safetensors, kohya layout) with an optional strength, e.g. a.safetensors:0.8"
                        " (to combine several, bake them in with scripts/merge_lora.py)")
    return p


def check_args(p: argparse.ArgumentParser, opt: argparse.Namespace) -> list[list[str]]:
    """Validate flags up front (one clear line each) and return the prompt batches."""
    for flag in ("H", "W"):
        value = getattr(opt, flag)
        if value <= 0 or value % 8 or value % opt.f:
            p.error(f"--{flag} {value} must be a positive multiple of 8 and of --f {opt.f}")
    for flag in ("n_samples", "n_iter", "ddim_steps"):
        if getattr(opt, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if opt.plms and opt.ddim_eta != 0:
        p.error("--plms needs --ddim_eta 0")
    if not Path(opt.config).is_file():
        p.error(f"--config {opt.config}: file not found")
    if not Path(opt.ckpt).exists():
        p.error(f"--ckpt {opt.ckpt}: file not found")
    if opt.lora and not Path(parse_lora_spec(opt.lora)[0]).is_file():
        p.error(f"--lora {parse_lora_spec(opt.lora)[0]}: file not found")
    if opt.from_file:
        path = Path(opt.from_file)
        if not path.is_file():
            p.error(f"--from-file {path}: file not found")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            p.error(f"--from-file {path}: contains no prompts")
        return [prompts[i:i + opt.n_samples] for i in range(0, len(prompts), opt.n_samples)]
    if not opt.prompt:
        p.error("--prompt is empty")
    return [opt.n_samples * [opt.prompt]]


def precision_context(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "full":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """Run the script; returns the paths written (samples, then the grid)."""
    parser = build_parser()
    opt = parser.parse_args(argv)
    batches = check_args(parser, opt)
    device = torch.device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    config = OmegaConf.load(opt.config)
    try:
        model = load_model_from_config(config, opt.ckpt, prefer_ema=not opt.no_ema).to(device)
        if opt.lora:
            path, scale = parse_lora_spec(opt.lora)
            try:
                n = load_lora(model, read_checkpoint(path)[0], scale)
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from None
            print(f"Applied LoRA {path} ({n} modules, strength {scale})")
    except CheckpointError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    sampler = (PLMSSampler if opt.plms else DDIMSampler)(model)
    sampler_name = "plms" if opt.plms else "ddim"

    outpath = Path(opt.outdir)
    sample_path = outpath / "samples"
    sample_path.mkdir(parents=True, exist_ok=True)
    base_count = next_index(sample_path)
    grid_count = next_index(outpath, r"^grid-(\d+)\.png$")
    shape = [opt.C, opt.H // opt.f, opt.W // opt.f]
    # One generator for the whole run, seeded once: on CUDA it yields the same stream as the original script's
    # seed_everything + torch.randn, and it does not depend on anything else drawing random numbers.
    generator = torch.Generator(device).manual_seed(opt.seed)
    start_code = torch.randn([opt.n_samples, *shape], generator=generator, device=device) if opt.fixed_code else None
    written: list[Path] = []
    all_samples = []
    tic = time.time()
    with torch.no_grad(), precision_context(device, opt.precision), model.ema_scope():
        for n in range(opt.n_iter):
            for prompts in batches:
                uc = None
                if opt.scale != 1.0:
                    uc = model.get_learned_conditioning(len(prompts) * [opt.negative_prompt])
                c = model.get_learned_conditioning(prompts)
                samples, _ = sampler.sample(S=opt.ddim_steps, conditioning=c, batch_size=len(prompts),
                                            shape=shape, verbose=False, unconditional_guidance_scale=opt.scale,
                                            unconditional_conditioning=uc, eta=opt.ddim_eta, x_T=start_code,
                                            generator=generator)
                x = model.decode_first_stage(samples).float()
                for k, (img, prompt) in enumerate(zip(x, prompts)):
                    meta = {"prompt": prompt, "negative_prompt": opt.negative_prompt, "seed": opt.seed,
                            "iteration": n, "index_in_batch": k, "steps": opt.ddim_steps, "scale": opt.scale,
                            "eta": opt.ddim_eta, "sampler": sampler_name, "size": f"{opt.W}x{opt.H}",
                            "checkpoint": Path(opt.ckpt).name}
                    if not opt.skip_save:
                        written.append(save_png(to_pil(img), sample_path / f"{base_count:05}.png", meta))
                        base_count += 1
                all_samples.append(x.cpu())
    if not opt.skip_grid:
        grid = make_grid(torch.cat(all_samples), nrow=opt.n_rows or opt.n_samples, pad_value=-1.0)
        meta = {"prompt": " | ".join(dict.fromkeys(p for b in batches for p in b)), "seed": opt.seed,
                "steps": opt.ddim_steps, "scale": opt.scale, "sampler": sampler_name, "checkpoint": Path(opt.ckpt).name}
        written.append(save_png(to_pil(grid), outpath / f"grid-{grid_count:04}.png", meta))
    print(f"Your samples are ready and waiting for you here: \n{outpath} \n"
          f"{len(all_samples) * opt.n_samples} images in {time.time() - tic:.1f} s. \nEnjoy.")
    return written


if __name__ == "__main__":
    main()
