"""scripts/stable_txt2img.py end to end on the tiny checkpoint: files, metadata, determinism, bad flags."""
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_CONFIG

spec = importlib.util.spec_from_file_location("stable_txt2img", REPO / "scripts/stable_txt2img.py")
txt2img = importlib.util.module_from_spec(spec)
spec.loader.exec_module(txt2img)


def run(ckpt, outdir, *extra):
    args = ["--config", str(TINY_CONFIG), "--ckpt", str(ckpt), "--outdir", str(outdir), "--H", "64", "--W", "64",
            "--ddim_steps", "4", "--n_samples", "2", "--n_iter", "1", "--scale", "5", "--seed", "3",
            "--prompt", "photo of a sks dog", *extra]
    return txt2img.main(args)


def pixels(path):
    return np.asarray(Image.open(path))


def test_writes_samples_and_grid_with_metadata(tiny_ckpt, tmp_path):
    paths = run(tiny_ckpt, tmp_path)
    names = [p.relative_to(tmp_path).as_posix() for p in paths]
    assert names == ["samples/00000.png", "samples/00001.png", "grid-0000.png"]
    img = Image.open(paths[0])
    assert img.size == (64, 64) and img.mode == "RGB"
    assert img.text["prompt"] == "photo of a sks dog" and img.text["seed"] == "3"
    assert img.text["steps"] == "4" and img.text["scale"] == "5.0" and img.text["sampler"] == "ddim"
    assert img.text["checkpoint"] == "tiny.ckpt"
    # torchvision's make_grid layout: 2 px border around and between the cells.
    assert Image.open(paths[2]).size == (2 + 2 * (64 + 2), 2 + 64 + 2)
    assert np.array_equal(pixels(paths[2])[2:66, 68:132], pixels(paths[1]))  # the second cell is the second sample
    grid_text = Image.open(paths[2]).text
    assert grid_text["prompt"] == "photo of a sks dog" and grid_text["seed"] == "3"  # each prompt once
    assert pixels(paths[0]).std() > 1.0  # not a blank image


def test_same_seed_same_images_and_nothing_overwritten(tiny_ckpt, tmp_path):
    first = run(tiny_ckpt, tmp_path)
    second = run(tiny_ckpt, tmp_path)
    assert [p.name for p in second] == ["00002.png", "00003.png", "grid-0001.png"]
    for a, b in zip(first, second):
        assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))  # two different noises in one batch
    other = run(tiny_ckpt, tmp_path / "other", "--seed", "4")
    assert not np.array_equal(pixels(first[0]), pixels(other[0]))


def test_saved_checkpoint_samples_like_the_model_in_memory(tiny_model, tiny_ckpt, tmp_path):
    """Round trip: the images from the file equal those sampled directly from the model that wrote it."""
    from ldm.images import to_pil
    from ldm.models.diffusion.ddim import DDIMSampler
    paths = run(tiny_ckpt, tmp_path, "--skip_grid")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        c = tiny_model.get_learned_conditioning(2 * ["photo of a sks dog"])
        uc = tiny_model.get_learned_conditioning(2 * [""])
        z, _ = DDIMSampler(tiny_model).sample(4, 2, (4, 8, 8), conditioning=c, unconditional_conditioning=uc,
                                              unconditional_guidance_scale=5.0, generator=generator, verbose=False)
        x = tiny_model.decode_first_stage(z)
    for path, img in zip(paths, x):
        assert np.array_equal(pixels(path), np.asarray(to_pil(img)))


def test_plms_negative_prompt_and_prompt_file(tiny_ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n\na cat\na bird\n")
    paths = run(tiny_ckpt, tmp_path / "out", "--plms", "--from-file", str(prompts), "--negative_prompt", "blurry")
    assert len(paths) == 4  # three prompts in batches of two, then the grid
    texts = [Image.open(p).text for p in paths[:3]]
    assert [t["prompt"] for t in texts] == ["a dog", "a cat", "a bird"]
    assert Image.open(paths[3]).text["prompt"] == "a dog | a cat | a bird"
    assert texts[0]["sampler"] == "plms" and texts[0]["negative_prompt"] == "blurry"
    with_negative = pixels(paths[0])
    without = pixels(run(tiny_ckpt, tmp_path / "plain", "--plms", "--prompt", "a dog", "--skip_grid")[0])
    assert not np.array_equal(with_negative, without)


@pytest.mark.parametrize("flags,needle", [
    (["--H", "60"], "--H 60: must be a positive multiple of 16"),
    # 72 is a multiple of 8, but its 9x9 latent cannot go down and back up the tiny UNet's two levels
    (["--H", "72"], "--H 72: must be a positive multiple of 16"),
    (["--W", "0"], "--W 0: must be a positive multiple of 16"),
    (["--f", "4"], "--f 4: this model's VAE downsamples by 8"),
    (["--ckpt", "/nonexistent/model.ckpt"], "--ckpt /nonexistent/model.ckpt: file not found"),
    (["--from-file", "EMPTY"], "contains no prompts"),
    (["--from-file", "LATIN1"], "not UTF-8 text"),
    (["--plms", "--ddim_eta", "0.5"], "only DDIM takes eta"),
    (["--ddim_eta", "1.5"], "--ddim_eta 1.5: must be in [0, 1]"),
    (["--ddim_eta", "nan"], "--ddim_eta nan: must be a finite number"),
    (["--scale", "inf"], "--scale inf: must be a finite number"),
    (["--ddim_steps", "1001"], "--ddim_steps 1001: must be between 1 and 1000"),
    (["--ddim_steps", "0"], "--ddim_steps 0: must be between 1 and 1000"),
    (["--n_samples", "0"], "--n_samples 0: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be between 0 and"),
    (["--device", "gpu7"], "--device 'gpu7': not a device"),
    (["--lora", "x.safetensors:nan"], "the strength must be a finite number"),
    (["--lora", "x.safetensors:strong"], "is not a number"),
    (["--prompt", ""], "--prompt is empty"),
    (["--config", "BADYAML"], "not a valid YAML config"),
    (["--config", "EVILTARGET"], "configs may only name objects in"),
])
def test_bad_flags_give_one_clear_line(tiny_ckpt, tmp_path, capsys, flags, needle):
    """Each of these ran into a traceback, painted NaN (black) images with exit code 0, or ran anyway."""
    files = {"EMPTY": tmp_path / "empty.txt", "LATIN1": tmp_path / "latin1.txt", "BADYAML": tmp_path / "bad.yaml",
             "EVILTARGET": tmp_path / "evil.yaml"}
    files["EMPTY"].write_text("\n  \n")
    files["LATIN1"].write_bytes("photo of a caf\xe9".encode("latin-1"))
    files["BADYAML"].write_text("model: [unclosed\n")
    evil = TINY_CONFIG.read_text().replace("ldm.models.autoencoder.AutoencoderKL", "os.system")
    files["EVILTARGET"].write_text(evil)
    flags = [str(files[f]) if f in files else f for f in flags]
    with pytest.raises(SystemExit) as info:
        run(tiny_ckpt, tmp_path, *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert needle in err[0]
    assert not (tmp_path / "samples").exists()  # stopped before anything was written


def test_wrong_checkpoint_is_reported_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a model")
    with pytest.raises(SystemExit) as info:
        run(bad, tmp_path)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "notes.ckpt" in err


def test_two_runs_into_one_folder_at_once_keep_every_file(tiny_ckpt, tmp_path, monkeypatch):
    """Run B starts and finishes while run A is sampling (after A looked at the folder): both keep all files."""
    real = txt2img.make_sampler
    state = {"b_done": False}

    class Interleaved:
        def __init__(self, inner):
            self.inner = inner

        def sample(self, *args, **kwargs):
            if not state["b_done"]:
                state["b_done"] = True
                monkeypatch.setattr(txt2img, "make_sampler", real)
                run(tiny_ckpt, tmp_path, "--seed", "4")  # run B, complete
            return self.inner.sample(*args, **kwargs)

    monkeypatch.setattr(txt2img, "make_sampler", lambda name, model: Interleaved(real(name, model)))
    run(tiny_ckpt, tmp_path)  # run A, seed 3
    samples = sorted((tmp_path / "samples").iterdir())
    assert [p.name for p in samples] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert sorted(Image.open(p).text["seed"] for p in samples) == ["3", "3", "4", "4"]
    grids = sorted(tmp_path.glob("grid-*.png"))
    assert sorted(Image.open(p).text["seed"] for p in grids) == ["3", "4"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_full_disk_leaves_no_partial_png_and_one_line(tiny_ckpt, tmp_path):
    """A file-size limit (what a full disk looks like to a writer) stops the run with one line, and no PNG that
    looks valid but is cut short (nor a reserved empty name) is left behind."""
    import resource
    import signal
    import subprocess
    import sys
    out = tmp_path / "out"
    args = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--outdir", str(out), "--H", "64", "--W", "64",
            "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--prompt", "a dog"]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    proc = subprocess.run([sys.executable, str(REPO / "scripts/stable_txt2img.py"), *args], capture_output=True,
                          text=True, preexec_fn=limit, timeout=300, env={"PYTHONDONTWRITEBYTECODE": "1",
                                                                          "OMP_NUM_THREADS": "1", "PATH": "/usr/bin"})
    err = proc.stderr.strip().splitlines()  # the sampler's progress bar goes to stderr too
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "00000.png: cannot write: File too large" in err[-1]
    assert list(out.rglob("*")) in ([], [out / "samples"])  # nothing left but (maybe) the empty folder


def test_fixed_code_with_a_short_last_batch(tiny_ckpt, tmp_path, capsys):
    """Three prompts in batches of two: the last batch has one image and takes the first row of the fixed code,
    so prompt 3 starts from the same noise as prompt 1 (and the count printed is 3, not 4)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\na cat\na dog\n")
    paths = run(tiny_ckpt, tmp_path / "out", "--from-file", str(prompts), "--fixed_code", "--skip_grid")
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    same = np.abs(pixels(paths[0]).astype(int) - pixels(paths[2]).astype(int)).max()
    other = np.abs(pixels(paths[0]).astype(int) - pixels(paths[1]).astype(int)).max()
    assert same <= 1 and other > 10, (same, other)  # a batch of 1 vs 2 may round one level differently
    assert "\n3 images in" in capsys.readouterr().out
