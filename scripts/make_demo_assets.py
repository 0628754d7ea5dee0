#!/usr/bin/env python
"""Draw the demo subject that ships in assets/demo/subject: a small toy robot, in a few poses and scenes, each
with its loss mask (``robot-00.mask.png``: white where the robot is, a few pixels wider; see masked loss in the
README), which the demo trains with so that the studio backdrop is not learned as part of the subject.

The project draws these itself (no photos of anyone's property, no licence questions). Run again to redraw:
    python scripts/make_demo_assets.py
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The design lives in the toy world's library, which also draws it into world places for the evaluator.
from ldm.data.toy_world import DEMO_BACKDROPS as BACKGROUNDS  # noqa: E402
from ldm.data.toy_world import draw_demo_robot as draw_robot  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "assets" / "demo" / "subject"
SIZE = 128


def layout(index: int) -> tuple[tuple, tuple, int, list[tuple[int, int, int]], dict]:
    """Scene ``index``'s backdrop colours, horizon, clutter (x, y, r) and the robot's pose, from its own seed."""
    rng = random.Random(index)
    sky, ground = BACKGROUNDS[index % len(BACKGROUNDS)]
    horizon = rng.randint(78, 96)
    clutter = []
    for _ in range(3):  # a little clutter so the background is not the subject
        x, y = rng.randint(0, SIZE), rng.randint(horizon, SIZE)
        clutter.append((x, y, rng.randint(3, 8)))
    pose = dict(cx=rng.randint(48, 80), cy=rng.randint(52, 62), s=rng.uniform(0.85, 1.1), tilt=rng.randint(-4, 4))
    return sky, ground, horizon, clutter, pose


def draw_backdrop(index: int) -> Image.Image:
    """Scene ``index`` without its robot, unsmoothed: sky, ground and clutter."""
    sky, ground, horizon, clutter, _ = layout(index)
    img = Image.new("RGB", (SIZE, SIZE), sky)
    d = ImageDraw.Draw(img)
    d.rectangle([0, horizon, SIZE, SIZE], fill=ground)
    for x, y, r in clutter:
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(max(0, c - 40) for c in ground))
    return img


def draw_scene(index: int) -> Image.Image:
    img = draw_backdrop(index)
    draw_robot(ImageDraw.Draw(img), **layout(index)[4])
    return img.filter(ImageFilter.SMOOTH)


def draw_mask(index: int, margin: int = 3) -> Image.Image:
    """The robot of scene ``index``, white on black, grown by ``margin`` pixels: every pixel the robot paints
    differs from one of two backdrops it is drawn over (black and (1, 1, 1)), whatever its own colours."""
    pose = layout(index)[4]
    first, second = Image.new("RGB", (SIZE, SIZE), (0, 0, 0)), Image.new("RGB", (SIZE, SIZE), (1, 1, 1))
    draw_robot(ImageDraw.Draw(first), **pose)
    draw_robot(ImageDraw.Draw(second), **pose)
    a, b = first.convert("L").point(lambda v: 255 * (v > 0)), second.convert("L").point(lambda v: 255 * (v != 1))
    return ImageChops.lighter(a, b).convert("L").filter(ImageFilter.MaxFilter(2 * margin + 1))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        draw_scene(i).save(OUT / f"robot-{i:02d}.png", optimize=True)
        draw_mask(i).save(OUT / f"robot-{i:02d}.mask.png", optimize=True)
    print(f"wrote 6 pictures and their masks to {OUT}")


if __name__ == "__main__":
    main()
