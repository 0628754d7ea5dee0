"""Class ("prior") images on demand: the DreamBooth paper generates them with the frozen starting model from
the class prompt alone (Ruiz et al. 2023, sec. 3.3), before fine-tuning begins."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from ldm.images import save_numbered_png, to_pil
from ldm.sampling.samplers import default_sampler, guided_images, make_sampler

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".mpo")
#: The line printed before the first batch of class images and after each (done/wanted, prompt, seconds per image
#: so far).
CLASS_PROGRESS = r"^Class images (\d+)/(\d+) for .*?(?: \(([\d.]+) s/image\))?$"


def count_images(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


@torch.no_grad()
def generate_class_images(model, folder: str | Path, prompt: str, num: int, size: int = 512, ddim_steps: int = 50,
                          scale: float = 7.5, batch_size: int = 4, seed: int = 0) -> list[Path]:
    """Add images to ``folder`` until it holds ``num``; returns the new files. Deterministic for a seed."""
    folder = Path(folder)
    missing = num - count_images(folder)
    if missing <= 0:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    print(f"Generating {missing} class images for {prompt!r} into {folder} ({ddim_steps} DDIM steps, "
          f"scale {scale})")
    sampler = make_sampler(default_sampler(model), model)
    generator = torch.Generator(model.device).manual_seed(seed + count_images(folder))
    shape = (model.channels, size // model.vae_factor, size // model.vae_factor)
    written = []
    target, tic = count_images(folder) + missing, time.time()
    was_training = model.training
    model.eval()
    tqdm.write(f"Class images {target - missing}/{target} for {prompt!r}")
    try:
        with model.ema_scope():
            for start in tqdm(range(0, missing, batch_size), desc="class images"):
                n = min(batch_size, missing - start)
                images = guided_images(model, sampler, n * [prompt], shape, ddim_steps, scale, generator,
                                       model.default_sizes(n, size, size))
                for img in images:
                    written.append(save_numbered_png(to_pil(img), folder, "class-{:05d}.png",
                                                     {"prompt": prompt, "seed": seed, "steps": ddim_steps,
                                                      "scale": scale}))
                # one parseable line per batch: the web UI shows this phase's progress from it (CLASS_PROGRESS)
                tqdm.write(f"Class images {target - missing + len(written)}/{target} for {prompt!r} "
                           f"({(time.time() - tic) / len(written):.2f} s/image)")
    finally:
        model.train(was_training)
    return written
