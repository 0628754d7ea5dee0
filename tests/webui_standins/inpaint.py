#!/usr/bin/env python
"""A stand-in for ``scripts/inpaint.py`` (being written on another branch) with its documented flags, for the web
UI's browser test only: it checks its inputs and writes what the real script writes (numbered PNGs in
``OUTDIR/samples`` with prompt, seed, strength and mask in their text chunks), with the masked pixels greyed
instead of repainted. The UI uses the repository's own ``scripts/inpaint.py`` whenever it exists; this file is
found through ``DREAMBOOTH_WEBUI_EXTRA_SCRIPTS`` only while it does not.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.images import save_numbered_png  # noqa: E402
from ldm.sampling.cli import add_model_flags, add_sampling_flags  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    add_sampling_flags(p, n_samples=2, n_iter=1)
    add_model_flags(p)
    for flag, kind in (("--image", str), ("--mask", str), ("--strength", float), ("--mask_blur", int),
                       ("--padding", int), ("--outdir", str)):
        p.add_argument(flag, type=kind)
    p.add_argument("--only_masked", action="store_true")
    opt = p.parse_args()
    if not Path(opt.ckpt).is_file():
        p.exit(2, f"{p.prog}: error: --ckpt {opt.ckpt}: file not found\n")
    image = np.asarray(Image.open(opt.image).convert("RGB")).copy()
    mask = np.asarray(Image.open(opt.mask).convert("L").resize(image.shape[1::-1])) > 127
    image[mask] = 128
    for k in range(opt.n_samples * opt.n_iter):
        meta = {"prompt": opt.prompt, "seed": opt.seed, "strength": opt.strength, "mask": Path(opt.mask).name,
                "init_image": Path(opt.image).name, "index_in_batch": k, "checkpoint": Path(opt.ckpt).name,
                "stand_in": "tests/webui_standins/inpaint.py"}
        save_numbered_png(Image.fromarray(image), Path(opt.outdir) / "samples", "{:05}.png", meta)


if __name__ == "__main__":
    main()
