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
    assert texts[0]["sampler"] == "plms" and texts[0]["negative_prompt"] == "blurry"
    with_negative = pixels(paths[0])
    without = pixels(run(tiny_ckpt, tmp_path / "plain", "--plms", "--prompt", "a dog", "--skip_grid")[0])
    assert not np.array_equal(with_negative, without)


@pytest.mark.parametrize("flags,needle", [
    (["--H", "60"], "--H 60 must be a positive multiple of 8"),
    (["--W", "0"], "--W 0 must be a positive multiple of 8"),
    (["--ckpt", "/nonexistent/model.ckpt"], "--ckpt /nonexistent/model.ckpt: file not found"),
    (["--from-file", "EMPTY"], "contains no prompts"),
    (["--plms", "--ddim_eta", "0.5"], "--plms needs --ddim_eta 0"),
    (["--prompt", ""], "--prompt is empty"),
])
def test_bad_flags_give_one_clear_line(tiny_ckpt, tmp_path, capsys, flags, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    flags = [str(empty) if f == "EMPTY" else f for f in flags]
    with pytest.raises(SystemExit) as info:
        run(tiny_ckpt, tmp_path, *flags)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_wrong_checkpoint_is_reported_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a model")
    with pytest.raises(SystemExit) as info:
        run(bad, tmp_path)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "notes.ckpt" in err
