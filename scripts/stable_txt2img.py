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
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.images import save_numbered_png, save_sampling_grid, to_pil  # noqa: E402
from ldm.sampling.cli import (add_model_flags, add_sampling_flags, check_sampling_args,  # noqa: E402
                              guidance_conditioning, load_model_config, load_sampling_model, output_folder,
                              guidance_meta, pick_device, precision_context, report_samples, run_script,
                              sampler_name)
from ldm.sampling.samplers import check_finite, make_sampler  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(p)
    p.add_argument("--outdir", type=str, nargs="?", default="outputs/txt2img-samples", help="dir to write results to")
    p.add_argument("--H", type=int, default=None, help="image height, in pixel space (default: the model's own, "
                   "512 for SD v1, 1024 for SDXL)")
    p.add_argument("--W", type=int, default=None, help="image width, in pixel space (default: as --H)")
    p.add_argument("--C", type=int, default=None, help="latent channels (default: the model's)")
    p.add_argument("--f", type=int, default=None, help="downsampling factor (default: the model's VAE's)")
    add_model_flags(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """Run the script; returns the paths written (samples, then the grid)."""
    return run_script(build_parser, sample, argv)


def sample(opt: argparse.Namespace) -> list[Path]:
    config = load_model_config(opt)
    batches = check_sampling_args(opt, config)
    device = pick_device(opt.device)
    model = load_sampling_model(opt, config, device)
    name = sampler_name(opt)
    sampler = make_sampler(name, model)

    outpath = output_folder(opt.outdir)
    sample_path = outpath / "samples"
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
                # SDXL's size conditioning: original and target size = the output size, no crop.
                sizes = model.default_sizes(len(prompts), opt.H, opt.W)
                c, uc = guidance_conditioning(model, prompts, opt.negative_prompt, opt.scale, sizes, opt.guidance)
                x_T = start_code[:len(prompts)] if start_code is not None else None  # the last batch may be short
                samples, _ = sampler.sample(S=opt.ddim_steps, conditioning=c, batch_size=len(prompts),
                                            shape=shape, verbose=False, unconditional_guidance_scale=opt.scale,
                                            unconditional_conditioning=uc, eta=opt.ddim_eta, x_T=x_T,
                                            generator=generator)
                x = check_finite(model.decode_first_stage(samples).float(), prompts)
                for k, (img, prompt) in enumerate(zip(x, prompts)):
                    meta = {"prompt": prompt, "negative_prompt": opt.negative_prompt, "seed": opt.seed,
                            "iteration": n, "index_in_batch": k, "steps": opt.ddim_steps, "scale": opt.scale,
                            "eta": opt.ddim_eta, "sampler": name, "size": f"{opt.W}x{opt.H}",
                            "checkpoint": Path(opt.ckpt).name, **guidance_meta(opt)}
                    if not opt.skip_save:
                        written.append(save_numbered_png(to_pil(img), sample_path, "{:05}.png", meta))
                all_samples.append(x.cpu())
    if not opt.skip_grid:
        meta = {"seed": opt.seed, "steps": opt.ddim_steps, "scale": opt.scale, "sampler": name,
                "checkpoint": Path(opt.ckpt).name}
        written.append(save_sampling_grid(torch.cat(all_samples), outpath, opt.n_rows or opt.n_samples, batches,
                                          meta))
    report_samples(outpath, sum(len(x) for x in all_samples), time.time() - tic)
    return written


if __name__ == "__main__":
    main()
