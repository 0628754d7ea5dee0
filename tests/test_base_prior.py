"""Prior preservation without class images (``model.params.prior_preservation: base_model``): the prior term's
target is the base model's own prediction for the class prompt: the trained LoRA model switched back to its base
weights, or a full fine-tune's frozen copy of its starting weights. Checked against an independent copy of the base
model (built before any adapter was added or weight trained), on SD v1's and SDXL's and FLUX.1's tiny recipes, and
through main.py (a resumed full fine-tune keeps the base's copy, not the resumed weights)."""
from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

import main as main_module
from conftest import REPO, load_config, tiny_flux_config
from helpers import make_folder
from ldm.data.dreambooth import DreamBoothDataset
from ldm.util import instantiate_from_config
from ldm.weights.checkpoint import read_checkpoint

TINY_FT = REPO / "configs/stable-diffusion/tiny-finetune.yaml"
TINY_SDXL_FT = REPO / "configs/stable-diffusion/tiny-sdxl-finetune.yaml"
TINY_FLUX_FT = REPO / "configs/flux/tiny-flux-finetune.yaml"


def lora_model(config_path: Path, base_state: dict, tokenizer: Path | None = None
               ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the fine-tune config's model with base_model prior and LoRA, an independent base copy), both holding the
    seeded tiny weights; the LoRA model's adapters are then given random up weights, so that they change its
    answers."""
    config = tiny_flux_config(tokenizer, config_path) if tokenizer else load_config(config_path)
    params = config.model.params
    if not params.get("lora_config"):
        params.lora_config = {"rank": 4, "alpha": 4}
    params.lora_config.text_encoder = True  # the class prompt is encoded through trained adapters too
    params.use_ema = False
    params.prior_preservation = "base_model"
    model = instantiate_from_config(config.model)
    model.load_state_dict(base_state, strict=False)
    base = copy.deepcopy(model).eval()
    model.add_lora()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval(), base


def full_model(config_path: Path, base_state: dict, tokenizer: Path | None = None
               ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the fine-tune config's model with base_model prior, full fine-tune (the text encoder trained too where the
    family has one), an independent base copy), both holding the seeded tiny weights; the model's trainable weights
    are then moved by noise, as training would move them, after it kept its base copy."""
    config = tiny_flux_config(tokenizer, config_path) if tokenizer else load_config(config_path)
    params = config.model.params
    params.pop("lora_config", None)
    params.use_ema = False
    params.prior_preservation = "base_model"
    if "cond_stage_config" in params:
        params.cond_stage_trainable = True
    model = instantiate_from_config(config.model)
    model.load_state_dict(base_state, strict=False)
    base = copy.deepcopy(model).eval()
    model.configure_model()
    g = torch.Generator().manual_seed(7)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained
    with torch.no_grad():
        for p in trained:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), base


def batch_of(tmp_path: Path, size: int) -> dict:
    dataset = DreamBoothDataset(make_folder(tmp_path / "subject", 2), "sks", "toy", size=size, flip_p=0.0,
                                prior_captions=True)
    return default_collate([dataset[0], dataset[1]])


@pytest.fixture(params=[(f, mode) for f in ("sd_v1", "sdxl", "flux") for mode in ("lora", "full")],
                ids=lambda p: "-".join(p))
def family(request, tmp_path):
    name, mode = request.param
    make = lora_model if mode == "lora" else full_model
    if name == "sd_v1":
        return (*make(TINY_FT, request.getfixturevalue("tiny_model").state_dict()), batch_of(tmp_path, 64))
    if name == "sdxl":
        return (*make(TINY_SDXL_FT, request.getfixturevalue("tiny_sdxl_model").state_dict()), batch_of(tmp_path, 64))
    return (*make(TINY_FLUX_FT, request.getfixturevalue("tiny_flux_model").state_dict(),
                  request.getfixturevalue("t5_tokenizer")), batch_of(tmp_path, 64))


def base_answer(base, x_noisy, t, captions, batch):
    """The independent copy's prediction for the class prompts (FLUX.1 [dev]: at the training guidance)."""
    from ldm.models.diffusion.conditioning import batch_sizes
    c = base.conditioning.condition(base.encode_text(captions), batch_sizes(batch, [""]))
    return base.apply_model(x_noisy, t, base.with_guidance(c, base.train_guidance))


def test_the_prior_target_is_the_base_models_prediction_for_the_class_prompt(family):
    """In a training step, the prior rows are the subject's noisy latents at the subject's t: their loss is
    mean((trained model's prediction - base model's prediction)^2) for "photo of a toy", with the base model's
    answer computed here by a copy that never had adapters."""
    model, base, batch = family
    assert list(batch["prior_caption"]) == ["photo of a toy"] * 2
    seen = {}
    target_of = model.base_prior_target

    def recording(x_noisy, t, b):
        seen.update(x=x_noisy.detach().clone(), t=t.clone())
        return target_of(x_noisy, t, b)
    model.base_prior_target = recording
    with torch.no_grad():
        loss, logs = model.shared_step(batch, torch.Generator().manual_seed(3))
        x, t = seen["x"], seen["t"]
        assert x.shape[0] == 2 and t.shape == (2,)
        target = base_answer(base, x, t, list(batch["prior_caption"]), batch)
        c = model.condition_on(list(batch["prior_caption"]), batch, [""])
        pred = model.apply_model(x, t, c)
    expected = ((pred - target) ** 2).flatten(1).mean(dim=1).mean()
    assert float(logs["loss_prior"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(logs["loss_prior"]) > 1e-4  # the moved weights moved the answer: the test sees the term
    assert float(loss) == pytest.approx(float(logs["loss_subject"]) + model.reg_weight * float(expected), rel=1e-5)


def test_the_prior_term_is_zero_before_training_and_trains_only_adapters(tiny_model, tmp_path):
    """Fresh adapters (lora_up zero) leave the model equal to its base: the prior term starts at exactly 0. With
    moved adapters its gradient reaches the adapters (the target carries none) and no base weight."""
    model, _ = lora_model(TINY_FT, tiny_model.state_dict())
    batch = batch_of(tmp_path, 64)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    model.train()
    losses = model.base_prior_losses(x, t, batch)
    losses.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    assert any(g is not None and g.abs().max() > 0 for n, g in grads.items() if "lora_A" in n)
    fresh, _ = lora_model(TINY_FT, tiny_model.state_dict())
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if "lora_B" in name:
                p.zero_()
        assert torch.equal(fresh.base_prior_losses(x, t, batch), torch.zeros(2))


def test_a_lora_run_without_class_images_trains_and_keeps_the_layout(tiny_ckpt, tmp_path):
    """main.py with prior_preservation=base_model and no --reg_data_root: no class image is made, the logged prior
    term is 0 at the first step and then positive (the adapters moved), and the checkpoint holds the base weights
    unchanged under their names plus the adapters."""
    args = ["--base", str(TINY_FT), "-t", "--logdir", str(tmp_path / "logs"), "-n", "self", "--actual_resume",
            str(tiny_ckpt), "--data_root", str(make_folder(tmp_path / "subject", 3)), "--class_word", "toy",
            "--max_steps", "4", "--lora_rank", "4", "model.params.prior_preservation=base_model",
            "lightning.trainer.log_every_n_steps=1"]
    assert main_module.main(args) == 0
    (run,) = (tmp_path / "logs").iterdir()
    with open(next(run.rglob("metrics.csv"))) as f:
        prior = [float(r["train/loss_prior"]) for r in csv.DictReader(f) if r.get("train/loss_prior")]
    # 0 up to rounding at the first step: the prior rows go through the network batched with the subject's, the
    # base's answer alone (9e-13 measured), against 2e-7 and more once the adapters moved.
    assert len(prior) == 4 and prior[0] < 1e-10 and all(p > 1e-8 for p in prior[1:]), prior
    last, _ = read_checkpoint(run / "checkpoints" / "last.ckpt")
    base, _ = read_checkpoint(tiny_ckpt)
    assert all(torch.equal(last[k], v) for k, v in base.items())
    assert set(last) - set(base) and all("lora_" in k for k in set(last) - set(base))
    assert not any((tmp_path / "logs").rglob("class-*.png"))


def test_a_full_fine_tune_without_class_images_trains_resumes_and_saves_no_copy(tiny_ckpt, tmp_path, capsys):
    """A full fine-tune with prior_preservation=base_model: the prior term is 0 at the first step (the model is its
    base) and positive after; the checkpoint holds the original layout only (the frozen copy is not saved). Resumed
    with -r, the copy is the base file's again, not the resumed weights: the first resumed step's prior term is not
    0. Without the base file the resume is refused in one line."""
    base_file = tmp_path / "base.ckpt"
    base_file.write_bytes(tiny_ckpt.read_bytes())
    args = ["--base", str(TINY_FT), "-t", "--logdir", str(tmp_path / "logs"), "-n", "self", "--actual_resume",
            str(base_file), "--data_root", str(make_folder(tmp_path / "subject", 3)), "--class_word", "toy",
            "--max_steps", "3", "model.params.prior_preservation=base_model", "lightning.trainer.log_every_n_steps=1",
            "model.base_learning_rate=1e-3"]
    assert main_module.main(args) == 0
    (run,) = (tmp_path / "logs").iterdir()

    def priors() -> list[float]:  # of the newest part of the run (a resumed part logs into its own file)
        with open(max(run.rglob("metrics.csv"), key=lambda q: q.stat().st_mtime_ns)) as f:
            return [float(r["train/loss_prior"]) for r in csv.DictReader(f) if r.get("train/loss_prior")]
    first = priors()
    assert len(first) == 3 and first[0] < 1e-10 and all(p > 1e-8 for p in first[1:]), first  # 0 up to rounding
    last, _ = read_checkpoint(run / "checkpoints" / "last.ckpt")
    base, _ = read_checkpoint(tiny_ckpt)
    assert set(last) == set(base)
    assert any(not torch.equal(last[k], v) for k, v in base.items() if "diffusion_model" in k)
    assert main_module.main(["-r", str(run), "--max_steps", "5"]) == 0
    after = priors()
    assert len(after) == 2 and all(p > 1e-8 for p in after), after
    base_file.unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main_module.main(["-r", str(run), "--max_steps", "6"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "takes its prior from the base model" in err[0], err
    assert str(base_file) in err[0]


def test_a_full_fine_tune_from_random_weights_has_no_base(tmp_path, capsys):
    args = ["--base", str(TINY_FT), "-t", "--logdir", str(tmp_path / "logs"), "-n", "bad", "--data_root",
            str(make_folder(tmp_path / "subject", 1)), "--class_word", "toy", "--max_steps", "1",
            "model.params.prior_preservation=base_model"]
    with pytest.raises(SystemExit) as info:
        main_module.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "needs the base model's weights (--actual_resume)" in err[0]
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("extra, message", [
    (["--lora_rank", "4", "model.params.prior_preservation=base_model", "--reg_data_root", "REG"],
     "takes no class images (the base model's own prediction is the prior): drop --reg_data_root"),
    (["--lora_rank", "4", "model.params.prior_preservation=frozen"],
     "model.params.prior_preservation='frozen': expected one of class_images, base_model"),
])
def test_mistakes_are_one_line_before_any_model_loads(tiny_ckpt, tmp_path, capsys, extra, message):
    reg = make_folder(tmp_path / "reg", 1)
    args = ["--base", str(TINY_FT), "-t", "--logdir", str(tmp_path / "logs"), "-n", "bad", "--actual_resume",
            str(tiny_ckpt), "--data_root", str(make_folder(tmp_path / "subject", 1)), "--class_word", "toy",
            "--max_steps", "1", *[str(reg) if a == "REG" else a for a in extra]]
    with pytest.raises(SystemExit) as info:
        main_module.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "logs").exists()

