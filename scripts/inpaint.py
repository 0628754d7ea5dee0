#!/usr/bin/env python
"""Inpainting: repaint the masked part of an image with a prompt; every other pixel comes back unchanged.

    python scripts/inpaint.py --ckpt logs/.../last.ckpt --image samples/00003.png --mask eyes.png \
        --prompt "photo of sks person, detailed eyes" --n_samples 4 --only_masked

The mask is a picture, white = repaint, of any size with the image's aspect ratio; without --mask the image's own
transparent pixels are repainted. Works with any checkpoint:

* a regular one (SD v1, SDXL, DreamBooth fine-tunes): at every step the known region is put back from the input,
  noised to that step, so only the masked part is generated; ``--strength`` (default 0.75) says how much of the
  masked content is replaced (1: all of it, from pure noise);
* an inpainting checkpoint (``sd-v1-5-inpainting.ckpt``, recognised from its 9-channel UNet): the UNet sees the
  mask and the masked image itself; ``--strength`` defaults to 1.0.

``--only_masked`` works on the mask's box plus ``--padding`` pixels of surroundings, at the model's full native
resolution (512 px for SD v1, 1024 for SDXL), and pastes the result back: the way to fix a small face or hands in
a large picture. The result has the input's size and is pasted through the mask feathered by ``--mask_blur``
pixels; pixels farther from the mask than that are the input's, bit for bit. Files are written, numbered and
tagged as txt2img's (``OUTDIR/samples/NNNNN.png``, ``OUTDIR/grid-NNNN.png``, never overwriting).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.config import ConfigError, spatial_factor  # noqa: E402
from ldm.images import save_numbered_png, save_sampling_grid, to_pil  # noqa: E402
from ldm.sampling.cli import (add_model_flags, add_sampling_flags, check_sampling_args, check_strength,  # noqa: E402
                     guidance_conditioning, guidance_meta, is_inpainting_config, load_model_config, load_sampling_model,
                     native_size, output_folder, pick_device, precision_context, report_samples, run_script,
                     sampler_name)
from ldm.sampling.img2img import denoise_part_way  # noqa: E402
from ldm.sampling.inpaint import (composite, encode_inputs, plan_region, read_image_and_mask, region_image,  # noqa: E402
                         region_mask, with_concat)
from ldm.sampling.masks import feather  # noqa: E402
from ldm.sampling.samplers import check_finite, make_sampler  # noqa: E402

STRENGTH = {"regular": 0.75, "inpainting": 1.0}
MAX_MASK_BLUR = 256


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(p, steps=50, scale=7.5, n_samples=2, n_iter=1)
    p.add_argument("--image", type=str, help="the image to repaint part of (any size)")
    p.add_argument("--mask", type=str, default=None,
                   help="white = repaint (any size with the image's aspect ratio); default: the image's "
                        "transparent pixels")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of the masked content is replaced: 0 keeps it, 1 repaints it from pure noise "
                        f"(default {STRENGTH['regular']} for regular checkpoints, {STRENGTH['inpainting']} for "
                        "inpainting ones)")
    p.add_argument("--mask_blur", type=int, default=4,
                   help="feather the mask outwards by this many pixels when pasting the result back")
    p.add_argument("--only_masked", action="store_true",
                   help="work on the mask's box (plus --padding) at the model's full resolution, then paste it back")
    p.add_argument("--padding", type=int, default=32,
                   help="with --only_masked: pixels of surroundings around the mask's box")
    p.add_argument("--outdir", type=str, nargs="?", default="outputs/inpaint-samples", help="dir to write results to")
    add_model_flags(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """Run the script; returns the paths written (samples, then the grid)."""
    return run_script(build_parser, sample, argv)


def check_args(opt: argparse.Namespace):
    """Every flag, the image and the mask, before a model loads: (config, prompt batches, image, mask)."""
    config = load_model_config(opt)
    batches = check_sampling_args(opt, config, sizes=False)
    if opt.strength is None:
        opt.strength = STRENGTH["inpainting" if is_inpainting_config(config) else "regular"]
    check_strength(opt)
    if not 0 <= opt.mask_blur <= MAX_MASK_BLUR:
        raise ConfigError(f"--mask_blur {opt.mask_blur}: must be between 0 and {MAX_MASK_BLUR} pixels")
    if opt.padding < 0:
        raise ConfigError(f"--padding {opt.padding}: must be 0 or more pixels")
    if not opt.image:
        raise ConfigError("--image is required: the picture to repaint part of")
    image, mask = read_image_and_mask(opt.image, opt.mask)
    return config, batches, image, mask


def sample(opt: argparse.Namespace) -> list[Path]:
    config, batches, image, mask = check_args(opt)
    device = pick_device(opt.device)
    feathered = feather(mask, opt.mask_blur)
    region = plan_region(feathered, opt.only_masked, opt.padding, native_size(config), spatial_factor(config))
    if region.size[0] * region.size[1] > 4 * native_size(config) ** 2:
        print(f"--image {opt.image}: generating the whole {image.width}x{image.height} picture; with --only_masked "
              f"the mask's surroundings are generated at the model's {native_size(config)} px instead")
    model = load_sampling_model(opt, config, device)
    name = sampler_name(opt)
    sampler = make_sampler(name, model)

    outpath = output_folder(opt.outdir)
    original = np.asarray(image)
    pixels, repaint = region_image(image, region), region_mask(mask, region)
    height, width = region.size
    latent_shape = [model.channels, height // model.vae_factor, width // model.vae_factor]
    generator = torch.Generator(device).manual_seed(opt.seed)
    fixed = torch.randn([opt.n_samples, *latent_shape], generator=generator, device=device) if opt.fixed_code \
        else None
    written: list[Path] = []
    all_samples = []
    common = {"negative_prompt": opt.negative_prompt, "seed": opt.seed, "steps": opt.ddim_steps, "scale": opt.scale,
              "eta": opt.ddim_eta, "sampler": name, "size": f"{image.width}x{image.height}",
              "init_image": Path(opt.image).name, "mask": Path(opt.mask).name if opt.mask else "alpha",
              "strength": opt.strength, "mask_blur": opt.mask_blur, "only_masked": opt.only_masked,
              "padding": opt.padding, "checkpoint": Path(opt.ckpt).name, **guidance_meta(opt)}
    tic = time.time()
    with torch.no_grad(), precision_context(device, opt.precision), model.ema_scope():
        for n in range(opt.n_iter):
            for prompts in batches:
                encoded = encode_inputs(model, pixels, repaint, len(prompts), generator)
                # SDXL's size conditioning: the region's size in the source, generated at ``region.size``, no crop.
                sizes = model.default_sizes(len(prompts), height, width, original=region.source_size)
                c, uc = guidance_conditioning(model, prompts, opt.negative_prompt, opt.scale, sizes, opt.guidance)
                noise = fixed[:len(prompts)] if fixed is not None else torch.randn(
                    encoded.x0.shape, generator=generator, device=device)
                z = denoise_part_way(sampler, encoded.x0, opt.ddim_steps, opt.strength,
                                     with_concat(c, encoded.concat), with_concat(uc, encoded.concat), opt.scale,
                                     noise, generator, keep=encoded.keep, eta=opt.ddim_eta)
                x = check_finite(model.decode_first_stage(z).float(), prompts)
                for k, (img, prompt) in enumerate(zip(x, prompts)):
                    result = composite(original, to_pil(img), region, feathered)
                    meta = {"prompt": prompt, "iteration": n, "index_in_batch": k, **common}
                    if not opt.skip_save:
                        written.append(save_numbered_png(Image.fromarray(result), outpath / "samples", "{:05}.png",
                                                         meta))
                    all_samples.append(torch.from_numpy(result).permute(2, 0, 1))
    if not opt.skip_grid:
        written.append(save_sampling_grid(torch.stack(all_samples), outpath, opt.n_rows or opt.n_samples, batches,
                                          common))
    report_samples(outpath, len(all_samples), time.time() - tic)
    return written


if __name__ == "__main__":
    main()
