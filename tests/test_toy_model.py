"""The shipped toy model (assets/toy/): its manifest, the world it was trained on, and the DreamBooth effect a short
fine-tune on the demo robot has on it, measured with the toy judge (ldm/eval/toy_model.py).

The margins were measured with this file's own fine-tune (the demo's recipe: the six photos in world places, masked
loss, EMA, the prior from the base model's prediction; 300 steps, 6 pictures per held-out place (the moon, the
snow, mars), DDIM 25 at guidance 3) over seeds 0, 1, 2 on the development machine, with the shipped six-place
model and judge:

    the recipe:                 subject fidelity 0.79 / 0.97 / 0.78, prompt fidelity 0.94 / 0.94 / 0.89,
                                prior drift 0.014 / 0.019 / 0.060, colour drift 0.42 / 0.42 / 0.63
    without prior preservation: subject fidelity 0.15 / 0.27 / 0.24, prompt fidelity 0.78 / 0.94 / 0.89,
                                prior drift 0.28 / 0.35 / 0.17 (higher than with it by 0.26 / 0.33 / 0.11),
                                colour drift 0.60 / 0.57 / 0.61
    controls (seed 0):          identifier not in the captions: subject fidelity 0.48 (prompt fidelity 0.89,
                                prior drift 0.018); learning rate 1e-12: subject fidelity 0.001
    base model:                 subject fidelity 0.001, prompt fidelity 0.94, prior drift 0.002

So the subject threshold (0.6 above the base model) sits below every recipe run (by 0.17 at the least) and above
both controls (by 0.12 over the fine-tune without the identifier: with the six-place model the subject leaks into
"photo of a robot on the beach" and the like, which the base-model prior does not guard, so "sks robot on the
moon" draws it half the time without any identifier; the five-place model drew it 0.007 of the time), the
prior-drift threshold (0.1) above every recipe run and below every run without preservation, and the rise of the
prior drift without preservation (0.1) below the smallest measured (seed 2's 0.11, the tightest margin; this test
runs seed 0: 0.26). The colour drift alone did not separate them on seed 2 (0.63 with the prior, 0.61
without), so the test asks only that the class drift, prior and colour drift together, is higher without.
"""
from __future__ import annotations

import pytest

from toy_helpers import (MANIFEST, TOY, base_scores, class_drift, dreambooth_effect, finetune, judge,  # noqa: F401
                         scores, sha256)


def test_shipped_files_match_the_manifest():
    model, classifier = TOY / MANIFEST["model"], TOY / MANIFEST["classifier"]
    assert sha256(model) == MANIFEST["sha256"] and model.stat().st_size <= 22_000_000  # "about 20 MB" (float16)
    assert sha256(classifier) == MANIFEST["classifier_sha256"]


def test_both_worlds_regenerate_with_the_manifests_hashes(tmp_path):
    """The six-place world the LDM trained on and the five-place first world the autoencoder started on (~40 s)."""
    from ldm.data.toy_world import write_world
    for key in ("world", "first_world"):
        world = MANIFEST[key]
        made = write_world(tmp_path / key, world["count"], world["seed"], tuple(world["places"]))
        assert made["data_hash"] == world["data_hash"], key


@pytest.fixture(scope="module")
def recipe_scores(tmp_path_factory, judge):
    return scores(finetune(tmp_path_factory.mktemp("db")), judge)


def test_dreambooth_puts_the_subject_in_held_out_places(base_scores, recipe_scores):
    assert base_scores["subject_fidelity"] < 0.01  # the toy world has no such robot
    assert dreambooth_effect(base_scores, recipe_scores), (base_scores, recipe_scores)


def test_without_prior_preservation_the_class_drifts_more(tmp_path_factory, judge, base_scores, recipe_scores):
    without = scores(finetune(tmp_path_factory.mktemp("np"), prior=False), judge)
    assert without["prior_drift"] > recipe_scores["prior_drift"] + 0.1, (recipe_scores, without)
    assert class_drift(without) > class_drift(recipe_scores), (recipe_scores, without)
    assert not dreambooth_effect(base_scores, without), without  # the class turned into the subject


@pytest.mark.parametrize("sampler", ["ddim", "plms", "euler", "dpmpp_2m"])
def test_every_sampler_draws_what_the_shipped_model_learned(judge, sampler):
    """A sampler test that needs a model which has learned something: with the pretrained toy model, each sampler
    draws the asked place and kind (a sampler that mis-scales the noise, skips guidance or steps the wrong way
    gives noise or the unconditional picture, which the judge reads as neither). 20 steps, guidance 4."""
    from ldm.data import toy_world as tw
    from ldm.eval.toy import KIND_LABELS, PLACE_LABELS, predict
    from ldm.eval.toy_model import load_toy_model, sample
    pairs = [("ball", "beach"), ("house", "snow"), ("cat", "grass"), ("tree", "city")] * 2
    images = sample(load_toy_model(), [f"photo of a {k} {tw.PLACES[b]}" for k, b in pairs], seed=5, steps=20,
                    sampler=sampler)
    p = predict(judge, images)
    places = [PLACE_LABELS[int(i)] for i in p["background"].argmax(1)]
    kinds = [KIND_LABELS[int(i)] for i in p["kind"].argmax(1)]
    assert sum(b == want for b, (_, want) in zip(places, pairs)) >= 7, (sampler, places)
    assert sum(k == want for k, (want, _) in zip(kinds, pairs)) >= 4, (sampler, kinds)


def test_the_demo_reports_colour_drift_against_the_base_model(judge, tmp_path):
    """With the base model given, the scores carry the class pictures' colour drift from it: exactly 0 for the
    base model itself (same seed, same pictures) and above 0 between two of its seeds (the reading's yardstick);
    the demo's figure prints both."""
    import json

    from PIL import Image

    from conftest import load_script
    from ldm.eval.toy_model import dreambooth_scores, load_toy_model
    model = load_toy_model()
    s = dreambooth_scores(model, judge, per_place=2, base=model)
    assert s["colour_drift"] == 0.0 and 0 < s["colour_drift_base_seeds"] <= 1
    demo = load_script("demo")
    path = demo.draw_figure({"training photos": None}, tmp_path / "f.png", {"before": s, "after": s})
    assert json.loads(Image.open(path).text["scores"])["after"]["colour_drift_base_seeds"] == \
        s["colour_drift_base_seeds"]


def test_the_prior_comparison_tables_every_way_over_its_seeds_and_keeps_finished_runs(tmp_path, monkeypatch):
    """scripts/compare_priors.py: a way's finished runs (their scores.json) are read, not run again; the table has
    one row per way with the mean and the sample standard deviation over its seeds."""
    import json
    import subprocess

    from conftest import load_script
    compare = load_script("compare_priors")
    for way, values in {"class_images": (0.5, 0.7), "none": (0.25, 0.25)}.items():
        for seed, v in enumerate(values):
            after = {"subject_fidelity": v, "prompt_fidelity": 1 - v, "prior_drift": v / 10, "colour_drift": 0.2,
                     "colour_drift_base_seeds": 0.1}
            (tmp_path / f"{way}-seed{seed}").mkdir()
            (tmp_path / f"{way}-seed{seed}" / "scores.json").write_text(json.dumps({"after": after, "seconds": 90}))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}: the scores were there"))
    assert compare.main(["--out", str(tmp_path), "--seeds", "0", "1", "--ways", "class_images", "none"]) == 0
    rows = (tmp_path / "priors.md").read_text().splitlines()
    assert len(rows) == 4
    assert rows[2].startswith("| class images (the paper's) | 2 | 0.60 ± 0.14 | 0.40 ± 0.14 | 0.06 ± 0.01 |")
    assert rows[3].startswith("| no prior preservation | 2 | 0.25 ± 0.00 | 0.75 ± 0.00 | 0.03 ± 0.00 |")
    assert rows[3].endswith("| 0.20 ± 0.00 | 0.10 ± 0.00 | 90 |")


def rendered(place: str, subject: bool, n: int, seed: int):
    """``n`` renders (float, [-1, 1], as the decoder gives them) of the demo robot, or of a red world robot, at
    ``place``."""
    import random

    import numpy as np
    import torch

    from ldm.data import toy_world as tw
    rng, out = random.Random(seed), []
    for _ in range(n):
        cx, base_y, horizon = tw.place_object(rng, *tw.object_extent("robot", 1.0))
        r = (tw.render_demo_robot(place, cx, base_y, horizon, 1.0, 0, rng.getrandbits(32)) if subject else
             tw.render_world_object("robot", tw.COLOURS["red"], 1.0, place, cx, base_y, horizon, rng.getrandbits(32)))
        out.append(np.asarray(r.image))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_validation_with_the_toy_judge_scores_subject_place_and_class(judge):
    """lightning.validation.judge: the subject rows' pictures scored for the subject and for the place their
    prompt names, the class row's for how much they look like the subject. Renders with a known answer: the demo
    robot on the moon for the moon prompt, on the beach for the snow prompt (the place wrong), world robots for
    the class."""
    from types import SimpleNamespace

    from ldm.eval.toy_model import TOY_CLASSIFIER
    from ldm.training.validation import ValidationMetrics
    v = ValidationMetrics(1, prompts=["photo of a {token} {class_word} on the moon",
                                      "photo of a {token} {class_word} in the snow"],
                          judge=str(TOY_CLASSIFIER), class_prompt="photo of a {class_word}")
    data = SimpleNamespace(concepts=[SimpleNamespace(token="sks", class_word="robot")])
    images = {"photo of a sks robot on the moon": rendered("moon", True, 6, 0),
              "photo of a sks robot in the snow": rendered("beach", True, 6, 1),
              "photo of a robot": rendered("grass", False, 6, 2)}
    assert list(v.prompts_for(data)) == list(images)
    s = v.score(images, v.prompts_for(data), data)
    assert s["subject fidelity"] > 0.8 and s["prompt fidelity"] == 0.5 and s["prior drift"] < 0.2, s


def test_a_toy_run_validated_by_the_judge_writes_its_metrics(tmp_path):
    """configs/toy/validation.yaml through main.py: every validation scored by the judge, metrics.md with its
    rule in the judge's words; a judge file that is not there is one line before any model loads."""
    import json

    import main as main_module
    from conftest import REPO
    from ldm.eval.toy_model import TOY_MODEL
    args = ["--base", str(REPO / "configs/toy/dreambooth.yaml"), str(REPO / "configs/toy/validation.yaml"), "-t",
            "--actual_resume", str(TOY_MODEL), "-n", "val", "--logdir", str(tmp_path / "logs"), "--data_root",
            str(REPO / "assets/demo/subject"), "--class_word", "robot", "--max_steps", "2",
            "lightning.validation.every_n_steps=2", "lightning.validation.num_images=2",
            "lightning.validation.ddim_steps=3",
            f"lightning.validation.judge={REPO / 'assets/toy/classifier.safetensors'}"]
    with pytest.raises(SystemExit) as info:
        main_module.main(args[:-1] + [f"lightning.validation.judge={tmp_path / 'nope.safetensors'}"])
    assert info.value.code == 2 and not (tmp_path / "logs").exists()
    assert main_module.main(args) == 0
    (run,) = (tmp_path / "logs").iterdir()
    history = json.loads((run / "validation.json").read_text())
    assert [h["step"] for h in history] == [0, 2]
    assert all(0 <= h[k] <= 1 for h in history for k in ("subject fidelity", "prompt fidelity", "prior drift"))
    report = (run / "metrics.md").read_text()
    assert "the highest subject fidelity + prompt fidelity among the validated steps whose prior drift" in report
    assert (run / "metrics.png").is_file() and (run / "images" / "val" / "step-000002.png").is_file()
