"""Nothing lost, nothing run, every mistake one line: the holes a hostile pass over training, sampling and the
tools found, each checked here on the tiny configs (each of these failed before the fix)."""
from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, load_script
from helpers import make_folder

import main as main_module

TINY_FT = REPO / "configs/stable-diffusion/tiny-finetune.yaml"


def train_args(tmp_path: Path, *extra: str, subject: Path | None = None, reg: Path | None = None) -> list[str]:
    subject = subject or make_folder(tmp_path / "subject", 3)
    reg = reg or make_folder(tmp_path / "reg", 3, offset=50)
    return ["--base", str(TINY_FT), "-t", "--logdir", str(tmp_path / "logs"), "-n", "job", "--data_root",
            str(subject), "--reg_data_root", str(reg), "--class_word", "toy", *extra]


def one_line_error(capsys, argv: list[str], entry=None) -> str:
    """Run ``main.py`` (or ``entry``) expecting exit code 2 and exactly one line on stderr; return it."""
    with pytest.raises(SystemExit) as info:
        (entry or main_module.main)(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    return err[0]


# ---- 1. no output is ever overwritten --------------------------------------------------------------------------

def test_two_runs_with_one_name_in_one_second_get_two_folders(tmp_path, monkeypatch):
    import ldm.training.run

    class Frozen(ldm.training.run.datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(ldm.training.run.datetime, "datetime", Frozen)
    args = train_args(tmp_path, "--max_steps", "2")
    assert main_module.main(args) == 0 and main_module.main(args) == 0
    runs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert runs == ["2026-01-02T03-04-05_job", "2026-01-02T03-04-05_job_2"]
    for run in runs:
        assert (tmp_path / "logs" / run / "checkpoints" / "last.ckpt").is_file()


def test_a_run_name_cannot_reach_outside_logdir(tmp_path, capsys):
    args = train_args(tmp_path, "--max_steps", "1")
    args[args.index("-n") + 1] = "x/../../elsewhere"
    assert "must be a plain name" in one_line_error(capsys, args)
    assert not (tmp_path / "elsewhere").exists()


def test_tools_refuse_to_write_over_their_inputs(tmp_path, tiny_ckpt, capsys):
    from ldm.weights.checkpoint import save_checkpoint
    lora = save_checkpoint(tmp_path / "l.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(1, 2),
                                                        "lora_unet_x.lora_up.weight": torch.zeros(2, 1)})
    merge = load_script("merge_lora").main
    assert "is also an input" in one_line_error(capsys, [str(tiny_ckpt), str(lora), str(lora)], merge)
    assert "is also an input" in one_line_error(capsys, [str(tiny_ckpt), f"{lora}:0.5", str(tiny_ckpt)], merge)
    existing = tmp_path / "existing.ckpt"
    existing.write_bytes(b"keep me")
    assert "exists already" in one_line_error(capsys, [str(tiny_ckpt), str(lora), str(existing)], merge)
    assert "exists already" in one_line_error(capsys, [str(tiny_ckpt), str(existing)], load_script("prune_ckpt").main)
    assert existing.read_bytes() == b"keep me"
    folder = tmp_path / "export"
    folder.mkdir()
    inside = folder / "model.ckpt"
    inside.write_bytes(tiny_ckpt.read_bytes())
    assert "not an empty folder" in one_line_error(
        capsys, [str(inside), str(folder), "--config", str(REPO / "configs/stable-diffusion/tiny-inference.yaml")],
        load_script("convert_to_diffusers").main)


def test_evaluation_does_not_write_into_what_it_reads(tmp_path, capsys):
    evaluate = load_script("evaluate").main
    samples = tmp_path / "samples"
    samples.mkdir()
    err = one_line_error(capsys, ["--samples", str(samples), "--out", str(samples)], evaluate)
    assert "lies in --samples" in err


# ---- 2. resume uses the newest state -----------------------------------------------------------------------------

def test_resume_takes_the_newest_complete_checkpoint_and_needs_no_base_weights(tmp_path, tiny_model):
    from ldm.weights.checkpoint import save_checkpoint
    base = save_checkpoint(tmp_path / "base.ckpt", tiny_model.state_dict())
    args = train_args(tmp_path, "--max_steps", "8", "--actual_resume", str(base),
                      "lightning.modelcheckpoint.params.every_n_train_steps=4")
    assert main_module.main(args) == 0
    (run,) = (tmp_path / "logs").iterdir()
    ckpts = run / "checkpoints"
    # A crash between writing step=8 and last.ckpt: last.ckpt still holds step 4; a kill also left a partial file
    # and a truncated "newer" step file.
    (ckpts / "last.ckpt").write_bytes((ckpts / "step=000004.ckpt").read_bytes())
    (ckpts / ".last.ckpt.x1y2.tmp").write_bytes(b"partial")
    (ckpts / "step=000012.ckpt").write_bytes((ckpts / "step=000008.ckpt").read_bytes()[:5000])
    step8_mtime = (ckpts / "step=000008.ckpt").stat().st_mtime_ns
    base.unlink()  # the original weights are gone: the checkpoint holds them
    assert main_module.main(["-r", str(run), "--max_steps", "10"]) == 0
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["global_step"] == 10
    assert (ckpts / "step=000008.ckpt").stat().st_mtime_ns == step8_mtime  # not retrained, not rewritten
    assert not list(ckpts.glob(".*.tmp"))


# ---- 3. the user's folders are never written into by surprise -----------------------------------------------------

def test_class_folder_inside_the_photo_folder_is_refused_before_generating(tmp_path, capsys):
    subject = make_folder(tmp_path / "subject", 3)
    args = train_args(tmp_path, "--max_steps", "1", "--num_class_images", "4", subject=subject,
                      reg=subject / "class")
    assert "overlap" in one_line_error(capsys, args)
    assert sorted(p.name for p in subject.iterdir()) == ["00.png", "01.png", "02.png"]
    args = train_args(tmp_path, "--max_steps", "1", subject=subject, reg=subject)
    assert "overlap" in one_line_error(capsys, args)


# ---- 4. every value outside its range: one line, before any model is loaded ----------------------------------------

@pytest.mark.parametrize("extra,needle", [
    (["--max_steps", "-1"], "max_steps (--max_steps)=-1: must be an integer >= 1"),
    (["model.base_learning_rate=-1e-4"], "model.base_learning_rate=-0.0001: must be a number > 0"),
    (["model.params.reg_weight=lots"], "model.params.reg_weight='lots': must be a number >= 0"),
    (["model.paramz.reg_weight=0.5"], "model.paramz: an object node (target/params) has no setting 'paramz'"),
    (["model.params.reg_weigth=0.5"], "did you mean reg_weight?"),
    (["lightning.trainer.max_stepz=3"], "Trainer has no setting 'max_stepz'"),
    (["data.params.size=72"], "data.params.size=72: must be a multiple of 16"),
    (["data.params.flip_p=1.5"], "data.params.flip_p=1.5: must be a number >= 0 and <= 1"),
    (["lightning.trainer.accumulate_grad_batches=0"], "accumulate_grad_batches=0: must be an integer >= 1"),
    (["--seed", "-3"], "--seed=-3: must be an integer >= 0"),
    (["class_images.ddim_steps=5000"], "class_images.ddim_steps=5000: must be an integer >= 1 and <= 1000"),
    (["model.params.lora_config.rank=0"], "model.params.lora_config.rank=0: must be an integer >= 1"),
    (["model.params.optimizer_config.betas=[0.9,1.5]"], "betas=1.5: must be a number >= 0 and < 1"),
    (["lightning.callbacks.image_logger.target=os.system"], "configs may only name objects in"),
])
def test_out_of_range_settings_stop_before_loading(tmp_path, capsys, monkeypatch, extra, needle):
    import ldm.training.run
    monkeypatch.setattr(ldm.training.run, "build_model", lambda *a: pytest.fail("a model was built"))
    assert needle in one_line_error(capsys, train_args(tmp_path, *extra))
    assert not (tmp_path / "logs").exists()


def test_a_saved_run_config_that_is_not_yaml(tmp_path, capsys):
    assert main_module.main(train_args(tmp_path, "--max_steps", "1")) == 0
    (run,) = (tmp_path / "logs").iterdir()
    (saved,) = (run / "configs").glob("*-project.yaml")
    saved.write_text("model: {target: [unclosed\n")
    assert "not a valid YAML config" in one_line_error(capsys, ["-r", str(run)])


def test_a_copied_run_folder_cannot_import_code_on_resume(tmp_path, capsys):
    assert main_module.main(train_args(tmp_path, "--max_steps", "1")) == 0
    (run,) = (tmp_path / "logs").iterdir()
    (saved,) = (run / "configs").glob("*-project.yaml")
    saved.write_text(saved.read_text().replace("ldm.training.callbacks.ImageLogger", "subprocess.Popen"))
    assert "configs may only name objects in" in one_line_error(capsys, ["-r", str(run)])


# ---- 5. every file that cannot be used: one line -------------------------------------------------------------------

class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_unusable_checkpoints_get_one_line(tmp_path, capsys):
    from ldm.weights.checkpoint import CheckpointError, read_checkpoint
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"epoch": 3, "note": "no tensors"}, legacy, _use_new_zipfile_serialization=False)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "payload": Evil()}, evil)
    expected = {empty: "empty file (0 bytes)", legacy: "holds no tensors", evil: "refused to load: its pickle asks "
                "to call posix.system, which is code, not data (nothing was run)"}
    for path, needle in expected.items():
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        assert needle in str(info.value) and "\n" not in str(info.value)
    assert not Path("PWNED").exists() and not (tmp_path / "PWNED").exists()
    # And through a tool: the empty file used to end in an IndexError traceback.
    err = one_line_error(capsys, [str(empty), str(tmp_path / "out.ckpt")], load_script("prune_ckpt").main)
    assert "empty file" in err


def test_a_lora_for_another_model_size_gets_one_line(tmp_path, tiny_ckpt, capsys):
    from ldm.weights.checkpoint import save_checkpoint
    # The tiny UNet's first attention to_q is 32x32; this adapter was made for a 320-wide layer (SD v1).
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = save_checkpoint(tmp_path / "big.safetensors", {f"{name}.lora_down.weight": torch.zeros(4, 320),
                                                          f"{name}.lora_up.weight": torch.zeros(320, 4)})
    err = one_line_error(capsys, [str(tiny_ckpt), str(lora), str(tmp_path / "m.ckpt")], load_script("merge_lora").main)
    assert "320x320 (rank 4) but this model's layer is 32x32: a LoRA for another model or size" in err
    txt2img = load_script("stable_txt2img").main
    err = one_line_error(capsys, ["--config", str(REPO / "configs/stable-diffusion/tiny-inference.yaml"), "--ckpt",
                                  str(tiny_ckpt), "--H", "64", "--W", "64", "--lora", str(lora),
                                  "--outdir", str(tmp_path / "o")], txt2img)
    assert "another model or size" in err


def test_special_entries_in_a_photo_folder_are_named(tmp_path, caplog):
    from ldm.data.image_loading import find_images
    folder = make_folder(tmp_path / "photos", 2)
    (folder / "sub.png").mkdir()
    os.mkfifo(folder / "pipe.png")  # opening it would block forever
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with caplog.at_level("WARNING"):
        images = find_images(folder, "--data_root")
    assert [p.name for p in images] == ["00.png", "01.png"]
    (warning,) = [r.getMessage() for r in caplog.records]
    for needle in ("sub.png (a folder)", "pipe.png (a FIFO)", "loop.png (a broken or looping link)",
                   "gone.jpg (a broken or looping link)"):
        assert needle in warning


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    from ldm.data.image_loading import ImageError, load_image
    bomb = tmp_path / "bomb.png"
    Image.new("1", (6000, 6000)).save(bomb, optimize=True)  # 36 MP in a few kB
    assert bomb.stat().st_size < 36_000_000 // 1024
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    with pytest.raises(ImageError, match="decompression bomb") as info:
        load_image(bomb, 64)
    assert "bomb.png" in str(info.value) and not decoded


# ---- 6. a full disk is a clear message ------------------------------------------------------------------------------

def test_full_disk_during_training_is_one_line_and_leaves_no_partial_checkpoint(tmp_path):
    args = train_args(tmp_path, "--max_steps", "2")

    def limit():  # what a full disk looks like to the writer: a write past 1 MB fails (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot write: File too large" in proc.stderr.strip().splitlines()[-1]
    (run,) = (tmp_path / "logs").iterdir()
    assert not list((run / "checkpoints").iterdir())  # no checkpoint that looks valid, no partial file


# ---- 7. configs are data; files get normal permissions -------------------------------------------------------------

def test_written_files_follow_the_umask(tmp_path, tiny_ckpt):
    old = os.umask(0o022)
    try:
        out = load_script("prune_ckpt").main([str(tiny_ckpt), str(tmp_path / "p.safetensors")])
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        from ldm.images import save_numbered_png
        png = save_numbered_png(Image.new("RGB", (4, 4)), tmp_path / "imgs")
        assert stat.S_IMODE(png.stat().st_mode) == 0o644
        folder = load_script("convert_to_diffusers").main(
            [str(tiny_ckpt), str(tmp_path / "diffusers"),
             "--config", str(REPO / "configs/stable-diffusion/tiny-inference.yaml")])
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        assert stat.S_IMODE((folder / "model_index.json").stat().st_mode) == 0o644
    finally:
        os.umask(old)


# ---- 2. the second hostile pass --------------------------------------------------------------------------------

TINY_INFERENCE = REPO / "configs/stable-diffusion/tiny-inference.yaml"


def altered_checkpoint(model, path: Path, key: str, value: float) -> Path:
    """The model's weights with ``key``'s first element set to ``value`` (NaN, Inf, or a huge finite number)."""
    from ldm.weights.checkpoint import save_checkpoint
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd[key].view(-1)[0] = value
    return save_checkpoint(path, sd, global_step=3)


def sample_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_INFERENCE), "--ckpt", str(ckpt), "--outdir", str(out), "--ddim_steps", "2",
            "--n_samples", "1", "--n_iter", "1", "--prompt", "a toy", *extra]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused_by_every_tool(tmp_path, tiny_model, capsys, value):
    """Once all-black pictures with exit code 0, and a pruned copy written without a word."""
    key = "model.diffusion_model.out.2.weight"
    bad = altered_checkpoint(tiny_model, tmp_path / "bad.ckpt", key, value)
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (90, 120, 30)).save(picture)
    runs = [(load_script("stable_txt2img").main, sample_args(bad, tmp_path / "t2i")),
            (load_script("img2img").main, sample_args(bad, tmp_path / "i2i", "--init-img", str(picture))),
            (load_script("prune_ckpt").main, [str(bad), str(tmp_path / "pruned.safetensors")])]
    for entry, argv in runs:
        line = one_line_error(capsys, argv, entry)
        assert f"{bad}: 1 of " in line and f"tensors hold NaN or Inf values ({key})" in line, line
    assert not list(tmp_path.rglob("*.png"))[1:] and not (tmp_path / "pruned.safetensors").exists()


def test_a_sample_that_comes_out_non_finite_is_not_saved(tmp_path, tiny_model, capsys):
    """Finite weights whose decoder overflows float32: no black PNG, one line, a non-zero exit code."""
    bad = altered_checkpoint(tiny_model, tmp_path / "overflow.ckpt", "first_stage_model.decoder.conv_out.weight",
                             3e38)
    with pytest.raises(SystemExit) as info:
        load_script("stable_txt2img").main(sample_args(bad, tmp_path / "out"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "DDIM Sampler" not in line]
    assert info.value.code == 2 and len(err) == 1, err
    line = err[0]
    assert "1 of 1 samples came out NaN or Inf (the first for 'a toy'); not saved" in line, line
    assert not list((tmp_path / "out").rglob("*.png"))


def test_pruning_to_fp16_refuses_weights_beyond_its_range(tmp_path, tiny_model, capsys):
    big = altered_checkpoint(tiny_model, tmp_path / "big.ckpt", "model.diffusion_model.out.2.weight", 1e6)
    prune = load_script("prune_ckpt").main
    line = one_line_error(capsys, [str(big), str(tmp_path / "half.ckpt"), "--fp16"], prune)
    assert "become Inf in float16" in line and not (tmp_path / "half.ckpt").exists()
    assert prune([str(big), str(tmp_path / "bf16.ckpt"), "--bf16"]).is_file()  # bf16 has fp32's range


def test_a_vae_of_another_family_is_refused(tmp_path, tiny_model, tiny_ckpt, capsys):
    """The SD v1 and SDXL VAEs share one layout, so shapes alone cannot refuse an SDXL VAE given to SD v1; what
    the file says of itself can: its modelspec metadata, or the scaling_factor of its diffusers config.json. A file
    that says nothing loads, with a line saying what must be true of it."""
    from safetensors.torch import save_file
    vae = {k: v.contiguous() for k, v in tiny_model.first_stage_model.state_dict().items()}
    tagged = tmp_path / "sdxl_vae.safetensors"
    save_file(vae, str(tagged), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"})
    folder = tmp_path / "sdxl-vae-fp16-fix"
    folder.mkdir()
    save_file(vae, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL", "scaling_factor": 0.13025}')
    txt2img = load_script("stable_txt2img").main
    for path, how in ((tagged, "its metadata says modelspec.architecture stable-diffusion-xl-v1-base/vae"),
                      (folder / "diffusion_pytorch_model.safetensors", "scaling_factor 0.13025")):
        line = one_line_error(capsys, sample_args(tiny_ckpt, tmp_path / "out", "--vae", str(path)), txt2img)
        assert f"error: --vae {path}: a VAE of Stable Diffusion XL base (" in line and f"{how}), but this model is " \
            f"Stable Diffusion v1 (scale_factor 0.18215): the two VAEs share one layout but not their latent space, " \
            f"so its pictures would be wrong; use a VAE made for Stable Diffusion v1" in line, line
    assert not (tmp_path / "out").exists()
    bare = tmp_path / "vae-ft-mse.safetensors"
    save_file(vae, str(bare))
    assert len(txt2img(sample_args(tiny_ckpt, tmp_path / "ok", "--vae", str(bare)))) == 2
    assert f"Loaded VAE {bare} (its keys and shapes fit; the file does not say which model it was made for" \
        in capsys.readouterr().out


KILLED_WRITER = """
import sys, time
from pathlib import Path
from ldm.files import atomic_write
def write(tmp):
    Path(tmp).write_bytes(b"half a checkpoint")
    print("writing", flush=True)
    time.sleep(600)
atomic_write(sys.argv[1], write)
"""


def killed_write(target: Path) -> Path:
    """Start a real writer of ``target``, SIGKILL it mid-write, and return the partial file it left."""
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "writing\n"
    child.kill()
    child.wait()
    (partial,) = target.parent.glob(f".{target.name}.*.tmp")
    return partial


def test_what_a_killed_export_left_is_removed_on_the_next_one(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "pruned.safetensors"
    partial = killed_write(out)
    other = killed_write(tmp_path / "another-output.ckpt")  # another output's leftovers are not this run's to judge
    load_script("prune_ckpt").main([str(tiny_ckpt), str(out)])
    assert not partial.exists() and other.exists() and out.is_file()
    assert f"Removed {partial}: left by an interrupted write of pruned.safetensors" in capsys.readouterr().out
    folder = tmp_path / "tiny-diffusers"
    left = tmp_path / f".{folder.name}.abc123.tmp"  # what a killed conversion leaves: its half-assembled folder
    (left / "unet").mkdir(parents=True)
    load_script("convert_to_diffusers").main([str(tiny_ckpt), str(folder), "--config", str(TINY_INFERENCE)])
    assert not left.exists() and (folder / "model_index.json").is_file()
    samples = tmp_path / "out" / "samples"
    stale = killed_write(samples / "00000.png")
    load_script("stable_txt2img").main(sample_args(tiny_ckpt, tmp_path / "out"))
    assert not stale.exists()


def test_a_partial_file_a_live_writer_holds_is_left_alone(tmp_path):
    import fcntl

    from ldm.files import clean_partial
    live = tmp_path / ".model.ckpt.x1.tmp"
    live.write_bytes(b"being written")
    dead = tmp_path / ".model.ckpt.x2.tmp"
    dead.write_bytes(b"left by a kill")
    with open(live, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # what atomic_write holds while it writes
        assert clean_partial(tmp_path, "model.ckpt") == [dead]
    assert live.exists() and not dead.exists()
