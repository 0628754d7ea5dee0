"""The toy world: captioned 64x64 scenes drawn with Pillow, small enough to pretrain a tiny LDM on a CPU.

DreamBooth's claim (Ruiz et al. 2022) is about a pretrained model: after fine-tuning on a few pictures of one
subject, "a [V] robot on the moon" shows *that* robot on the moon, while "a robot" still shows the class. Real
Stable Diffusion weights are too large to test this on a CPU, so this module draws a world with a known prior:
five object kinds x five colours x three sizes, standing in six places, each scene captioned by one grammar::

    "photo of a {colour} {kind} {place phrase}"      e.g. "photo of a red robot on the beach"
    "photo of a {kind} {place phrase}"               e.g. "photo of a robot on the beach"
    "photo of a {kind}"                              the class prompt, e.g. "photo of a robot"

The DreamBooth prompt "photo of a sks robot on the moon" fills the colour slot with the identifier.

Why 64 px: each place is a layout of two or three large colour regions (sand+sea+sky, grey ground+black sky,
...) that survives any resolution, and the smallest object (a small ball) still spans 12 px, so kind and colour
are readable. The demo subject's marks (orange chest dial, round eyes, red antenna tip) span 2-5 px at the medium
size, enough for a classifier and for an eye. A 4x-downsampling autoencoder turns 64 px into 16x16 latents, where
a small UNet's step is cheap on a CPU; 128 px would cost 4x per step for no information this world has.

Held out: :data:`HELD_OUT_PAIRS` (kind, place) never occur in a generated set. No robot is ever on the moon, in
the snow or on mars, so a model that draws the subject there after DreamBooth has recontextualised it, not
recalled it.
The others (a cat in the city, a house on the beach, a tree on the moon) test the pretrained model itself: can
it compose a kind and a place it never saw together, before any fine-tuning?

The demo subject (drawn by :func:`draw_demo_robot`; its photos in ``assets/demo``) is never part of the world:
world robots are boxy, with arms, a grey head, a black visor and no antenna or chest dial, and their colours come
from :data:`COLOURS` (no teal, no orange). :func:`render_demo_robot` puts the demo design into a world place: the
demo's photos (``scripts/make_demo_assets.py``) and the ground truth of the evaluator (``ldm.eval.toy``).

Everything is drawn at twice the size and box-downsampled, so edges are anti-aliased like a photo's rather than
stair-stepped; a scene is a pure function of its :class:`Scene` (attributes plus a seed for the clutter).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SS = 2  # supersampling factor: draw at 128 px, box-downsample to 64
KINDS = ("robot", "cat", "ball", "house", "tree")
COLOURS = {"red": (205, 45, 45), "blue": (45, 85, 205), "green": (50, 150, 60), "yellow": (235, 200, 40),
           "purple": (135, 65, 175)}
# Object height factor; the tallest object at "large" spans ~40 of the 64 px.
SIZES = {"small": 0.6, "medium": 0.8, "large": 1.0}
PLACES = {"beach": "on the beach", "moon": "on the moon", "snow": "in the snow", "grass": "on the grass",
          "city": "in the city at night", "mars": "on mars"}
BACKGROUNDS = tuple(PLACES)
# The first world's five places: the rebuild's stage-1 autoencoder trains on a world of these, before mars came
# (scripts/train_toy_model.py; docs/toy-experiments.md tells why the autoencoder is then fine-tuned on all six).
FIRST_PLACES = BACKGROUNDS[:5]
# (kind, background) pairs that never occur in a generated world: the recontextualisation test cases.
HELD_OUT_PAIRS = (("robot", "moon"), ("robot", "snow"), ("cat", "city"), ("house", "beach"), ("tree", "moon"),
                  ("robot", "mars"))
# Not a world place: the pastel sky-and-ground backdrops of the demo pictures (make_demo_assets.py); the
# evaluator trains on it so that "photo of a sks robot" without a place is still recognised.
STUDIO = "studio"
DEMO_BACKDROPS = [((200, 225, 245), (120, 170, 110)), ((245, 225, 190), (190, 150, 110)),
                  ((225, 225, 235), (150, 150, 160)), ((180, 210, 240), (230, 210, 160)),
                  ((235, 200, 210), (140, 120, 130)), ((210, 240, 215), (110, 140, 90))]
CaptionForm = Literal["full", "kind_place", "class"]
# Share of each caption form in a generated world: mostly full captions, plus the forms DreamBooth prompts use.
CAPTION_FORMS: dict[str, float] = {"full": 0.8, "kind_place": 0.1, "class": 0.1}
OUTLINE = (30, 30, 35)
GREY, DARK_GREY = (160, 160, 170), (90, 90, 100)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """Everything a world picture depends on. Coordinates are in 64-px image units: ``cx`` is the object's
    horizontal centre, ``base_y`` where it touches the ground, ``horizon`` where the ground begins."""
    kind: str
    colour: str
    size: str
    background: str
    cx: float
    base_y: float
    horizon: int
    detail_seed: int


@dataclass(frozen=True)
class Rendered:
    image: Image.Image
    bbox: Box  # (x0, y0, x1, y1) of the object in 64-px pixels, right/bottom exclusive


# ---------------------------------------------------------------- objects (drawn in 128-px units)

def draw_demo_robot(d: ImageDraw.ImageDraw, cx: int, cy: int, s: float, tilt: int) -> None:
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


def _draw_world_robot(d: ImageDraw.ImageDraw, cx: float, by: float, s: float, rgb: tuple) -> None:
    """Boxy: square-cornered body with a grey vent panel, grey arms, a grey head with a black visor, no antenna."""
    u = s  # 66 units tall at s=1: 33 px at 64 px
    for lx in (-7, 3):
        d.rectangle([cx + lx * u, by - 14 * u, cx + (lx + 4) * u, by], fill=DARK_GREY, outline=OUTLINE, width=2)
    for ax in (-17, 12):
        d.rectangle([cx + ax * u, by - 38 * u, cx + (ax + 5) * u, by - 22 * u], fill=GREY, outline=OUTLINE, width=2)
    d.rectangle([cx - 12 * u, by - 42 * u, cx + 12 * u, by - 14 * u], fill=rgb, outline=OUTLINE, width=2)
    d.rectangle([cx - 6 * u, by - 33 * u, cx + 6 * u, by - 24 * u], fill=GREY)
    for vy in (-30, -27):
        d.line([cx - 4 * u, by + vy * u, cx + 4 * u, by + vy * u], fill=DARK_GREY, width=2)
    d.rectangle([cx - 10 * u, by - 66 * u, cx + 10 * u, by - 44 * u], fill=GREY, outline=OUTLINE, width=2)
    d.rectangle([cx - 8 * u, by - 60 * u, cx + 8 * u, by - 53 * u], fill=(15, 15, 20))
    for ex in (-5, 2):
        d.rectangle([cx + ex * u, by - 58 * u, cx + (ex + 3) * u, by - 55 * u], fill=(235, 235, 235))
    for ex in (-13, 10):
        d.rectangle([cx + ex * u, by - 58 * u, cx + (ex + 3) * u, by - 51 * u], fill=DARK_GREY, outline=OUTLINE)


def _draw_cat(d: ImageDraw.ImageDraw, cx: float, by: float, s: float, rgb: tuple) -> None:
    """A sitting cat: oval body, round head with pointed ears, a curled tail."""
    u = s
    tail = [cx + 4 * u, by - 22 * u, cx + 26 * u, by + 2 * u]
    d.arc(tail, start=180, end=330, fill=OUTLINE, width=max(3, int(4 * u)))
    d.arc(tail, start=185, end=325, fill=rgb, width=max(2, int(2.5 * u)))
    d.ellipse([cx - 14 * u, by - 30 * u, cx + 14 * u, by], fill=rgb, outline=OUTLINE, width=2)
    hy = by - 38 * u
    for side in (-1, 1):
        ear = [(cx + side * 11 * u, hy - 14 * u), (cx + side * 3 * u, hy - 8 * u), (cx + side * 11 * u, hy - 2 * u)]
        d.polygon(ear, fill=rgb, outline=OUTLINE)
    d.ellipse([cx - 12 * u, hy - 11 * u, cx + 12 * u, hy + 11 * u], fill=rgb, outline=OUTLINE, width=2)
    for ex in (-5, 5):
        d.ellipse([cx + (ex - 2.5) * u, hy - 4 * u, cx + (ex + 2.5) * u, hy + 1 * u], fill=(240, 240, 200))
        d.ellipse([cx + (ex - 1) * u, hy - 3 * u, cx + (ex + 1) * u, hy + 1 * u], fill=(15, 15, 15))
    d.polygon([(cx - 2 * u, hy + 3 * u), (cx + 2 * u, hy + 3 * u), (cx, hy + 5 * u)], fill=(240, 150, 170))


def _draw_ball(d: ImageDraw.ImageDraw, cx: float, by: float, s: float, rgb: tuple) -> None:
    """A ball: a disc with a white band and a highlight."""
    r = 20 * s
    box = [cx - r, by - 2 * r, cx + r, by]
    d.ellipse(box, fill=rgb, outline=OUTLINE, width=2)
    d.arc([cx - r * 1.6, by - 1.7 * r, cx + r * 0.6, by + 0.3 * r], start=280, end=20, fill=(250, 250, 250),
          width=max(2, int(r * 0.25)))
    d.ellipse([cx - 0.55 * r, by - 1.6 * r, cx - 0.2 * r, by - 1.25 * r], fill=(255, 255, 255))


def _draw_house(d: ImageDraw.ImageDraw, cx: float, by: float, s: float, rgb: tuple) -> None:
    """A house: coloured walls, a dark brown roof, a door and a lit window."""
    u = s * 1.2
    d.rectangle([cx - 16 * u, by - 30 * u, cx + 16 * u, by], fill=rgb, outline=OUTLINE, width=2)
    d.polygon([(cx - 20 * u, by - 30 * u), (cx, by - 50 * u), (cx + 20 * u, by - 30 * u)], fill=(95, 55, 40),
              outline=OUTLINE)
    d.rectangle([cx - 11 * u, by - 16 * u, cx - 3 * u, by], fill=(70, 45, 30), outline=OUTLINE)
    d.rectangle([cx + 3 * u, by - 22 * u, cx + 12 * u, by - 13 * u], fill=(250, 240, 190), outline=OUTLINE, width=2)


def _draw_tree(d: ImageDraw.ImageDraw, cx: float, by: float, s: float, rgb: tuple) -> None:
    """A tree: a brown trunk under three overlapping round crowns of the colour."""
    u = s * 1.2
    d.rectangle([cx - 3.5 * u, by - 22 * u, cx + 3.5 * u, by], fill=(110, 70, 40), outline=OUTLINE, width=2)
    for ox, oy, r in ((-8, -30, 11), (8, -30, 11), (0, -42, 13)):
        d.ellipse([cx + (ox - r) * u, by + (oy - r) * u, cx + (ox + r) * u, by + (oy + r) * u], fill=rgb,
                  outline=OUTLINE, width=2)
    for ox, oy, r in ((-8, -30, 10), (8, -30, 10)):  # hide the inner outlines so the crowns read as one
        d.ellipse([cx + (ox - r) * u, by + (oy - r) * u, cx + (ox + r) * u, by + (oy + r) * u], fill=rgb)


_OBJECTS: dict[str, Callable[..., None]] = {"robot": _draw_world_robot, "cat": _draw_cat, "ball": _draw_ball,
                                            "house": _draw_house, "tree": _draw_tree}
# Half-width and height of each object at s=1, in 64-px units: placement keeps it inside the frame.
_EXTENT = {"robot": (9, 33), "cat": (13, 26), "ball": (10, 20), "house": (12, 30), "tree": (12, 33)}


# ---------------------------------------------------------------- places (drawn in 128-px units)

def _dots(d: ImageDraw.ImageDraw, rng: random.Random, n: int, y0: float, y1: float, r: float, rgb: tuple) -> None:
    for _ in range(n):
        x, y = rng.uniform(0, SIZE * _SS), rng.uniform(y0, y1)
        d.ellipse([x - r, y - r, x + r, y + r], fill=rgb)


def _paint_beach(d: ImageDraw.ImageDraw, h: float, rng: random.Random) -> None:
    """Light-blue sky, a band of deep-blue sea with white wave lines, sand."""
    w, sea = SIZE * _SS, h - rng.uniform(12, 18)
    d.rectangle([0, 0, w, sea], fill=(140, 200, 240))
    d.rectangle([0, sea, w, h], fill=(30, 105, 175))
    for _ in range(3):
        x, y = rng.uniform(0, w), rng.uniform(sea + 3, h - 3)
        d.line([x, y, x + rng.uniform(10, 24), y], fill=(230, 240, 250), width=2)
    d.rectangle([0, h, w, w], fill=(236, 214, 160))
    _dots(d, rng, 8, h + 4, w, 1.5, (205, 180, 125))


def _paint_moon(d: ImageDraw.ImageDraw, h: float, rng: random.Random) -> None:
    """Black starry sky over grey ground pitted with craters."""
    w = SIZE * _SS
    d.rectangle([0, 0, w, w], fill=(8, 8, 18))
    _dots(d, rng, 22, 0, h - 2, 1.2, (235, 235, 240))
    d.rectangle([0, h, w, w], fill=(135, 135, 140))
    for _ in range(rng.randint(4, 6)):
        x, y, r = rng.uniform(0, w), rng.uniform(h + 6, w), rng.uniform(5, 12)
        d.ellipse([x - r, y - r * 0.45, x + r, y + r * 0.45], fill=(100, 100, 106), outline=(170, 170, 175), width=2)


def _paint_snow(d: ImageDraw.ImageDraw, h: float, rng: random.Random) -> None:
    """Pale grey-blue sky over pale blue mountains, white ground with blue-grey drifts, falling flakes."""
    w = SIZE * _SS
    d.rectangle([0, 0, w, w], fill=(212, 222, 234))
    x = -rng.uniform(0, 30)
    while x < w:
        span, top = rng.uniform(30, 60), h - rng.uniform(12, 28)
        d.polygon([(x, h), (x + span / 2, top), (x + span, h)], fill=(170, 185, 210))
        x += span * 0.7
    d.rectangle([0, h, w, w], fill=(250, 250, 253))
    for _ in range(3):
        x, y, r = rng.uniform(0, w), rng.uniform(h + 10, w), rng.uniform(10, 20)
        d.ellipse([x - r, y - r * 0.25, x + r, y + r * 0.25], fill=(220, 228, 240))
    _dots(d, rng, 16, 0, w, 1.5, (255, 255, 255))


def _paint_grass(d: ImageDraw.ImageDraw, h: float, rng: random.Random) -> None:
    """Saturated blue sky with white clouds, a green field with darker tufts."""
    w = SIZE * _SS
    d.rectangle([0, 0, w, h], fill=(70, 140, 230))
    for _ in range(rng.randint(1, 2)):
        x, y = rng.uniform(0, w), rng.uniform(8, max(10, h - 24))
        for dx in (-10, 0, 10):
            d.ellipse([x + dx - 10, y - 6, x + dx + 10, y + 6], fill=(250, 250, 252))
    d.rectangle([0, h, w, w], fill=(95, 175, 70))
    for _ in range(10):
        x, y = rng.uniform(0, w), rng.uniform(h + 4, w)
        d.line([x, y, x - 2, y - 5], fill=(55, 120, 45), width=2)
        d.line([x, y, x + 2, y - 5], fill=(55, 120, 45), width=2)


def _paint_city(d: ImageDraw.ImageDraw, h: float, rng: random.Random) -> None:
    """Navy night sky, a dark skyline with lit yellow windows, a dark street."""
    w = SIZE * _SS
    d.rectangle([0, 0, w, w], fill=(15, 20, 52))
    _dots(d, rng, 5, 0, h * 0.4, 1.0, (200, 200, 220))
    x = -rng.uniform(0, 10)
    while x < w:
        bw, top = rng.uniform(14, 28), rng.uniform(10, h - 20)
        d.rectangle([x, top, x + bw, h], fill=rng.choice([(35, 35, 50), (45, 45, 62), (28, 28, 40)]))
        for wy in np.arange(top + 5, h - 5, 8):
            for wx in np.arange(x + 4, x + bw - 5, 7):
                if rng.random() < 0.5:
                    d.rectangle([wx, wy, wx + 3, wy + 4], fill=(250, 220, 110))
        x += bw + rng.uniform(0, 4)
    d.rectangle([0, h, w, w], fill=(42, 42, 48))
    d.line([0, (h + w) / 2, w, (h + w) / 2], fill=(120, 120, 95), width=2)


def _paint_mars(d: ImageDraw.ImageDraw, h: float, rng: random.Random) -> None:
    """Butterscotch sky over dark red-brown mesas, rust ground strewn with dark rocks."""
    w = SIZE * _SS
    d.rectangle([0, 0, w, w], fill=(222, 168, 98))
    x = -rng.uniform(0, 20)
    while x < w:
        span, top = rng.uniform(24, 50), h - rng.uniform(8, 20)
        d.polygon([(x, h), (x + span * 0.2, top), (x + span * 0.8, top), (x + span, h)], fill=(120, 52, 34))
        x += span + rng.uniform(6, 30)
    d.rectangle([0, h, w, w], fill=(176, 86, 48))
    for _ in range(rng.randint(5, 8)):
        x, y, r = rng.uniform(0, w), rng.uniform(h + 6, w), rng.uniform(3, 7)
        d.ellipse([x - r, y - r * 0.6, x + r, y + r * 0.6], fill=(105, 45, 30))


def _paint_studio(d: ImageDraw.ImageDraw, h: float, rng: random.Random) -> None:
    """The demo pictures' backdrop: a pastel sky and ground with a few darker blobs (make_demo_assets.py)."""
    w = SIZE * _SS
    sky, ground = DEMO_BACKDROPS[rng.randrange(len(DEMO_BACKDROPS))]
    d.rectangle([0, 0, w, w], fill=sky)
    d.rectangle([0, h, w, w], fill=ground)
    for _ in range(3):
        x, y, r = rng.uniform(0, w), rng.uniform(h, w), rng.uniform(3, 8)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(max(0, c - 40) for c in ground))


_PAINTERS: dict[str, Callable[[ImageDraw.ImageDraw, float, random.Random], None]] = {
    "beach": _paint_beach, "moon": _paint_moon, "snow": _paint_snow, "grass": _paint_grass, "city": _paint_city,
    "mars": _paint_mars, STUDIO: _paint_studio}


# ---------------------------------------------------------------- scenes

def _paint(background: str, horizon: int, detail_seed: int) -> Image.Image:
    if background not in _PAINTERS:
        raise ValueError(f"unknown background {background!r}; expected one of {sorted(_PAINTERS)}")
    canvas = Image.new("RGB", (SIZE * _SS, SIZE * _SS))
    _PAINTERS[background](ImageDraw.Draw(canvas), horizon * _SS, random.Random(detail_seed))
    return canvas


def render_place(background: str, horizon: int, detail_seed: int = 0) -> Image.Image:
    """The place alone, exactly as it is behind an object drawn with the same ``horizon`` and ``detail_seed``."""
    return _paint(background, horizon, detail_seed).reduce(_SS)


def _compose(background: str, horizon: int, detail_seed: int,
             draw_object: Callable[[ImageDraw.ImageDraw], None]) -> Rendered:
    """Paint the place, draw the object on its own layer (so its exact bounding box is known), downsample."""
    canvas = _paint(background, horizon, detail_seed)
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw_object(ImageDraw.Draw(layer))
    x0, y0, x1, y1 = layer.getbbox()
    canvas.paste(layer, (0, 0), layer)
    bbox = (x0 // _SS, y0 // _SS, min(SIZE, -(-x1 // _SS)), min(SIZE, -(-y1 // _SS)))
    return Rendered(canvas.reduce(_SS), bbox)


def render_scene(scene: Scene) -> Rendered:
    """The world picture of ``scene`` (a world object, never the demo subject) and the object's bounding box."""
    if scene.colour not in COLOURS or scene.size not in SIZES:
        raise ValueError(f"unknown colour or size in {scene}")
    return render_world_object(scene.kind, COLOURS[scene.colour], SIZES[scene.size], scene.background, scene.cx,
                               scene.base_y, scene.horizon, scene.detail_seed)


def render_world_object(kind: str, rgb: tuple[int, int, int], scale: float, background: str, cx: float,
                        base_y: float, horizon: int, detail_seed: int = 0) -> Rendered:
    """A world object of any colour and scale (:func:`render_scene` restricts both to the world's own values;
    the evaluator uses off-world ones as hard negatives)."""
    if kind not in _OBJECTS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")

    def draw_object(d: ImageDraw.ImageDraw) -> None:
        _OBJECTS[kind](d, cx * _SS, base_y * _SS, scale, rgb)
    return _compose(background, horizon, detail_seed, draw_object)


def render_demo_robot(background: str, cx: float, base_y: float, horizon: int, scale: float = SIZES["medium"],
                      tilt: int = 0, detail_seed: int = 0) -> Rendered:
    """The demo subject's design (:func:`draw_demo_robot`) standing at ``(cx, base_y)`` in a world place.

    ``scale`` is on the world's size scale (:data:`SIZES`): at 0.8 the robot is as tall as a medium world robot.
    """
    s = scale * 0.7  # the demo robot is 96*s px tall at 128 px; 0.7 makes it 34 px tall at 64 px for scale=1

    def draw_object(d: ImageDraw.ImageDraw) -> None:
        draw_demo_robot(d, cx * _SS, base_y * _SS - 46 * s, s, tilt)
    return _compose(background, horizon, detail_seed, draw_object)


def object_extent(kind: str, scale: float) -> tuple[float, float]:
    """``(half_width, height)`` of a world object in 64-px units; the demo robot's is that of ``"robot"``."""
    half_width, height = _EXTENT[kind]
    return half_width * scale, height * scale


def place_object(rng: random.Random, half_width: float, height: float) -> tuple[float, float, int]:
    """``(cx, base_y, horizon)`` for an object of the given extent (64-px units), wholly inside the frame."""
    horizon = rng.randint(26, 38)
    base_y = rng.uniform(max(horizon + 8, height + 2), SIZE - 3)
    cx = rng.uniform(half_width + 2, SIZE - half_width - 2)
    return cx, base_y, horizon


def sample_scene(rng: random.Random, kind: Optional[str] = None, background: Optional[str] = None,
                 held_out: Iterable[tuple[str, str]] = HELD_OUT_PAIRS,
                 places: Sequence[str] = BACKGROUNDS) -> Scene:
    """A uniformly random scene among the allowed (kind, background) pairs of ``places``; ``kind``/``background``
    pin one."""
    blocked = set(held_out)
    pairs = [(k, b) for k in KINDS for b in places
             if (k, b) not in blocked and kind in (None, k) and background in (None, b)]
    if not pairs:
        raise ValueError(f"no allowed scene with kind={kind!r}, background={background!r}")
    k, b = rng.choice(pairs)
    colour, size = rng.choice(list(COLOURS)), rng.choice(list(SIZES))
    cx, base_y, horizon = place_object(rng, *object_extent(k, SIZES[size]))
    return Scene(k, colour, size, b, round(cx, 2), round(base_y, 2), horizon, rng.getrandbits(32))


def caption(scene: Scene, form: CaptionForm = "full") -> str:
    """The caption of ``scene`` in one of the grammar's three forms (module docstring)."""
    if form == "full":
        return f"photo of a {scene.colour} {scene.kind} {PLACES[scene.background]}"
    if form == "kind_place":
        return f"photo of a {scene.kind} {PLACES[scene.background]}"
    if form == "class":
        return f"photo of a {scene.kind}"
    raise ValueError(f"unknown caption form {form!r}; expected one of {list(CAPTION_FORMS)}")


def background_of_prompt(prompt: str) -> Optional[str]:
    """The place a prompt asks for ("... on the moon" -> "moon"), or None if it names none."""
    found = [b for b, phrase in PLACES.items() if prompt.rstrip(" .").endswith(phrase)]
    return found[0] if found else None


# ---------------------------------------------------------------- a world on disk

def _choose_form(rng: random.Random) -> CaptionForm:
    return rng.choices(list(CAPTION_FORMS), weights=list(CAPTION_FORMS.values()))[0]


def _check_places(places: Sequence[str]) -> None:
    unknown = [b for b in places if b not in BACKGROUNDS]
    if unknown or not places:
        raise ValueError(f"unknown places {unknown or list(places)}; expected some of {list(BACKGROUNDS)}")


def world_records(count: int, seed: int, places: Sequence[str] = BACKGROUNDS) -> Iterator[tuple[dict, Image.Image]]:
    """``count`` (record, image) pairs of the world drawn from ``seed`` in ``places``; a record is one
    captions.jsonl line."""
    _check_places(places)
    rng = random.Random(seed)
    for i in range(count):
        scene = sample_scene(rng, places=places)
        form = _choose_form(rng)
        rendered = render_scene(scene)
        record = {"file": f"images/{i:06d}.png", "caption": caption(scene, form), "form": form, **asdict(scene),
                  "bbox": list(rendered.bbox)}
        yield record, rendered.image


def _hash_update(h: "hashlib._Hash", file: str, pixels: np.ndarray) -> None:
    h.update(file.encode())
    h.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())


def write_world(out: str | Path, count: int = 6000, seed: int = 0, places: Sequence[str] = BACKGROUNDS) -> dict:
    """Write ``out/images/NNNNNN.png``, ``out/captions.jsonl`` and ``out/manifest.json``; return the manifest.

    ``places`` narrows the world to some of :data:`BACKGROUNDS` (:data:`FIRST_PLACES`: the five-place world the
    rebuild's autoencoder starts on); its scenes are then exactly those the world had before the sixth place came.

    The manifest's ``data_hash`` is :func:`data_hash` of what was written: a sha256 over every image's name and
    decoded RGB pixels, then the bytes of captions.jsonl. It hashes pixels, not PNG bytes, so it does not change
    with the zlib build that compressed the files.
    """
    _check_places(places)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    h, lines = hashlib.sha256(), []
    for record, image in world_records(count, seed, places):
        image.save(out / record["file"])
        _hash_update(h, record["file"], np.asarray(image))
        lines.append(json.dumps(record, sort_keys=True))
    text = "".join(line + "\n" for line in lines).encode()
    (out / "captions.jsonl").write_bytes(text)
    h.update(text)
    manifest = {"generator": "ldm.data.toy_world", "seed": seed, "count": count, "size": SIZE,
                "places": list(places), "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS if p[1] in places],
                "caption_forms": CAPTION_FORMS, "data_hash": h.hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_records(root: str | Path) -> list[dict]:
    """The records of ``root/captions.jsonl``, in file order."""
    return [json.loads(line) for line in (Path(root) / "captions.jsonl").read_text().splitlines() if line]


def data_hash(root: str | Path) -> str:
    """Recompute the manifest's ``data_hash`` from the files under ``root`` (see :func:`write_world`)."""
    root, h = Path(root), hashlib.sha256()
    for record in read_records(root):
        with Image.open(root / record["file"]) as im:
            _hash_update(h, record["file"], np.asarray(im.convert("RGB")))
    h.update((root / "captions.jsonl").read_bytes())
    return h.hexdigest()


def scene_of(record: dict) -> Scene:
    """The :class:`Scene` a captions.jsonl record describes (``render_scene`` of it redraws the image)."""
    return Scene(**{k: record[k] for k in Scene.__dataclass_fields__})
