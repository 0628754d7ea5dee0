"""The shortened DreamBooth fine-tune of the shipped toy model and its scoring, shared by tests/test_toy_model.py and
tests/test_toy_controls.py (two files, so that a parallel test run can take them on two workers)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import main as main_module
from conftest import REPO

TOY = REPO / "assets" / "toy"
MANIFEST = json.loads((TOY / "manifest.json").read_text())
STEPS = 300  # the demo's fine-tune, shortened (the config runs 350), with the image logger off


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_judge():
    from ldm.eval.toy import load_classifier
    return load_classifier(TOY / MANIFEST["classifier"])


def finetune(tmp_path: Path, *extra: str, prior: bool = True,
             data_root: Path = REPO / "assets" / "demo" / "in-world") -> Path:
    """The demo's fine-tune, shortened to STEPS: its photos, and the prior from the base model's prediction
    (``prior=False``: no prior term); ``extra``: more main.py arguments (a later ``--seed`` wins)."""
    from ldm.eval.toy_model import TOY_MODEL
    args = ["--base", str(REPO / "configs/toy/dreambooth.yaml"), "-t", "--actual_resume", str(TOY_MODEL),
            "-n", "ft", "--logdir", str(tmp_path / "logs"), "--data_root", str(data_root),
            "--class_word", "robot", "--max_steps", str(STEPS), "--seed", "0",
            "lightning.callbacks.image_logger.params.batch_frequency=1000", *extra]
    if prior:
        args.append("model.params.prior_preservation=base_model")
    assert main_module.main(args) == 0
    (ckpt,) = (tmp_path / "logs").glob("*_ft/checkpoints/last.ckpt")
    return ckpt


def scores(ckpt, judge):
    """The demo's numbers for a fine-tune (None: the base model), with the colour drift of "photo of a robot"."""
    from ldm.eval.toy_model import dreambooth_scores, load_toy_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the measured numbers above were taken with one thread
    try:
        base = load_toy_model()
        return dreambooth_scores(load_toy_model(ckpt) if ckpt else base, judge, per_place=6, base=base)
    finally:
        torch.set_num_threads(threads)


def dreambooth_effect(before: dict, after: dict) -> bool:
    """What DreamBooth is for, in numbers: the subject appears (well above the base model), in the held-out places
    asked for, while the bare class prompt does not turn into the subject."""
    return (after["subject_fidelity"] > before["subject_fidelity"] + 0.6 and after["prompt_fidelity"] >= 0.4
            and after["prior_drift"] < 0.1)


def class_drift(s: dict) -> float:
    """How far "photo of a robot" moved: towards the subject (prior drift) plus away from the base model's colours
    (colour drift, the pink wash the subject probability does not always see)."""
    return s["prior_drift"] + s["colour_drift"]


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def base_scores(judge):
    return scores(None, judge)
