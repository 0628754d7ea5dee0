#!/usr/bin/env python
"""Draw the demo subject that ships in assets/demo/subject: a small toy robot, in a few poses and scenes.

The project draws these itself (no photos of anyone's property, no licence questions). Run again to redraw:
    python scripts/make_demo_assets.py
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parents[1] / "assets" / "demo" / "subject"
SIZE = 128
BACKGROUNDS = [((200, 225, 245), (120, 170, 110)), ((245, 225, 190), (190, 150, 110)), ((225, 225, 235), (150, 150, 160)),
               ((180, 210, 240), (230, 210, 160)), ((235, 200, 210), (140, 120, 130)), ((210, 240, 215), (110, 140, 90))]


def draw_robot(d: ImageDraw.ImageDraw, cx: int, cy: int, s: float, tilt: int) -> None:
    """The subject: a teal body with an orange chest dial, a round-eyed head and a red-tipped antenna."""
    body = [cx - 22 * s, cy - 6 * s, cx + 22 * s, cy + 34 * s]
    d.rounded_rectangle(body, radius=int(6 * s), fill=(40, 150, 150), outline=(20, 70, 70), width=2)
    d.ellipse([cx - 8 * s, cy + 6 * s, cx + 8 * s, cy + 22 * s], fill=(245, 140, 40), outline=(120, 60, 10))
    hx = cx + tilt
    d.rounded_rectangle([hx - 16 * s, cy - 34 * s, hx + 16 * s, cy - 8 * s], radius=int(5 * s),
                        fill=(60, 180, 175), outline=(20, 70, 70), width=2)
    for ex in (-7, 7):
        d.ellipse([hx + (ex - 4) * s, cy - 27 * s, hx + (ex + 4) * s, cy - 19 * s], fill=(255, 255, 255))
        d.ellipse([hx + (ex - 2) * s, cy - 25 * s, hx + (ex + 2) * s, cy - 21 * s], fill=(20, 20, 30))
    d.line([hx, cy - 34 * s, hx + tilt, cy - 46 * s], fill=(20, 70, 70), width=2)
    d.ellipse([hx + tilt - 4 * s, cy - 50 * s, hx + tilt + 4 * s, cy - 42 * s], fill=(220, 40, 40))
    for lx in (-12, 12):
        d.rectangle([cx + (lx - 4) * s, cy + 34 * s, cx + (lx + 4) * s, cy + 46 * s], fill=(30, 110, 110))


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
