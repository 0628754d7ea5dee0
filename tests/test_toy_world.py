"""The toy world (ldm/data/toy_world.py) and its evaluator (ldm/eval/toy.py).

Independent checks: the shipped demo PNGs on disk, pixel colours (each place's sky, each named colour, the demo
robot's teal and orange), the caption grammar parsed here by a regular expression, files re-read from disk, and
for the classifier, ground truth rendered with other seeds (and through the world renderer, not the training one).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from ldm.data import toy_world as tw

CAPTION = re.compile(r"^photo of a (?:(red|blue|green|yellow|purple) )?(robot|cat|ball|house|tree)"
                     r"(?: (on the beach|on the moon|in the snow|on the grass|in the city at night))?$")
PHRASE_TO_PLACE = {"on the beach": "beach", "on the moon": "moon", "in the snow": "snow", "on the grass": "grass",
                   "in the city at night": "city"}
# What each place's sky looks like (the painters' fill colours, read off the contact sheet).
SKY = {"beach": (140, 200, 240), "moon": (8, 8, 18), "snow": (212, 222, 234), "grass": (70, 140, 230),
       "city": (15, 20, 52)}
DEMO_TEAL, DEMO_ORANGE = [(40, 150, 150), (60, 180, 175)], (245, 140, 40)


def near(a: np.ndarray, rgb: tuple, tol: int = 25) -> np.ndarray:
    return np.abs(a.astype(np.int32) - np.array(rgb)).max(-1) <= tol


def demo_marks(img: Image.Image) -> tuple[int, int]:
    """(teal pixels, orange pixels): the demo robot's body and chest dial colours."""
    a = np.asarray(img)
    return int(sum(near(a, c).sum() for c in DEMO_TEAL)), int(near(a, DEMO_ORANGE).sum())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, tw.write_world(out, count=300, seed=5)


def test_same_seed_same_bytes_other_seed_other_world(world, tmp_path):
    out, manifest = world
    again = tw.write_world(tmp_path / "again", count=300, seed=5)
    assert again["data_hash"] == manifest["data_hash"]
    for name in ("captions.jsonl", "manifest.json", "images/000000.png", "images/000299.png"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    other = tw.write_world(tmp_path / "other", count=300, seed=6)
    assert other["data_hash"] != manifest["data_hash"]
    assert (tmp_path / "other/images/000000.png").read_bytes() != (out / "images/000000.png").read_bytes()


def test_manifest_hash_is_the_hash_of_the_files_on_disk(world, tmp_path):
    out, manifest = world
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["seed"] == 5 and on_disk["count"] == 300 and on_disk["size"] == 64
    assert [tuple(p) for p in on_disk["held_out_pairs"]] == list(tw.HELD_OUT_PAIRS)
    assert tw.data_hash(out) == manifest["data_hash"]
    copy = tmp_path / "copy"
    (copy / "images").mkdir(parents=True)
    (copy / "captions.jsonl").write_bytes((out / "captions.jsonl").read_bytes())
    for i in range(300):
        a = np.asarray(Image.open(out / f"images/{i:06d}.png")).copy()
        if i == 123:
            a[10, 10, 0] ^= 1  # one bit of one pixel
        Image.fromarray(a).save(copy / f"images/{i:06d}.png")
    assert tw.data_hash(copy) != manifest["data_hash"]


def test_held_out_pairs_never_appear_and_all_others_do():
    assert {("robot", "moon"), ("robot", "snow")} <= set(tw.HELD_OUT_PAIRS)
    rng = random.Random(0)
    seen = {(s.kind, s.background) for s in (tw.sample_scene(rng) for _ in range(5000))}
    allowed = {(k, b) for k in tw.KINDS for b in tw.BACKGROUNDS} - set(tw.HELD_OUT_PAIRS)
    assert seen == allowed
    records = [r for r, _ in tw.world_records(1000, seed=11)]
    pairs = {(r["kind"], r["background"]) for r in records}
    assert not pairs & set(tw.HELD_OUT_PAIRS)
    for r in records:  # not even in the words: no caption puts a robot on the moon
        m = CAPTION.match(r["caption"])
        if m.group(3):
            assert (m.group(2), PHRASE_TO_PLACE[m.group(3)]) not in tw.HELD_OUT_PAIRS


def test_captions_and_pictures_match_the_attributes(world):
    out, _ = world
    records = tw.read_records(out)
    assert len(records) == 300 and {r["form"] for r in records} == {"full", "kind_place", "class"}
    for r in records:
        m = CAPTION.match(r["caption"])
        assert m, r["caption"]
        colour, kind, phrase = m.groups()
        assert kind == r["kind"]
        assert colour == (r["colour"] if r["form"] == "full" else None)
        assert (PHRASE_TO_PLACE[phrase] if phrase else None) == (None if r["form"] == "class" else r["background"])
        img = Image.open(out / r["file"]).convert("RGB")
        a = np.asarray(img)
        assert img.size == (64, 64)
        sky = np.median(a[:3].reshape(-1, 3), axis=0)
        assert np.abs(sky - SKY[r["background"]]).max() <= 12, (r["file"], r["background"], sky)
        object_pixels = a[object_mask(tw.scene_of(r))]
        counts = {c: int(near(object_pixels, rgb, 30).sum()) for c, rgb in tw.COLOURS.items()}
        assert max(counts, key=counts.get) == r["colour"], (r["file"], counts)
        assert np.array_equal(a, np.asarray(tw.render_scene(tw.scene_of(r)).image))


def object_mask(scene: tw.Scene) -> np.ndarray:
    """The pixels where the scene differs from its place drawn alone: the object's footprint."""
    a = np.asarray(tw.render_scene(scene).image, dtype=np.int32)
    place = np.asarray(tw.render_place(scene.background, scene.horizon, scene.detail_seed), dtype=np.int32)
    return (a != place).any(-1)


def test_bbox_is_the_objects_footprint(world):
    out, _ = world
    for r in tw.read_records(out)[:100]:
        ys, xs = np.nonzero(object_mask(tw.scene_of(r)))
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], r["file"]


def test_objects_are_the_same_in_every_place():
    """The object is drawn over the place, not blended into it: away from its anti-aliased edge, its pixels do
    not depend on the place (so a place can be changed without changing what the caption describes)."""
    rng = random.Random(8)
    for _ in range(30):
        s = tw.sample_scene(rng, held_out=())
        renders = [np.asarray(tw.render_scene(dataclasses.replace(s, background=b)).image) for b in tw.BACKGROUNDS]
        masks = [object_mask(dataclasses.replace(s, background=b)) for b in tw.BACKGROUNDS]
        core = np.logical_and.reduce([(r == renders[0]).all(-1) for r in renders])
        footprint = np.logical_or.reduce(masks)
        assert core.sum() >= 0.4 * footprint.sum() and not (core & ~footprint).any()


def test_the_demo_design_never_appears_in_the_world():
    rng = random.Random(3)
    for _ in range(600):  # every pair, held-out ones too, every colour and size
        teal, orange = demo_marks(tw.render_scene(tw.sample_scene(rng, held_out=())).image)
        assert teal < 8 and orange < 2
    for b in tw.BACKGROUNDS:
        for scale in (tw.SIZES["small"], tw.SIZES["large"]):
            cx, by, h = tw.place_object(rng, *tw.object_extent("robot", scale))
            teal, orange = demo_marks(tw.render_demo_robot(b, cx, by, h, scale, detail_seed=1).image)
            assert teal >= 12 and orange >= 2


def test_regenerated_demo_assets_equal_the_shipped_ones():
    spec = importlib.util.spec_from_file_location("make_demo_assets", REPO / "scripts/make_demo_assets.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for i in range(6):
        shipped = np.asarray(Image.open(REPO / f"assets/demo/subject/robot-{i:02d}.png").convert("RGB"))
        assert np.array_equal(np.asarray(script.draw_scene(i)), shipped)


def test_cli_writes_the_folder(tmp_path):
    spec = importlib.util.spec_from_file_location("make_toy_world", REPO / "scripts/make_toy_world.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out", str(tmp_path / "w"), "--count", "7", "--seed", "2"])
    assert sorted(p.name for p in (tmp_path / "w/images").iterdir()) == [f"{i:06d}.png" for i in range(7)]
    lines = (tmp_path / "w/captions.jsonl").read_text().splitlines()
    assert len(lines) == 7
    assert set(json.loads(lines[0])) >= {"file", "caption", "kind", "colour", "size", "background", "bbox"}
    assert json.loads((tmp_path / "w/manifest.json").read_text())["data_hash"] == tw.data_hash(tmp_path / "w")


def test_background_of_prompt():
    assert tw.background_of_prompt("photo of a sks robot on the moon") == "moon"
    assert tw.background_of_prompt("photo of a robot in the city at night") == "city"
    assert tw.background_of_prompt("photo of a robot") is None
