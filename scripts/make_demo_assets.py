#!/usr/bin/env python
"""Draw the demo subject that ships in assets/demo/subject: a small toy robot, in a few poses and scenes.

The project draws these itself (no photos of anyone's property, no licence questions). Run again to redraw:
    python scripts/make_demo_assets.py
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The design lives in the toy world's library, which also draws it into world places for the evaluator.
from ldm.data.toy_world import DEMO_BACKDROPS as BACKGROUNDS  # noqa: E402
from ldm.data.toy_world import draw_demo_robot as draw_robot  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "assets" / "demo" / "subject"
SIZE = 128


def draw_scene(index: int) -> Image.Image:
    rng = random.Random(index)
    sky, ground = BACKGROUNDS[index % len(BACKGROUNDS)]
    img = Image.new("RGB", (SIZE, SIZE), sky)
    d = ImageDraw.Draw(img)
    horizon = rng.randint(78, 96)
    d.rectangle([0, horizon, SIZE, SIZE], fill=ground)
    for _ in range(3):  # a little clutter so the background is not the subject
        x, y = rng.randint(0, SIZE), rng.randint(horizon, SIZE)
        r = rng.randint(3, 8)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(max(0, c - 40) for c in ground))
    draw_robot(d, cx=rng.randint(48, 80), cy=rng.randint(52, 62), s=rng.uniform(0.85, 1.1), tilt=rng.randint(-4, 4))
    return img.filter(ImageFilter.SMOOTH)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        draw_scene(i).save(OUT / f"robot-{i:02d}.png", optimize=True)
    print(f"wrote 6 pictures to {OUT}")


if __name__ == "__main__":
    main()
