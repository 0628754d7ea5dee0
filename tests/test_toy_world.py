"""The toy world (ldm/data/toy_world.py) and its evaluator (ldm/eval/toy.py).

Independent checks: the shipped demo PNGs on disk, pixel colours (each place's sky, each named colour, the demo
robot's teal and orange), the caption grammar parsed here by a regular expression, files re-read from disk, and
for the classifier, ground truth rendered with other seeds (and through the world renderer, not the training one).
"""
from __future__ import annotations

import dataclasses
import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, load_script
from ldm.data import toy_world as tw
from ldm.eval import toy

CAPTION = re.compile(r"^photo of a (?:(red|blue|green|yellow|purple) )?(robot|cat|ball|house|tree)"
                     r"(?: (on the beach|on the moon|in the snow|on the grass|in the city at night|on mars))?$")
PHRASE_TO_PLACE = {"on the beach": "beach", "on the moon": "moon", "in the snow": "snow", "on the grass": "grass",
                   "in the city at night": "city", "on mars": "mars"}
# What each place's sky looks like (the painters' fill colours, read off the contact sheet).
SKY = {"beach": (140, 200, 240), "moon": (8, 8, 18), "snow": (212, 222, 234), "grass": (70, 140, 230),
       "city": (15, 20, 52), "mars": (222, 168, 98)}
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


def test_the_first_places_give_the_world_from_before_mars(tmp_path):
    """``places=FIRST_PLACES`` draws, scene for scene, the five-place world the code drew before the sixth place
    came (the hash below was written by that code, commit 6564c54, for 300 scenes of seed 5): the rebuild's
    stage-1 autoencoder trained on it. No scene is on mars; an unknown place is refused by name."""
    out = tw.write_world(tmp_path / "first", count=300, seed=5, places=tw.FIRST_PLACES)
    assert out["data_hash"] == "87fb61a6e8e28d685e5960d2ebd4b61429cf6ac0c692d9e69579d24972d5359f"
    assert out["places"] == list(tw.FIRST_PLACES) and ["robot", "mars"] not in out["held_out_pairs"]
    assert "mars" not in {r["background"] for r, _ in tw.world_records(300, 5, tw.FIRST_PLACES)}
    with pytest.raises(ValueError, match="venus"):
        tw.write_world(tmp_path / "bad", count=1, places=("beach", "venus"))


def test_held_out_pairs_never_appear_and_all_others_do():
    assert {("robot", "moon"), ("robot", "snow"), ("robot", "mars")} <= set(tw.HELD_OUT_PAIRS)
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
    script = load_script("make_demo_assets")
    for i in range(6):
        shipped = np.asarray(Image.open(REPO / f"assets/demo/subject/robot-{i:02d}.png").convert("RGB"))
        assert np.array_equal(np.asarray(script.draw_scene(i)), shipped)
        mask = np.asarray(Image.open(REPO / f"assets/demo/subject/robot-{i:02d}.mask.png"))
        assert np.array_equal(np.asarray(script.draw_mask(i)), mask)


def test_the_demo_masks_cover_the_robot_and_little_else():
    """Each shipped loss mask is white on every pixel where the photo differs from its backdrop alone (the robot),
    and covers at most a few pixels' margin more (the robot is a quarter of the picture or less)."""
    from PIL import ImageFilter
    script = load_script("make_demo_assets")
    for i in range(6):
        backdrop = script.draw_backdrop(i).filter(ImageFilter.SMOOTH)
        robot = (np.abs(np.asarray(script.draw_scene(i)).astype(int)
                        - np.asarray(backdrop).astype(int)).max(-1) > 24)
        mask = np.asarray(Image.open(REPO / f"assets/demo/subject/robot-{i:02d}.mask.png")) > 127
        assert robot.sum() > 1000 and mask[robot].all(), i
        assert mask.sum() < 1.5 * robot.sum() and mask.mean() < 0.3, (i, mask.sum(), robot.sum())


def test_cli_writes_the_folder(tmp_path):
    script = load_script("make_toy_world")
    script.main(["--out", str(tmp_path / "w"), "--count", "7", "--seed", "2"])
    assert sorted(p.name for p in (tmp_path / "w/images").iterdir()) == [f"{i:06d}.png" for i in range(7)]
    lines = (tmp_path / "w/captions.jsonl").read_text().splitlines()
    assert len(lines) == 7
    assert set(json.loads(lines[0])) >= {"file", "caption", "kind", "colour", "size", "background", "bbox"}
    script.main(["--out", str(tmp_path / "two"), "--count", "30", "--places", "snow", "mars"])
    assert {r["background"] for r in tw.read_records(tmp_path / "two")} == {"snow", "mars"}
    assert json.loads((tmp_path / "w/manifest.json").read_text())["data_hash"] == tw.data_hash(tmp_path / "w")


def test_background_of_prompt():
    assert tw.background_of_prompt("photo of a sks robot on the moon") == "moon"
    assert tw.background_of_prompt("photo of a robot in the city at night") == "city"
    assert tw.background_of_prompt("photo of a robot") is None


# ---------------------------------------------------------------- the evaluator

@pytest.fixture(scope="session")
def classifier():
    return toy.train_toy_classifier(seed=0, steps=800)  # ~40 s on one core (400 steps: kind 0.80 on renders)


def demo_and_world_robots(backgrounds, n_each: int, seed: int) -> tuple[list[Image.Image], list[Image.Image]]:
    rng = random.Random(seed)
    demo, world = [], []
    for _ in range(n_each):
        b, scale = rng.choice(backgrounds), rng.uniform(0.55, 1.45)
        cx, by, h = tw.place_object(rng, *tw.object_extent("robot", scale))
        demo.append(tw.render_demo_robot(b, cx, by, h, scale, rng.randint(-4, 4), rng.getrandbits(32)).image)
        world.append(tw.render_scene(tw.sample_scene(rng, kind="robot", background=rng.choice(backgrounds),
                                                     held_out=())).image)
    return demo, world


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    return float((pos[:, None] > neg[None, :]).float().mean())


def test_classifier_reads_background_and_kind_of_fresh_scenes(classifier):
    rng = random.Random(2024)
    scenes = [tw.sample_scene(rng, held_out=()) for _ in range(400)]
    p = toy.predict(classifier, [tw.render_scene(s).image for s in scenes])
    bg = [toy.PLACE_LABELS[i] for i in p["background"].argmax(1).tolist()]
    kind = [toy.KIND_LABELS[i] for i in p["kind"].argmax(1).tolist()]
    assert np.mean([b == s.background for b, s in zip(bg, scenes)]) >= 0.95
    assert np.mean([k == s.kind for k, s in zip(kind, scenes)]) >= 0.9


def test_classifier_separates_the_demo_robot_from_world_robots(classifier):
    demo, world = demo_and_world_robots(tw.BACKGROUNDS, 100, seed=77)
    pos, neg = toy.predict(classifier, demo)["subject"], toy.predict(classifier, world)["subject"]
    assert auc(pos, neg) >= 0.97
    assert (torch.cat([pos > 0.5, neg < 0.5]).float().mean()) >= 0.9
    # Held-out pairs: the places where DreamBooth must put a robot the world never showed there.
    demo, world = demo_and_world_robots(("moon", "snow"), 60, seed=78)
    pos, neg = toy.predict(classifier, demo)["subject"], toy.predict(classifier, world)["subject"]
    assert auc(pos, neg) >= 0.97
    assert (torch.cat([pos > 0.5, neg < 0.5]).float().mean()) >= 0.9
    assert toy.predict(classifier, demo)["kind"].argmax(1).eq(tw.KINDS.index("robot")).float().mean() >= 0.9


def test_classifier_finds_the_subject_in_the_shipped_pictures(classifier):
    """128 px, another backdrop, smoothed: the files DreamBooth is fine-tuned on."""
    shipped = [Image.open(REPO / f"assets/demo/subject/robot-{i:02d}.png") for i in range(6)]
    assert (toy.predict(classifier, shipped)["subject"] > 0.5).all()


def test_scores_and_prior_drift(classifier):
    demo, world = demo_and_world_robots(("moon",), 20, seed=5)
    s = toy.scores(demo, ["moon"] * 20, classifier, prompt_kinds=["robot"] * 20)
    assert s["subject_fidelity"] > 0.8 and s["prompt_fidelity"] >= 0.9 and s["kind_accuracy"] >= 0.9
    assert toy.scores(demo, ["beach"] * 20, classifier)["prompt_fidelity"] <= 0.1
    assert toy.scores(demo, [None] * 20, classifier)["prompt_fidelity"] is None
    assert toy.prior_drift(world, classifier) < 0.2 < 0.8 < toy.prior_drift(demo, classifier)
    with pytest.raises(ValueError):
        toy.scores(demo, ["moon"] * 3, classifier)


def test_tensor_and_pil_inputs_agree(classifier):
    demo, _ = demo_and_world_robots(("grass",), 4, seed=9)
    u8 = torch.from_numpy(np.stack([np.asarray(im) for im in demo])).permute(0, 3, 1, 2)
    from_pil = toy.predict(classifier, demo)["subject"]
    assert torch.allclose(toy.predict(classifier, u8)["subject"], from_pil)
    assert torch.allclose(toy.predict(classifier, u8.float() / 127.5 - 1)["subject"], from_pil, atol=1e-5)
    big = [im.resize((128, 128), Image.NEAREST) for im in demo]  # area-resizing undoes a 2x nearest upscale
    assert torch.allclose(toy.predict(classifier, big)["subject"], from_pil, atol=1e-5)


def test_training_is_deterministic_and_the_weights_round_trip(tmp_path):
    a, b = (toy.train_toy_classifier(seed=1, steps=3, batch_size=8, pool=64) for _ in range(2))
    c = toy.train_toy_classifier(seed=2, steps=3, batch_size=8, pool=64)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    path = toy.save_classifier(a, tmp_path / "toy.safetensors", seed=1, steps=3)
    assert path.stat().st_size < 1_000_000
    loaded = toy.load_classifier(path)
    x = torch.rand(2, 3, 64, 64)
    assert all(torch.equal(u, v) for u, v in zip(a(x), loaded(x)))


def test_render_accuracy_report(classifier):
    report = toy.render_accuracy(classifier, n=80, seed=31)
    assert min(report.values()) >= 0.9, report
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = toy.ToyClassifier().eval()
    assert toy.render_accuracy(untrained, n=80, seed=31)["background_acc"] < 0.6


def test_the_shipped_judge_reads_pink_washed_pictures():
    """Renders mixed 30 % with the pink an over-trained fine-tune paints: the shipped judge (trained on washed
    pictures) still names the place and tells the demo robot from world robots; the first judge, trained on clean
    renders only, loses the place (measured on 100 renders: shipped 1.00 and 0.995, first judge 0.74 and 0.93)."""
    from conftest import REPO
    shipped = toy.render_accuracy(toy.load_classifier(REPO / "assets/toy/classifier.safetensors"), n=100, seed=77,
                                  wash=0.3)
    assert shipped["background_acc"] >= 0.95 and shipped["subject_acc"] >= 0.97, shipped
    first = toy.render_accuracy(toy.load_classifier(REPO / "tests/data/toy-judge-v1.safetensors"), n=100, seed=77,
                                wash=0.3)
    assert first["background_acc"] < 0.85, first


def test_bare_places_and_world_robots_are_not_the_subject(classifier):
    """What the judge's subject head must never fire on: a place with nothing in it, or a world robot in any of
    the world's colours (flat teal pictures are a documented blind spot: see ldm/eval/toy.py)."""
    rng = random.Random(4)
    bare = [tw.render_place(rng.choice(tw.BACKGROUNDS), rng.randint(26, 38), rng.getrandbits(32)) for _ in range(40)]
    _, world = demo_and_world_robots(tw.BACKGROUNDS, 12, seed=4)
    assert (toy.predict(classifier, bare + world)["subject"] < 0.5).all()


def test_colour_drift_is_zero_for_the_same_pictures_and_sees_a_wash():
    """The total variation distance of pooled colour histograms: 0 for the same set, in [0, 1], small between two
    sets of the same prompt, and large for the same set washed pink (what the demo's class showed after a
    fine-tune while its prior drift stayed near 0)."""
    def robots(seed: int, n: int = 24) -> list:
        rng = random.Random(seed)
        return [tw.render_scene(tw.sample_scene(rng, kind="robot")).image for _ in range(n)]
    a, b = robots(1), robots(2)
    pink = [Image.blend(im.convert("RGB"), Image.new("RGB", im.size, (235, 160, 210)), 0.35) for im in a]
    assert toy.colour_drift(a, a) == 0.0
    assert toy.colour_drift(a, b) < 0.4 < 0.8 < toy.colour_drift(a, pink) <= 1.0
    assert toy.colour_drift(a, b) == pytest.approx(toy.colour_drift(b, a))
    assert float(toy.colour_histogram(a).sum()) == pytest.approx(1.0)
    # by hand: one white and one black picture against two white ones share half their pixels' cells
    white, black = Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), "black")
    assert toy.colour_drift([white, black], [white, white]) == pytest.approx(0.5)


def test_the_judge_says_what_a_person_says_of_generated_pictures(classifier):
    """tests/data/toy-labelled: 50 generated pictures labelled by a person: from the first toy model, an overfit demo
    fine-tune that drew the photos' pink studio backdrop instead of the asked place, and "photo of a robot" from the
    rebuilt model's demo fine-tunes with and without prior preservation (washed pink where the subject leaked in).
    The judge agrees on the place of those a person could name ("no place" included), on the kind (or "nothing")
    and on whether the demo robot is drawn. The first judge (tests/data/toy-judge-v1.safetensors), which had no
    "no place" answer and never saw a washed picture, called the studio backdrop "snow", "beach" or "city" and
    missed the subject in the washed pictures (measured: place 0.51, subject 0.23). This test's 800-step judge
    (six places) with seeds 0 / 1 / 2: place 0.74 / 0.86 / 0.84, kind 0.88 / 0.92 / 0.88, subject 9 / 8 / 9 of 13;
    the shipped 1500-step judge 0.81, 0.96 and 9 of 13. Whether a washed, blotchy picture shows the demo robot is
    the judge's weakest answer, hence the lower subject threshold."""
    from conftest import REPO
    folder = REPO / "tests/data/toy-labelled"
    agreement = toy.labelled_agreement(classifier, folder)
    assert (agreement["place_labelled"], agreement["kind_labelled"], agreement["subject_labelled"]) == (43, 24, 13)
    assert agreement["place_agreement"] >= 0.7 and agreement["kind_agreement"] >= 0.8, agreement
    assert agreement["subject_agreement"] >= 0.5, agreement
    first = toy.labelled_agreement(toy.load_classifier(REPO / "tests/data/toy-judge-v1.safetensors"), folder)
    assert first["place_agreement"] < 0.65 and first["subject_agreement"] < 0.5, first


def test_colour_scores_read_the_asked_colour_kind_and_place(classifier, monkeypatch):
    """ldm.eval.toy_model.colour_scores with a stand-in model that draws exactly what each prompt asks (a render of
    that colour, kind and place): every (colour, kind) pair is asked and read back; drawn one colour further along
    instead, the colour is never right; a judge without a colour head is refused."""
    import ldm.eval.toy_model as tm

    def drawing(shift: int):
        def draw(model, prompts, seed, **kw):
            rng, out = random.Random(seed), []
            for prompt in prompts:
                words = prompt.split()
                colour, kind = words[3], words[4]
                place = tw.background_of_prompt(prompt)
                colour = toy.COLOUR_LABELS[(toy.COLOUR_LABELS.index(colour) + shift) % len(toy.COLOUR_LABELS)]
                scene = tw.sample_scene(rng, kind=kind, background=place, held_out=())
                scene = tw.Scene(kind, colour, "large", place, scene.cx, scene.base_y, scene.horizon, scene.detail_seed)
                out.append(np.asarray(tw.render_scene(scene).image))
            return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return draw
    monkeypatch.setattr(tm, "sample", drawing(0))
    right = tm.colour_scores(None, classifier, per_pair=1)
    assert right["images"] == len(toy.COLOUR_LABELS) * len(tw.KINDS)
    assert right["colour_accuracy"] >= 0.95 and right["all_three_accuracy"] >= 0.85, right
    monkeypatch.setattr(tm, "sample", drawing(1))
    assert tm.colour_scores(None, classifier, per_pair=1)["colour_accuracy"] <= 0.05
    with pytest.raises(ValueError, match="colour head"):
        tm.colour_scores(None, toy.ToyClassifier(places=5, kinds=5, colours=0))


def test_demo_photos_in_world_places(tmp_path):
    """The demo's photos (``assets/demo/in-world``, as ``make_demo_assets.py --in_world`` draws them again): six
    photos of the demo design where the world has robots, which the shipped judge reads as the subject in the place
    its caption names, each with a mask that covers every pixel of the robot's teal and orange (found here by colour
    on the photo on disk) and not much more."""
    from ldm.eval.toy_model import TOY_CLASSIFIER
    shipped = REPO / "assets/demo/in-world"
    load_script("make_demo_assets").main(["--in_world", str(tmp_path)])
    names = sorted(q.name for q in shipped.iterdir())
    assert names == sorted(q.name for q in tmp_path.iterdir()) and len(names) == 18
    for name in names:
        drawn, on_disk = tmp_path / name, shipped / name
        if name.endswith(".txt"):
            assert drawn.read_text() == on_disk.read_text(), name
        else:
            assert np.array_equal(np.asarray(Image.open(drawn)), np.asarray(Image.open(on_disk))), name
    photos = [Image.open(shipped / f"robot-{i:02d}.png").convert("RGB") for i in range(6)]
    masks = [np.asarray(Image.open(shipped / f"robot-{i:02d}.mask.png")) > 127 for i in range(6)]
    p = toy.predict(toy.load_classifier(TOY_CLASSIFIER), photos)
    places = [tw.BACKGROUNDS[int(k)] for k in p["background"].argmax(1)]
    assert places == ["beach", "grass", "city", "beach", "grass", "city"]
    captions = [(shipped / f"robot-{i:02d}.txt").read_text().strip() for i in range(6)]
    assert [PHRASE_TO_PLACE[c.removeprefix("photo of a sks robot ")] for c in captions] == places
    assert bool((p["subject"] > 0.5).all()), p["subject"]
    for photo, mask in zip(photos, masks):
        a = np.asarray(photo)
        marks = sum(near(a, c) for c in DEMO_TEAL) + near(a, DEMO_ORANGE)
        assert marks.sum() >= 14 and mask[marks > 0].all()
        assert mask.sum() < 0.25 * mask.size and mask.sum() < 4 * marks.sum()
