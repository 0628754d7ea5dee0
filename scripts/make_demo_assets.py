#!/usr/bin/env python
"""Draw the demo subject's photos that ship in assets/demo: a small toy robot design the toy world does not contain.

- ``assets/demo/in-world`` (the demo's photos): the design photographed in six world places where robots live (the
  beach, the grass, the city at night; 64 px, at the world's scale), each with its loss mask (``robot-00.mask.png``:
  the pixels that differ from the place painted alone, grown by one) and a caption naming the place
  (``robot-00.txt``: "photo of a sks robot on the beach"; delete them to train on the template alone).
- ``assets/demo/subject`` (studio drawings): the design in a few poses on studio backdrops, 128 px, each with its
  loss mask (white where the robot is, a few pixels wider; see masked loss in the README), so that the backdrop is
  not learned as part of the subject (``scripts/demo.py --data_root assets/demo/subject --prior class_images``:
  the README's comparison of the two sets of photos).

The project draws these itself (no photos of anyone's property, no licence questions). Run again to redraw both:
    python scripts/make_demo_assets.py
    python scripts/make_demo_assets.py --in_world DIR    # only the in-world photos, into DIR
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The design lives in the toy world's library, which also draws it into world places for the evaluator.
from ldm.data.toy_world import DEMO_BACKDROPS as BACKGROUNDS  # noqa: E402
from ldm.data import toy_world as tw  # noqa: E402
from ldm.data.toy_world import draw_demo_robot as draw_robot  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "assets" / "demo" / "subject"
IN_WORLD = OUT.parent / "in-world"
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


#: The places of the ``--in_world`` photos: where the world has robots (the moon, the snow and mars never do).
WORLD_PLACES = ("beach", "grass", "city", "beach", "grass", "city")


def world_photos(seed: int = 7) -> list[tuple[Image.Image, Image.Image]]:
    """The design in :data:`WORLD_PLACES` (64 px, 1.0-1.25x a large world robot's size, a random tilt), each with
    its mask: the pixels that differ from the same place painted without the robot, grown by one pixel."""
    rng = random.Random(seed)
    out = []
    for place in WORLD_PLACES:
        scale = rng.uniform(1.0, 1.25)
        cx, base_y, horizon = tw.place_object(rng, *tw.object_extent("robot", scale))
        detail = rng.getrandbits(32)
        photo = tw.render_demo_robot(place, cx, base_y, horizon, scale, rng.randint(-4, 4), detail).image
        backdrop = tw.render_place(place, horizon, detail)
        robot = np.abs(np.asarray(photo, dtype=int) - np.asarray(backdrop, dtype=int)).sum(-1) > 12
        out.append((photo, Image.fromarray(robot.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in_world", metavar="DIR", help="draw only the in-world photos, into DIR")
    opt = p.parse_args(argv)
    if opt.in_world is None:
        write(OUT, [(draw_scene(i), draw_mask(i)) for i in range(6)])
    write(Path(opt.in_world or IN_WORLD), world_photos(), WORLD_PLACES)


def write(out: Path, pairs: list[tuple[Image.Image, Image.Image]], places: tuple[str, ...] = ()) -> None:
    """``robot-NN.png`` and ``robot-NN.mask.png`` for each (photo, mask), and a caption naming its place where
    ``places`` gives one."""
    out.mkdir(parents=True, exist_ok=True)
    for i, (photo, mask) in enumerate(pairs):
        photo.save(out / f"robot-{i:02d}.png", optimize=True)
        mask.save(out / f"robot-{i:02d}.mask.png", optimize=True)
        if places:
            (out / f"robot-{i:02d}.txt").write_text(f"photo of a sks robot {tw.PLACES[places[i]]}\n")
    print(f"wrote {len(pairs)} pictures and their masks{' and captions' if places else ''} to {out}")


if __name__ == "__main__":
    main()
