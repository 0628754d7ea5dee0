"""The evaluation protocol end to end: scripts/evaluate.py on a constructed samples folder, generation against
scripts/stable_txt2img.py, and scripts/reproduce_paper.py on two real subjects with the tiny model (CPU).

The metric values are checked where they have a closed form (generated images identical to the one real photo
give DINO = CLIP-I = PRES = 1 and DIV = 0); elsewhere only that they exist, are finite and are reproducible.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY_CONFIG, load_script
from eval_helpers import make_clip_folder, make_dino_folder, make_lpips_files, noise_image

import ldm.eval.run as run_module
from ldm.eval.dataset import prompts_for, real_images, subjects
from ldm.eval.run import METRICS, SamplingSettings, generate_for_subject

DATASET = REPO.parent / "shared" / "datasets" / "dreambooth"
PAPER_NUMBERS = ("0.668", "0.803", "0.305", "0.774", "0.885")



@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``--clip/--dino/--lpips`` flags for tiny random models in the real downloads' file layouts."""
    root = tmp_path_factory.mktemp("eval_models")
    folder, _ = make_lpips_files(root / "lpips", lin_name="alex.pth")
    return ["--clip", str(make_clip_folder(root / "clip")), "--dino", str(make_dino_folder(root / "dino")),
            "--lpips", str(folder)]


PROMPTS_FILE = """Classes

subject_name,class
toy_a,toy
kitty,cat

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token)
]
"""


@pytest.fixture()
def fake_dataset(tmp_path: Path) -> Path:
    """Two subjects: toy_a with a single photo, kitty with two."""
    root = tmp_path / "dreambooth" / "dataset"
    root.mkdir(parents=True)
    (root / "prompts_and_classes.txt").write_text(PROMPTS_FILE)
    for name, n in (("toy_a", 1), ("kitty", 2)):
        (root / name).mkdir()
        for i in range(n):
            noise_image(10 * len(name) + i, (80, 72)).save(root / name / f"{i:02d}.png")
    return root.parent


def write_samples(dataset: Path, samples: Path) -> None:
    """toy_a: every generated and class-prior image is its one photo, as the training loader crops it;
    kitty: noise images. 2 prompts x 2 images and 2 class-prior images each."""
    toy, kitty = subjects(dataset)
    photo = real_images(toy, 64)[0]
    for sub, image_for in ((toy, lambda k: photo), (kitty, lambda k: noise_image(100 + k, (64, 64)))):
        for k, folder in enumerate(["00/00", "00/01", "01/00", "01/01", "class_prior/00", "class_prior/01"]):
            path = samples / sub.name / f"{folder}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image_for(k).save(path)


def test_evaluate_samples_closed_forms_table_and_resume(fake_dataset, models, tmp_path, monkeypatch):
    evaluate = load_script("evaluate")
    samples, out = tmp_path / "samples", tmp_path / "out"
    write_samples(fake_dataset, samples)
    calls = []
    real_evaluate_subject = run_module.evaluate_subject
    monkeypatch.setattr(run_module, "evaluate_subject", lambda s, *a, **k: calls.append(s.name)
                        or real_evaluate_subject(s, *a, **k))
    args = ["--samples", str(samples), "--dataset", str(fake_dataset), "--out", str(out), "--size", "64", *models]
    evaluate.main(args)
    assert calls == ["toy_a", "kitty"]
    report = json.loads((out / "metrics.json").read_text())
    toy, kitty = report["subjects"]["toy_a"]["metrics"], report["subjects"]["kitty"]["metrics"]
    # Generated == real (one photo): every similarity is 1 and no two images of a prompt differ.
    assert toy["DINO"] == pytest.approx(1.0, abs=1e-5) and toy["CLIP-I"] == pytest.approx(1.0, abs=1e-5)
    assert toy["PRES"] == pytest.approx(1.0, abs=1e-5) and toy["DIV"] == pytest.approx(0.0, abs=1e-7)
    assert all(math.isfinite(kitty[m]) for m in METRICS) and kitty["DIV"] > 0 and kitty["DINO"] < 0.999
    for metric in METRICS:
        assert report["mean"][metric] == pytest.approx((toy[metric] + kitty[metric]) / 2)
    table = (out / "metrics.md").read_text()
    assert all(number in table for number in PAPER_NUMBERS) and "Imagen" in table
    assert "| kitty | cat |" in table and f"{report['mean']['DINO']:.3f}" in table
    assert sorted(p.name for p in (out / "subjects").iterdir()) == ["kitty.json", "toy_a.json"]

    # Again: nothing is scored and no model is loaded; the report is the same.
    loads = []
    monkeypatch.setattr(run_module.Embedders, "load", lambda self: loads.append(1) or self)
    evaluate.main(args)
    assert calls == ["toy_a", "kitty"] and loads == []
    assert json.loads((out / "metrics.json").read_text())["subjects"] == report["subjects"]
    # A new image for kitty makes its cache stale: kitty alone is scored again.
    monkeypatch.undo()
    monkeypatch.setattr(run_module, "evaluate_subject", lambda s, *a, **k: calls.append(s.name)
                        or real_evaluate_subject(s, *a, **k))
    noise_image(7, (64, 64)).save(samples / "kitty" / "01" / "02.png")
    evaluate.main(args)
    assert calls == ["toy_a", "kitty", "kitty"]


def test_missing_model_files_are_one_line(fake_dataset, models, tmp_path, capsys):
    write_samples(fake_dataset, tmp_path / "samples")
    flags = models[:2] + ["--dino", str(tmp_path / "no-dino")] + models[4:]
    with pytest.raises(SystemExit) as info:
        load_script("evaluate").main(["--samples", str(tmp_path / "samples"), "--dataset", str(fake_dataset),
                                 "--out", str(tmp_path / "out"), *flags])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bar for CLIP
    assert info.value.code == 2 and ": error: DINO model folder " in last
    assert "no-dino: folder not found; download all files of huggingface.co/facebook/dino-vits16" in last


def test_evaluate_generates_from_a_checkpoint(tiny_ckpt, fake_dataset, models, tmp_path, capsys):
    evaluate = load_script("evaluate")
    args = ["--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG), "--dataset", str(fake_dataset), "--out",
            str(tmp_path / "out"), "--prompts", "1", "--images_per_prompt", "2", "--prior_images", "1",
            "--ddim_steps", "4", "--size", "64", "--device", "cpu", *models]
    with pytest.raises(SystemExit):
        evaluate.main(args)  # --ckpt is one subject's checkpoint: which one must be said
    assert "--ckpt scores one subject" in capsys.readouterr().err
    results = evaluate.main(args + ["--subjects", "kitty"])
    files = sorted(p.relative_to(tmp_path / "out" / "samples").as_posix()
                   for p in (tmp_path / "out" / "samples").rglob("*.png"))
    assert files == ["kitty/00/00.png", "kitty/00/01.png", "kitty/class_prior/00.png"]
    assert all(math.isfinite(results["kitty"]["metrics"][m]) for m in METRICS)
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["settings"]["ddim_steps"] == 4 and list(report["subjects"]) == ["kitty"]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generation_matches_txt2img_and_resumes(tiny_model, tiny_ckpt, fake_dataset, tmp_path):
    """Prompt NN's images equal stable_txt2img.py's with --seed seed+NN; a deleted image comes back the same."""
    kitty = subjects(fake_dataset)[1]
    settings = SamplingSettings(images_per_prompt=2, prompts=2, ddim_steps=4, scale=5.0, seed=3, size=64,
                                prior_images=1)
    out = tmp_path / "kitty"
    written = generate_for_subject(tiny_model, kitty, out, "sks", settings)
    assert sorted(p.relative_to(out).as_posix() for p in written) == [
        "00/00.png", "00/01.png", "01/00.png", "01/01.png", "class_prior/00.png"]
    assert Image.open(out / "01" / "00.png").text["prompt"] == "a sks cat in the snow"
    assert Image.open(out / "class_prior" / "00.png").text["prompt"] == "a cat"
    reference = load_script("stable_txt2img").main([
        "--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path / "txt2img"), "--H", "64",
        "--W", "64", "--ddim_steps", "4", "--n_samples", "2", "--n_iter", "1", "--scale", "5", "--seed", "4",
        "--prompt", prompts_for(kitty, "sks")[1], "--skip_grid"])
    for k, ref in enumerate(reference):
        assert np.array_equal(pixels(out / "01" / f"{k:02d}.png"), pixels(ref))
    before = pixels(out / "01" / "01.png")
    (out / "01" / "01.png").unlink()
    assert generate_for_subject(tiny_model, kitty, out, "sks", settings) == [out / "01" / "01.png"]
    assert np.array_equal(pixels(out / "01" / "01.png"), before)


# ---- the whole protocol ---------------------------------------------------------------------------------------

def test_an_interrupted_training_run_is_continued(fake_dataset, tmp_path, monkeypatch):
    """A run folder with last.ckpt but no trained.json (killed mid-training) continues with main.py -r."""
    reproduce = load_script("reproduce_paper")
    run = tmp_path / "work" / "runs" / "kitty" / "2024-01-01T00-00-00_kitty"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "configs" / "2024-01-01T00-00-00-project.yaml").write_text("model: {}\n")
    commands = []
    monkeypatch.setattr(reproduce.subprocess, "run", lambda cmd, **k: commands.append(cmd)
                        or reproduce.subprocess.CompletedProcess(cmd, 0))
    opt = reproduce.build_parser(load_script("evaluate")).parse_args(
        ["--workdir", str(tmp_path / "work"), "--actual_resume", "sd.ckpt", "--max_steps", "9"])
    ckpt, config = reproduce.train_subject(opt, subjects(fake_dataset)[1], ["model.params.reg_weight=0.5"])
    (cmd,) = commands
    assert cmd[2:] == ["-r", str(run), "-t", "--scale_lr", "false", "--max_steps", "9", "model.params.reg_weight=0.5"]
    assert ckpt == run / "checkpoints" / "last.ckpt" and config.name == "2024-01-01T00-00-00-project.yaml"
    assert json.loads((run.parent / "trained.json").read_text())["ckpt"] == str(ckpt)
    assert reproduce.train_subject(opt, subjects(fake_dataset)[1], []) == (ckpt, config) and len(commands) == 1


@pytest.mark.skipif(not DATASET.is_dir(), reason=f"DreamBooth dataset not at {DATASET}")
def test_reproduce_paper_two_subjects_end_to_end(tiny_ckpt, models, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for main.py's subprocesses (see conftest)
    reproduce = load_script("reproduce_paper")
    work = tmp_path / "work"
    args = ["--workdir", str(work), "--subjects", "dog,dog3", "--dataset", str(DATASET),
            "--base", str(REPO / "configs/stable-diffusion/tiny-finetune.yaml"),
            str(REPO / "configs/dreambooth/paper-tiny.yaml"), "--actual_resume", str(tiny_ckpt),
            "--prompts", "2", "--images_per_prompt", "2", "--prior_images", "2", "--ddim_steps", "4",
            "--scale", "3", "--size", "64", "--max_steps", "3", *models]
    results = reproduce.main(args + ["--keep_checkpoints"])
    report = json.loads((work / "results.json").read_text())
    assert sorted(results) == sorted(report["subjects"]) == ["dog", "dog3"]
    for name in ("dog", "dog3"):
        assert all(math.isfinite(report["subjects"][name]["metrics"][m]) for m in METRICS)
        trained = json.loads((work / "runs" / name / "trained.json").read_text())
        assert Path(trained["ckpt"]).is_file()
        assert len(list((work / "samples" / name).glob("*/*.png"))) == 2 * 2 + 2
    # The recipe reached main.py: the run's saved config, and the run stopped at --max_steps.
    from omegaconf import OmegaConf
    from ldm.weights.checkpoint import read_checkpoint
    run_config = OmegaConf.load(trained["config"])
    assert run_config.model.base_learning_rate == 5e-6 and run_config.model.params.cond_stage_trainable is False
    assert run_config.data.params.class_template == "a {class_word}" and run_config.lightning.trainer.max_steps == 3
    assert read_checkpoint(trained["ckpt"])[1]["global_step"] == 3
    # One class folder, generated once, shared by both dogs.
    assert [p.name for p in (work / "class_images").iterdir()] == ["dog"]
    assert len(list((work / "class_images" / "dog").glob("*.png"))) == 2
    table = (work / "results.md").read_text()
    assert all(number in table for number in PAPER_NUMBERS) and "| dog3 | dog |" in table
    chart = Image.open(work / "results.png")
    assert chart.size == (760, 440) and (46, 110, 200) in {c for _, c in chart.getcolors(1 << 16)}

    # Second invocation: a no-op (no training, no model loaded, nothing rescored).
    stamps = {p: p.stat().st_mtime_ns for p in (work / "eval" / "subjects").iterdir()}
    monkeypatch.setattr(reproduce.subprocess, "run", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(run_module.Embedders, "load", lambda self: pytest.fail("models loaded again"))
    assert reproduce.main(args) == results
    assert stamps == {p: p.stat().st_mtime_ns for p in (work / "eval" / "subjects").iterdir()}
    monkeypatch.undo()

    # dog loses its scores and one prompt's images: its finished checkpoint is reused, not retrained, the images
    # come back identical (fixed seeds), and so do the scores; without --keep_checkpoints, its checkpoint goes.
    monkeypatch.setattr(reproduce.subprocess, "run", lambda *a, **k: pytest.fail("trained again"))
    (work / "eval" / "subjects" / "dog.json").unlink()
    for path in (work / "samples" / "dog" / "01").iterdir():
        path.unlink()
    again = reproduce.main(args)
    for metric in METRICS:
        assert again["dog"]["metrics"][metric] == pytest.approx(results["dog"]["metrics"][metric], abs=1e-6)
    assert not list((work / "runs" / "dog").glob("*/checkpoints/*.ckpt"))
    assert list((work / "runs" / "dog3").glob("*/checkpoints/last.ckpt"))
