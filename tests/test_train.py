"""DreamBooth training through main.py on the tiny config: outputs, loss, prior term, resume, bad input."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, load_config
from helpers import make_folder

import main as main_module
from ldm.models.diffusion.losses import prior_preservation_loss
from ldm.util import instantiate_from_config
from ldm.weights.checkpoint import read_checkpoint
from ldm.weights.load import load_model_from_config

TINY_FT = REPO / "configs/stable-diffusion/tiny-finetune.yaml"


def base_args(tmp_path: Path, *extra: str) -> list[str]:
    subject = make_folder(tmp_path / "subject", 4)
    reg = make_folder(tmp_path / "reg", 6, offset=50)
    return ["--base", str(TINY_FT), "-t", "--logdir", str(tmp_path / "logs"), "-n", "job",
            "--data_root", str(subject), "--reg_data_root", str(reg), "--class_word", "toy", *extra]


def run_folder(tmp_path: Path) -> Path:
    (run,) = (tmp_path / "logs").iterdir()
    return run


def metrics(run: Path, version: str = "csv") -> list[dict]:
    with open(run / version / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---- the loss against a hand computation -------------------------------------------------------------------

def test_prior_preservation_loss_by_hand():
    eps_pred = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]]).reshape(3, 2, 1, 1)
    eps = torch.zeros(3, 2, 1, 1)
    loss, logs = prior_preservation_loss(eps_pred, eps, n_subject=1, reg_weight=0.5)
    subject = (1 + 4) / 2
    prior = ((0 + 0) / 2 + (9 + 1) / 2) / 2
    assert float(logs["loss_subject"]) == pytest.approx(subject)
    assert float(logs["loss_prior"]) == pytest.approx(prior)
    assert float(loss) == pytest.approx(subject + 0.5 * prior)


def test_shared_step_is_one_forward_with_the_weighted_prior(tiny_model, monkeypatch):
    """The module's loss equals mse(subject) + reg_weight * mse(class), recomputed here from the same draws."""
    import copy
    model = copy.deepcopy(tiny_model)
    model.reg_weight = 0.25
    model.first_stage_key, model.cond_stage_key = "image", "caption"
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "caption": ["a sks toy", "a sks toy"],
             "reg_image": torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, "reg_caption": ["a toy"]}
    calls = []
    forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda *a, **k: calls.append(a[0].shape[0]) or forward(*a, **k))
    torch.manual_seed(5)
    loss, logs = model.shared_step(batch)
    assert calls == [3]  # subject and class examples in one UNet pass

    torch.manual_seed(5)
    images = torch.cat([batch["image"], batch["reg_image"]])
    z = model.get_first_stage_encoding(model.encode_first_stage(images))
    c = model.get_learned_conditioning(batch["caption"] + batch["reg_caption"])
    t = torch.randint(0, 1000, (3,))
    noise = torch.randn_like(z)
    abar = model.alphas_cumprod[t].view(3, 1, 1, 1)
    eps = forward(abar.sqrt() * z + (1 - abar).sqrt() * noise, t, c_crossattn=[c])
    per = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
    expected = per[:2].mean() + 0.25 * per[2]
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(logs["loss_prior"]) == pytest.approx(float(per[2]), rel=1e-5)


# ---- end to end -------------------------------------------------------------------------------------------

def fixed_subject_loss(model, images: torch.Tensor, captions: list[str]) -> float:
    """Denoising loss on the training images at a fixed grid of timesteps and noises (no sampling noise)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = model.get_first_stage_encoding(model.encode_first_stage(images), generator=g)
        c = model.get_learned_conditioning(captions)
        total = 0.0
        for t_value in (50, 200, 400, 600, 800):
            t = torch.full((z.shape[0],), t_value)
            noise = torch.randn(z.shape, generator=g)
            total += float(((model.apply_model(model.q_sample(z, t, noise), t, c) - noise) ** 2).mean())
    return total / 5


def test_end_to_end_run(tmp_path, capsys):
    assert main_module.main(base_args(tmp_path, "--max_steps", "40", "--gpus", "0,")) == 0
    assert "No GPU found: ignoring --gpus 0 and training on the CPU" in capsys.readouterr().out
    run = run_folder(tmp_path)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step=000020.ckpt", "step=000040.ckpt"]
    sd, meta = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert meta["global_step"] == 40
    assert (run / "images" / "train" / "step-000020.png").is_file()
    assert len(list((run / "configs").glob("*-project.yaml"))) == 1
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = metrics(run)
    assert {"train/loss", "train/loss_subject", "train/loss_prior", "lr"} <= set(rows[0])
    prior = [float(r["train/loss_prior"]) for r in rows if r.get("train/loss_prior")]
    assert prior and all(p > 0 for p in prior)

    # The subject loss on the training images falls well below its starting value.
    from ldm.data.dreambooth import DreamBoothDataset
    ds = DreamBoothDataset(tmp_path / "subject", "sks", "toy", size=64, repeats=1, flip_p=0)
    images = torch.stack([ds[i]["image"] for i in range(4)])
    captions = [ds[i]["caption"] for i in range(4)]
    config = load_config(TINY_FT)
    torch.manual_seed(23)
    __import__("pytorch_lightning").seed_everything(23)
    start = instantiate_from_config(config.model).eval()
    trained = load_model_from_config(config, run / "checkpoints" / "last.ckpt")
    before, after = fixed_subject_loss(start, images, captions), fixed_subject_loss(trained, images, captions)
    assert after < 0.5 * before, (before, after)

    # last.ckpt (a full Lightning checkpoint) samples with the txt2img script.
    import importlib.util
    spec = importlib.util.spec_from_file_location("txt2img", REPO / "scripts/stable_txt2img.py")
    txt2img = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(txt2img)
    written = txt2img.main(["--config", str(REPO / "configs/stable-diffusion/tiny-inference.yaml"),
                            "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--outdir", str(tmp_path / "out"),
                            "--H", "64", "--W", "64", "--ddim_steps", "3", "--n_samples", "1", "--n_iter", "1",
                            "--prompt", "photo of a sks toy on the moon"])
    assert [p.name for p in written] == ["00000.png", "grid-0000.png"]


def test_max_steps_exact_across_epochs_and_checkpoint_loads_with_weights_only(tmp_path):
    # 4 subject x 1 repeat: an epoch is 4 steps, so 10 steps end in the middle of the third epoch.
    main_module.main(base_args(tmp_path, "--max_steps", "10", "data.params.repeats=1", "data.params.reg_repeats=1"))
    ckpt = torch.load(run_folder(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 10 and ckpt["epoch"] >= 2  # several epochs, and exactly 10 steps
    assert "optimizer_states" in ckpt and "state_dict" in ckpt


def test_same_seed_same_weights(tmp_path):
    finals = []
    for k in range(2):
        main_module.main(base_args(tmp_path / str(k), "--max_steps", "3"))
        finals.append(torch.load(run_folder(tmp_path / str(k)) / "checkpoints" / "last.ckpt",
                                 weights_only=True)["state_dict"])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_gradient_accumulation_and_clipping(tmp_path):
    main_module.main(base_args(tmp_path, "--max_steps", "3", "lightning.trainer.accumulate_grad_batches=2",
                               "lightning.trainer.gradient_clip_val=0.5", "lightning.trainer.log_every_n_steps=1"))
    run = run_folder(tmp_path)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    lrs = {float(r["lr"]) for r in metrics(run) if r.get("lr")}
    assert sorted(lrs) == pytest.approx([2e-3])  # scale_lr: 1 device * batch 1 * accumulate 2 * 1e-3


def test_warmup_and_cosine_schedule_closed_form():
    from ldm.optim.lr_scheduler import warmup_then
    f = warmup_then("cosine", warmup_steps=10, max_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    g = warmup_then("constant", warmup_steps=4, max_steps=100)
    assert [g(n) for n in (0, 1, 3, 50)] == pytest.approx([0.25, 0.5, 1.0, 1.0])


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted_30(tmp_path_factory) -> dict[str, torch.Tensor]:
    """30 steps without a stop: what every interrupted-and-resumed run must reproduce exactly."""
    tmp = tmp_path_factory.mktemp("straight")
    assert main_module.main(base_args(tmp, "--max_steps", "30")) == 0
    return final_weights(run_folder(tmp))


def test_interrupt_then_resume_repeats_the_uninterrupted_run(tmp_path, uninterrupted_30):
    """Ctrl-C at step 12 (mid-epoch), then -r: the same step count and bit-identical weights to the run that was
    never stopped (same batches in the same order, same flips, same noise and timesteps)."""
    args = base_args(tmp_path, "--max_steps", "30", "--allow_any_target",
                     "lightning.callbacks.interrupt.target=helpers.InterruptAt",
                     "lightning.callbacks.interrupt.params.step=12")
    with pytest.raises(SystemExit):
        main_module.main(args)
    run = run_folder(tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    interrupted = torch.load(last, weights_only=True)
    assert interrupted["global_step"] == 12 and interrupted["optimizer_states"]

    # Resume from the folder alone; the saved config still holds the interrupting callback, so disable it.
    assert main_module.main(["-r", str(run), "--allow_any_target", "lightning.callbacks.interrupt.params.step=1000"]) == 0
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 30
    assert_same_weights(resumed["state_dict"], uninterrupted_30)
    assert list((tmp_path / "logs").iterdir()) == [run]  # the same run folder, continued
    before = [int(r["step"]) for r in metrics(run) if r.get("train/loss")]
    (resumed_csv,) = run.glob("csv-resumed-*")
    after = [int(r["step"]) for r in metrics(run, resumed_csv.name) if r.get("train/loss")]
    assert max(before) < 12 and min(after) >= 12 and max(after) >= 25  # metrics of both parts are kept


def test_sigterm_saves_exits_nonzero_and_resumes_exactly(tmp_path, uninterrupted_30):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = base_args(tmp_path, "--max_steps", "30", "lightning.trainer.log_every_n_steps=1")
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few steps are logged
        runs = list((tmp_path / "logs").glob("*/csv/metrics.csv")) if (tmp_path / "logs").exists() else []
        if runs and len(runs[0].read_text().splitlines()) > 4:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-2000:]  # saved, but the run did not finish: not a success
    run = run_folder(tmp_path)
    stopped = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert 3 <= stopped["global_step"] < 30 and stopped["optimizer_states"]
    assert main_module.main(["-r", str(run)]) == 0
    assert_same_weights(final_weights(run), uninterrupted_30)


def test_ddp_two_cpu_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = base_args(tmp_path, "--max_steps", "6", "lightning.trainer.accelerator=cpu",
                     "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp")
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Learning rate 2.00e-03 = 2 (devices)" in proc.stdout
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1  # only rank 0 made a run folder
    ckpt = torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6


def test_options_ema_frozen_text_encoder_and_bf16(tmp_path):
    args = base_args(tmp_path, "--max_steps", "3", "model.params.use_ema=true",
                     "model.params.cond_stage_trainable=false", "lightning.trainer.precision=bf16-mixed")
    main_module.main(args)
    ckpt = torch.load(run_folder(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    sd = ckpt["state_dict"]
    assert int(sd["model_ema.num_updates"]) == 3
    assert all(v.dtype == torch.float32 for k, v in sd.items() if v.is_floating_point())  # fp32 master weights
    config = load_config(TINY_FT)
    __import__("pytorch_lightning").seed_everything(23)
    start = instantiate_from_config(config.model).state_dict()
    text_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    assert torch.equal(sd[text_key], start[text_key])  # frozen: unchanged
    unet_key = "model.diffusion_model.input_blocks.0.0.weight"
    assert not torch.equal(sd[unet_key], start[unet_key])


def test_text_encoder_trains_when_asked(tmp_path):
    main_module.main(base_args(tmp_path, "--max_steps", "2"))
    sd = torch.load(run_folder(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    __import__("pytorch_lightning").seed_everything(23)
    start = instantiate_from_config(load_config(TINY_FT).model).state_dict()
    text_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    assert not torch.equal(sd[text_key], start[text_key])


def test_class_images_generated_on_demand(tmp_path):
    args = base_args(tmp_path, "--max_steps", "1", "--num_class_images", "9")
    main_module.main(args)
    reg = sorted((tmp_path / "reg").iterdir())
    assert len(reg) == 9 and [p.name for p in reg[-3:]] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    from PIL import Image
    img = Image.open(reg[-1])
    assert img.size == (64, 64) and img.text["prompt"] == "photo of a toy"


# ---- bad input: one line naming the file or flag, before the first step -----------------------------------

def bad_run(tmp_path, capsys, *args):
    with pytest.raises(SystemExit) as info:
        main_module.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").glob("*/checkpoints/*.ckpt"))
    return err[0]


def test_bad_inputs(tmp_path, capsys):
    args = base_args(tmp_path, "--max_steps", "2")
    i = args.index("--data_root") + 1

    missing = list(args)
    missing[i] = str(tmp_path / "nowhere")
    assert "nowhere" in bad_run(tmp_path, capsys, *missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    args_empty = list(args)
    args_empty[i] = str(empty)
    assert "no images" in bad_run(tmp_path, capsys, *args_empty)

    (tmp_path / "subject" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert "broken.jpg" in bad_run(tmp_path, capsys, *args)
    (tmp_path / "subject" / "broken.jpg").unlink()

    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "subject" / "small.png")
    assert "small.png" in bad_run(tmp_path, capsys, *args)
    (tmp_path / "subject" / "small.png").unlink()

    no_class = [a for a in args if a not in ("--class_word", "toy")]
    assert "--class_word" in bad_run(tmp_path, capsys, *no_class)
    assert "--actual_resume" in bad_run(tmp_path, capsys, *args, "--actual_resume", str(tmp_path / "x.ckpt"))
    assert "model.params" in bad_run(tmp_path, capsys, *args, "garbage")
