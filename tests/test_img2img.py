"""Image-to-image: the original script's start step, noise level and visited timesteps in closed form (from the
schedule's formula, not our buffers), Euler's start in diffusers' convention, strength 0 = the VAE round trip
(also through diffusers' own VAE), SDXL's size conditioning, an inpainting checkpoint, files and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIG, load_script, rel_err, seeded_tiny_model
from image_edit_helpers import (TINY_INPAINT, TINY_SDXL, Recorder, diffusers_vae, draw_picture, one_line,  # noqa: F401
                                pixels)
from ldm.data.image_loading import to_tensor
from ldm.images import to_pil
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.sampling.img2img import denoise_part_way
from ldm.sampling.k_samplers import DPMPP2MSampler, EulerSampler
from ldm.weights.checkpoint import save_checkpoint

img2img = load_script("img2img")


def alphas_cumprod() -> np.ndarray:
    """SD's schedule from its formula: betas linear in sqrt between 0.00085 and 0.012 over 1000 steps (float64)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


def latents(seed: int = 0, shape=(1, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("steps, strength", [(50, 0.75), (10, 0.3), (10, 0.29), (8, 0.5), (20, 1.0), (7, 1.0)])
def test_ddim_start_and_timesteps_are_the_original_scripts(tiny_model, steps, strength):
    """The original: t_enc = int(strength * S); stochastic_encode to ddim_timesteps[t_enc]; decode over
    ddim_timesteps[:t_enc] reversed. S = 7 selects 8 timesteps (1000 // 7 = 142), so strength 1 stays inside the
    schedule there; S = 20 at strength 1 indexes one past it (the original crashes): we start from pure noise."""
    acp = alphas_cumprod()
    ddim_timesteps = np.arange(0, 1000, 1000 // steps) + 1
    t_enc = int(strength * steps)
    x0, noise = latents()
    model = Recorder(tiny_model)
    c = tiny_model.get_learned_conditioning(["photo of a sks dog"])
    denoise_part_way(DDIMSampler(model), x0, steps, strength, c, None, 1.0, noise, disable_progress=True)
    assert [t for t, _ in model.calls] == ddim_timesteps[:t_enc][::-1].tolist()
    if t_enc < len(ddim_timesteps):
        a = acp[ddim_timesteps[t_enc]]
        expected = np.sqrt(a) * x0.double() + np.sqrt(1 - a) * noise.double()
    else:
        expected = noise.double()
    assert rel_err(model.calls[0][1].double(), expected) < 1e-6


@pytest.mark.parametrize("strength, start", [(0.6, 4), (0.35, 7), (1.0, 0)])
def test_euler_starts_where_diffusers_img2img_does(tiny_model, strength, start):
    """diffusers' get_timesteps: the last int(S * strength) of the "leading" timesteps 901, 801, ..., 1 (S = 10);
    the UNet first sees (x0 + sigma noise) / sqrt(sigma^2 + 1) with sigma = sqrt((1 - abar_t) / abar_t); at
    strength 1 pure noise, i.e. exactly the unit noise."""
    acp = alphas_cumprod()
    timesteps = np.arange(9, -1, -1) * 100 + 1
    x0, noise = latents(1)
    model = Recorder(tiny_model)
    c = tiny_model.get_learned_conditioning(["photo of a sks dog"])
    denoise_part_way(EulerSampler(model), x0, 10, strength, c, None, 1.0, noise, disable_progress=True)
    assert [t for t, _ in model.calls] == timesteps[start:].tolist()
    t = timesteps[start]
    sigma = np.sqrt((1 - acp[t]) / acp[t])
    expected = noise.double() if strength == 1 else (x0.double() + sigma * noise.double()) / np.sqrt(sigma ** 2 + 1)
    assert rel_err(model.calls[0][1].double(), expected) < 1e-5


@pytest.mark.parametrize("sampler", [DDIMSampler, EulerSampler, DPMPP2MSampler])
@pytest.mark.parametrize("strength", [0.0, 0.05])
def test_strength_without_a_whole_step_returns_the_latent_unchanged(tiny_model, sampler, strength):
    x0, noise = latents(2)
    model = Recorder(tiny_model)
    out = denoise_part_way(sampler(model), x0, 10, strength, None, None, 1.0, noise)
    assert out is x0 and model.calls == []


def run(ckpt, image, outdir, *extra, config=TINY_CONFIG):
    return img2img.main(["--config", str(config), "--ckpt", str(ckpt), "--init-img", str(image), "--outdir",
                         str(outdir), "--ddim_steps", "4", "--n_samples", "2", "--seed", "5",
                         "--prompt", "photo of a sks dog", *extra])


def test_strength_zero_is_the_vae_round_trip(tiny_model, tiny_ckpt, tmp_path):
    """Ours (same seed: the posterior sample is the first draw) and diffusers' AutoencoderKL holding the same
    weights (converted by diffusers' converter) sampling the posterior with the same generator."""
    image = draw_picture(tmp_path / "in.png", 80, 64)
    paths = run(tiny_ckpt, image, tmp_path / "out", "--strength", "0", "--skip_grid")
    x = to_tensor(Image.open(image))[None].expand(2, -1, -1, -1)
    with torch.no_grad():
        z = tiny_model.get_first_stage_encoding(tiny_model.encode_first_stage(x), torch.Generator().manual_seed(5))
        ours = tiny_model.decode_first_stage(z)
        vae = diffusers_vae(tiny_model, TINY_CONFIG)
        theirs = vae.decode(vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(5))).sample
    assert rel_err(ours, theirs) < 1e-4
    assert len(paths) == 2 and not np.array_equal(pixels(paths[0]), pixels(paths[1]))  # two posterior samples
    for path, a, b in zip(paths, ours, theirs):
        assert np.array_equal(pixels(path), np.asarray(to_pil(a)))
        assert np.abs(pixels(path) - np.asarray(to_pil(b))).max() <= 1


def test_files_numbered_and_tagged_like_txt2img(tiny_ckpt, tmp_path, capsys):
    image = draw_picture(tmp_path / "in.png", 90, 70)  # resized down to multiples of 16: 80 x 64
    first = run(tiny_ckpt, image, tmp_path / "out")
    assert "resized from 90x70 to 80x64" in capsys.readouterr().out
    second = run(tiny_ckpt, image, tmp_path / "out")
    names = [p.relative_to(tmp_path / "out").as_posix() for p in first + second]
    assert names == ["samples/00000.png", "samples/00001.png", "grid-0000.png",
                     "samples/00002.png", "samples/00003.png", "grid-0001.png"]
    for a, b in zip(first, second):
        assert np.array_equal(pixels(a), pixels(b))  # same seed, same pictures
    img = Image.open(first[0])
    assert img.size == (80, 64)
    assert {k: img.text[k] for k in ("prompt", "init_image", "strength", "steps", "scale", "sampler", "seed")} == {
        "prompt": "photo of a sks dog", "init_image": "in.png", "strength": "0.75", "steps": "4", "scale": "5.0",
        "sampler": "ddim", "seed": "5"}
    # Strength matters, and it is not the round trip.
    stronger = run(tiny_ckpt, image, tmp_path / "strong", "--strength", "1", "--skip_grid")
    assert not np.array_equal(pixels(first[0]), pixels(stronger[0]))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_k_samplers_run_from_the_script(tiny_ckpt, tmp_path, sampler):
    image = draw_picture(tmp_path / "in.png", 64, 64)
    a = run(tiny_ckpt, image, tmp_path / "a", "--sampler", sampler, "--fixed_code", "--n_iter", "2", "--skip_grid")
    assert len(a) == 4 and Image.open(a[0]).text["sampler"] == sampler
    assert pixels(a[0]).std() > 1.0


def test_sdxl_conditions_on_the_processed_size(tmp_path, monkeypatch):
    from ldm.models.diffusion.ddpm import LatentDiffusion
    model = seeded_tiny_model(TINY_SDXL)
    ckpt = save_checkpoint(tmp_path / "sdxl.safetensors", model.state_dict())
    seen = []
    real = LatentDiffusion.default_sizes

    def spy(self, *args, **kwargs):
        sizes = real(self, *args, **kwargs)
        seen.append({k: v.tolist() for k, v in sizes.items()})
        return sizes

    monkeypatch.setattr(LatentDiffusion, "default_sizes", spy)
    image = draw_picture(tmp_path / "in.png", 100, 70)  # multiples of 32: 96 x 64
    (path,) = run(ckpt, image, tmp_path / "out", "--n_samples", "1", "--skip_grid", config=TINY_SDXL)
    assert Image.open(path).size == (96, 64)
    assert seen == [{"original_size_as_tuple": [[64, 96]], "crop_coords_top_left": [[0, 0]],
                     "target_size_as_tuple": [[64, 96]]}]


def test_an_inpainting_checkpoint_repaints_everything(tmp_path, capsys):
    from ldm.sampling.inpaint import encode_inputs
    model = seeded_tiny_model(TINY_INPAINT)
    ckpt = save_checkpoint(tmp_path / "inpaint.ckpt", model.state_dict())
    image = draw_picture(tmp_path / "in.png", 64, 48)
    paths = run(ckpt, image, tmp_path / "out", "--skip_grid", config=TINY_INPAINT)
    assert "an inpainting model; img2img uses it with a mask covering the whole image" in capsys.readouterr().out
    assert len(paths) == 2 and Image.open(paths[0]).size == (64, 48)
    with torch.no_grad():
        encoded = encode_inputs(model, to_tensor(Image.open(image))[None], None, 2)
    mask, masked = encoded.concat
    assert mask.shape == (2, 1, 6, 8) and bool((mask == 1).all()) and masked.shape == (2, 4, 6, 8)
    assert encoded.keep is None


def test_bad_input_is_one_line_before_the_model_loads(tiny_ckpt, tmp_path, monkeypatch, one_line):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(img2img, "load_sampling_model", no_model)
    good = draw_picture(tmp_path / "in.png", 64, 64)
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    Image.new("RGB", (10, 40)).save(tmp_path / "small.png")
    cases = [
        (["--init-img", str(tmp_path / "missing.png")], "--init-img " + str(tmp_path / "missing.png") +
         ": file not found"),
        (["--init-img", str(tmp_path / "notes.png")], "not an image Pillow can read"),
        (["--init-img", str(tmp_path / "cut.png")], "cannot decode image"),
        (["--init-img", str(tmp_path / "small.png")], "10x40 pixels; both sides must be at least 16"),
        (["--strength", "1.5"], "--strength 1.5: must be in [0, 1]"),
        (["--strength", "-0.1"], "--strength -0.1: must be in [0, 1]"),
        (["--strength", "nan"], "--strength nan: must be a finite number"),
        (["--plms"], "PLMS cannot start part-way"),
        (["--ddim_steps", "0"], "--ddim_steps 0: must be between 1 and 1000"),
    ]
    for flags, needle in cases:
        image = [] if "--init-img" in flags else ["--init-img", str(good)]
        line = one_line(img2img.main, ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--outdir",
                                       str(tmp_path / "out"), *image, *flags])
        assert needle in line, (flags, line)
    line = one_line(img2img.main, ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt)])
    assert "--init-img is required" in line
    assert not (tmp_path / "out").exists()
