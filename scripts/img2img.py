#!/usr/bin/env python
"""Image-to-image (SDEdit) with a Stable Diffusion checkpoint (the original ``scripts/img2img.py`` interface).

    python scripts/img2img.py --ckpt logs/.../last.ckpt --init-img sketch.png --strength 0.6 \
        --prompt "photo of sks dog, oil painting" --n_samples 4

The image is resized down to a multiple of the model's factor (16 or 32 px; the original: 32), encoded, noised to
step ``int(strength * ddim_steps)`` of the DDIM schedule and denoised from there with the prompt: strength 0 returns
the image (through the VAE), 1 ignores it. ``--sampler euler|dpmpp_2m`` run the last ``int(strength * steps)``
steps of their own schedule (diffusers' convention); PLMS cannot start part-way. An inpainting checkpoint works
too, with a mask covering everything. Writes ``OUTDIR/samples/NNNNN.png`` and ``OUTDIR/grid-NNNN.png`` as txt2img
does, never overwriting; each PNG also records the init image's name and the strength.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.config import ConfigError, spatial_factor  # noqa: E402
from ldm.data.image_loading import ImageError, open_image, to_rgb, to_tensor  # noqa: E402
from ldm.images import save_numbered_png, save_sampling_grid, to_pil  # noqa: E402
from ldm.sampling.cli import (add_model_flags, add_sampling_flags, check_sampling_args, check_strength,  # noqa: E402
                     guidance_conditioning, guidance_meta, is_inpainting_config, load_model_config, load_sampling_model,
                     output_folder, pick_device, precision_context, report_samples, run_script, sampler_name)
from ldm.sampling.img2img import denoise_part_way  # noqa: E402
from ldm.sampling.inpaint import encode_inputs, with_concat  # noqa: E402
from ldm.sampling.samplers import check_finite, make_sampler  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(p, steps=50, scale=5.0, n_samples=2, n_iter=1)
    p.add_argument("--init-img", type=str, nargs="?", help="path to the input image")
    p.add_argument("--strength", type=float, default=0.75,
                   help="strength for noising/unnoising. 1.0 corresponds to full destruction of information in "
                        "init image")
    p.add_argument("--outdir", type=str, nargs="?", default="outputs/img2img-samples", help="dir to write results to")
    add_model_flags(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """Run the script; returns the paths written (samples, then the grid)."""
    return run_script(build_parser, sample, argv)


def load_init_image(path: str, factor: int) -> Image.Image:
    """The init image in RGB, resized down to sides that are multiples of ``factor`` (the original: 32)."""
    img = to_rgb(open_image(path, "--init-img"))
    w, h = img.size
    size = (w - w % factor, h - h % factor)
    if min(size) == 0:
        raise ImageError(f"--init-img {path}: {w}x{h} pixels; both sides must be at least {factor} for this model")
    if size != (w, h):
        print(f"--init-img {path}: resized from {w}x{h} to {size[0]}x{size[1]} (multiples of {factor})")
        img = img.resize(size, resample=Image.Resampling.LANCZOS)
    return img


def check_args(opt: argparse.Namespace):
    """Every flag and the init image, before a model loads: (config, prompt batches, image)."""
    config = load_model_config(opt)
    batches = check_sampling_args(opt, config, sizes=False)
    check_strength(opt)
    if not opt.init_img:
        raise ConfigError("--init-img is required: the image to start from")
    return config, batches, load_init_image(opt.init_img, spatial_factor(config))


def sample(opt: argparse.Namespace) -> list[Path]:
    config, batches, image = check_args(opt)
    device = pick_device(opt.device)
    if is_inpainting_config(config):
        print(f"{opt.ckpt}: an inpainting model; img2img uses it with a mask covering the whole image")
    model = load_sampling_model(opt, config, device)
    name = sampler_name(opt)
    sampler = make_sampler(name, model)

    outpath = output_folder(opt.outdir)
    width, height = image.size
    pixels = to_tensor(image)[None]
    latent_shape = [model.channels, height // model.vae_factor, width // model.vae_factor]
    generator = torch.Generator(device).manual_seed(opt.seed)
    fixed = torch.randn([opt.n_samples, *latent_shape], generator=generator, device=device) if opt.fixed_code \
        else None
    written: list[Path] = []
    all_samples = []
    common = {"negative_prompt": opt.negative_prompt, "seed": opt.seed, "steps": opt.ddim_steps, "scale": opt.scale,
              "eta": opt.ddim_eta, "sampler": name, "size": f"{width}x{height}", "init_image": Path(opt.init_img).name,
              "strength": opt.strength, "checkpoint": Path(opt.ckpt).name, **guidance_meta(opt)}
    tic = time.time()
    with torch.no_grad(), precision_context(device, opt.precision), model.ema_scope():
        for n in range(opt.n_iter):
            for prompts in batches:
                encoded = encode_inputs(model, pixels, None, len(prompts), generator)
                # SDXL's size conditioning: the processed image's size, no crop.
                c, uc = guidance_conditioning(model, prompts, opt.negative_prompt, opt.scale,
                                              model.default_sizes(len(prompts), height, width), opt.guidance)
                noise = fixed[:len(prompts)] if fixed is not None else torch.randn(
                    encoded.x0.shape, generator=generator, device=device)
                z = denoise_part_way(sampler, encoded.x0, opt.ddim_steps, opt.strength,
                                     with_concat(c, encoded.concat), with_concat(uc, encoded.concat), opt.scale,
                                     noise, generator, eta=opt.ddim_eta)
                x = check_finite(model.decode_first_stage(z).float(), prompts)
                for k, (img, prompt) in enumerate(zip(x, prompts)):
                    meta = {"prompt": prompt, "iteration": n, "index_in_batch": k, **common}
                    if not opt.skip_save:
                        written.append(save_numbered_png(to_pil(img), outpath / "samples", "{:05}.png", meta))
                all_samples.append(x.cpu())
    if not opt.skip_grid:
        written.append(save_sampling_grid(torch.cat(all_samples), outpath, opt.n_rows or opt.n_samples, batches,
                                          common))
    report_samples(outpath, sum(len(x) for x in all_samples), time.time() - tic)
    return written


if __name__ == "__main__":
    main()
