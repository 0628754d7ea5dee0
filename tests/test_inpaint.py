"""Inpainting: the feathered mask against its brute-force definition; untouched pixels beyond it (v1 and SDXL, an
image whose sides are no multiple of the model's factor, whole image and --only_masked); the known latents of a
regular model, pasted back as the original DDIMSampler does; the 9-channel model against diffusers'
StableDiffusionInpaintPipeline; the inpainting config against the released layout; files and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (REPO, TINY_CONFIG, V1_CONFIG, load_config, load_script, rel_err, reference_layout,
                      seeded_tiny_model)
from image_edit_helpers import (TINY_INPAINT, TINY_SDXL, Recorder, brute_force_feather, draw_mask,  # noqa: F401
                                draw_picture, one_line, pixels)
from ldm.data.image_loading import to_tensor
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.sampling.cli import guidance_conditioning
from ldm.sampling.img2img import denoise_part_way
from ldm.sampling.inpaint import encode_inputs, plan_region, with_concat
from ldm.sampling.k_samplers import DPMPP2MSampler, EulerSampler
from ldm.sampling.masks import feather, latent_mask
from ldm.util import instantiate_from_config
from ldm.weights.checkpoint import save_checkpoint

inpaint = load_script("inpaint")
V1_INPAINT = REPO / "configs/stable-diffusion/v1-inpainting-inference.yaml"
MASK_BOX = (20, 30, 37, 44)  # left, top, right, bottom (inclusive) in a 70 x 90 picture


@pytest.fixture(scope="module")
def sdxl_ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors", seeded_tiny_model(TINY_SDXL).state_dict())


@pytest.fixture(scope="module")
def inpaint_model():
    return seeded_tiny_model(TINY_INPAINT)


@pytest.fixture(scope="module")
def inpaint_ckpt(inpaint_model, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("inpaint") / "inpaint.ckpt", inpaint_model.state_dict())


@pytest.fixture
def picture(tmp_path):
    """A 70 x 90 picture (no multiple of 16 or 32) and a mask file drawing MASK_BOX."""
    return draw_picture(tmp_path / "photo.png", 70, 90), draw_mask(tmp_path / "mask.png", 70, 90, MASK_BOX)


def run(ckpt, image, outdir, *extra, config=TINY_CONFIG):
    return inpaint.main(["--config", str(config), "--ckpt", str(ckpt), "--image", str(image), "--outdir",
                         str(outdir), "--ddim_steps", "4", "--n_samples", "1", "--seed", "2", "--skip_grid",
                         "--prompt", "photo of sks person, detailed eyes", *extra])


# ---- the mask ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("radius", [0, 1, 3, 6])
def test_feather_is_its_definition(radius):
    g = torch.Generator().manual_seed(radius)
    mask = torch.rand(31, 37, generator=g) > 0.97
    mask[5:9, 20:33] = True
    ours = feather(mask, radius).numpy()
    reference = brute_force_feather(mask.numpy(), radius)
    assert np.abs(ours - reference).max() < 1e-6
    assert np.array_equal(ours > 0, reference > 0) and (ours[mask.numpy()] == 1).all()


@pytest.mark.parametrize("size, radius", [((3, 3), 4), ((1, 5), 6), ((4, 2), 256)])
def test_feather_wider_than_the_image_is_its_definition(size, radius):
    mask = torch.zeros(size, dtype=torch.bool)
    mask[size[0] // 2, size[1] // 2] = True
    ours = feather(mask, radius).numpy()
    assert np.abs(ours - brute_force_feather(mask.numpy(), radius)).max() < 1e-6


def test_a_picture_smaller_than_the_feather(tiny_ckpt, tmp_path):
    """A 3x3 picture with a one-pixel mask and the default 4 px feather: generated at the model's smallest size and
    pasted back through the feather, the result 3x3 again."""
    Image.new("RGB", (3, 3), (10, 200, 30)).save(tmp_path / "tiny.png")
    mask = Image.new("L", (3, 3), 0)
    mask.putpixel((1, 1), 255)
    mask.save(tmp_path / "dot.png")
    (path,) = run(tiny_ckpt, tmp_path / "tiny.png", tmp_path / "out", "--mask", str(tmp_path / "dot.png"))
    assert Image.open(path).size == (3, 3)


def test_only_masked_region_gets_the_native_area():
    """A 40 x 30 face in a 2000 x 1500 photo: the box with its surroundings is generated at about 512^2 pixels
    (SD v1: sides multiple of 64 for the full UNet), with the box's aspect ratio."""
    mask = torch.zeros(1500, 2000, dtype=torch.bool)
    mask[700:730, 1000:1040] = True
    region = plan_region(feather(mask, 4), True, 32, 512, 64)
    assert region.box == (700 - 36, 1000 - 36, 730 + 36, 1040 + 36)
    (h, w), (bh, bw) = region.size, region.source_size
    assert h % 64 == 0 and w % 64 == 0 and abs(h * w / 512 ** 2 - 1) < 0.15 and abs((w / h) / (bw / bh) - 1) < 0.15


# ---- pixels beyond the feathered mask ----------------------------------------------------------------------------
def check_only_the_mask_changed(original, result, mask_box, blur):
    mask = np.zeros(original.shape[:2], dtype=bool)
    left, top, right, bottom = mask_box
    mask[top:bottom + 1, left:right + 1] = True
    support = brute_force_feather(mask, blur) > 0
    assert result.shape == original.shape
    assert np.array_equal(result[~support], original[~support])
    assert np.abs(result[mask] - original[mask]).max() > 8  # the masked part was repainted


@pytest.mark.parametrize("only_masked", [False, True])
@pytest.mark.parametrize("family", ["v1", "sdxl"])
def test_pixels_beyond_the_feathered_mask_are_unchanged(family, only_masked, tiny_ckpt, sdxl_ckpt, picture,
                                                        tmp_path, monkeypatch):
    from ldm.models.diffusion.ddpm import LatentDiffusion
    seen = []
    real = LatentDiffusion.default_sizes
    monkeypatch.setattr(LatentDiffusion, "default_sizes",
                        lambda self, *a, **k: seen.append((a, k)) or real(self, *a, **k))
    image, mask = picture
    ckpt, config = (tiny_ckpt, TINY_CONFIG) if family == "v1" else (sdxl_ckpt, TINY_SDXL)
    flags = ["--mask", str(mask), "--mask_blur", "3", "--padding", "6"] + (["--only_masked"] if only_masked else [])
    (path,) = run(ckpt, image, tmp_path / "out", *flags, config=config)
    check_only_the_mask_changed(pixels(image), pixels(path), MASK_BOX, 3)
    (_, height, width), kwargs = seen[0]
    factor = 16 if family == "v1" else 32
    assert height % factor == 0 and width % factor == 0
    if only_masked:  # the box: mask (18 x 15) + 3 px feather + 6 px padding, generated at about 64^2 pixels
        assert kwargs["original"] == (15 + 18, 18 + 18) and abs(height * width / 64 ** 2 - 1) < 0.3
    else:  # the whole picture, padded up to multiples of the factor
        assert kwargs["original"] == (90, 70) and (height, width) == {16: (96, 80), 32: (96, 96)}[factor]


def test_transparent_pixels_are_the_mask(tiny_ckpt, tmp_path):
    rgba = Image.open(draw_picture(tmp_path / "photo.png", 70, 90, mode="RGBA"))
    alpha = np.full((90, 70), 255, dtype=np.uint8)
    alpha[30:45, 20:38] = 0
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "holes.png")
    (path,) = run(tiny_ckpt, tmp_path / "holes.png", tmp_path / "out", "--mask_blur", "2", "--strength", "1")
    assert Image.open(path).text["mask"] == "alpha"
    check_only_the_mask_changed(pixels(tmp_path / "holes.png"), pixels(path), MASK_BOX, 2)


# ---- the latents of a regular model -----------------------------------------------------------------------------
def keep_mask():
    keep = torch.ones(1, 1, 8, 8)
    keep[..., 2:6, 3:7] = 0
    return keep


@pytest.mark.parametrize("sampler", [DDIMSampler, EulerSampler, DPMPP2MSampler])
def test_known_latents_come_back_exactly(tiny_model, sampler):
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    c, uc = guidance_conditioning(tiny_model, 2 * ["photo of a sks dog"], "", 4.0)
    keep = keep_mask()
    out = denoise_part_way(sampler(tiny_model), x0, 6, 0.75, c, uc, 4.0, noise, g, keep=keep, disable_progress=True)
    assert torch.equal(out * keep, x0 * keep)
    assert (out - x0).abs()[..., 2:6, 3:7].mean() > 1e-2  # the hole is generated


def test_euler_pastes_the_known_region_with_the_same_noise(tiny_model):
    """diffusers' inpainting pipeline for 4-channel models: after each step the known region is x0 noised with the
    starting noise to the next sigma; so every UNet input there is (x0 + sigma_t noise) / sqrt(sigma_t^2 + 1)."""
    acp = tiny_model.alphas_cumprod.double()
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    keep = keep_mask()
    model = Recorder(tiny_model)
    c = tiny_model.get_learned_conditioning(["photo of a sks dog"])
    denoise_part_way(EulerSampler(model), x0, 10, 0.5, c, None, 1.0, noise, keep=keep, disable_progress=True)
    assert [t for t, _ in model.calls] == [401, 301, 201, 101, 1]
    for t, x in model.calls:
        sigma = ((1 - acp[t]) / acp[t]).sqrt()
        expected = (x0.double() + sigma * noise.double()) / (sigma ** 2 + 1).sqrt()
        assert rel_err((x * keep).double(), expected * keep) < 1e-5


def test_ddim_pastes_the_known_region_noised_to_each_step(tiny_model):
    """The original DDIMSampler: before each step, img = q_sample(x0, t) * mask + (1 - mask) * img, i.e.
    sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with fresh eps (here the generator's next draw; eta 0.5 draws again
    for its own noise after it)."""
    acp = tiny_model.alphas_cumprod.double()
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    keep = keep_mask()
    model = Recorder(tiny_model)
    c = tiny_model.get_learned_conditioning(["photo of a sks dog"])
    denoise_part_way(DDIMSampler(model), x0, 5, 0.8, c, None, 1.0, noise, torch.Generator().manual_seed(9),
                     keep=keep, eta=0.5, disable_progress=True)
    replay = torch.Generator().manual_seed(9)
    assert [t for t, _ in model.calls] == [601, 401, 201, 1]
    for t, x in model.calls:
        eps = torch.randn(x0.shape, generator=replay)
        torch.randn(x0.shape, generator=replay)  # eta's noise
        expected = acp[t].sqrt() * x0.double() + (1 - acp[t]).sqrt() * eps.double()
        assert rel_err((x * keep).double(), expected * keep) < 1e-6


# ---- the inpainting (9-channel) model ---------------------------------------------------------------------------
def test_inpainting_config_is_the_released_layout():
    """sd-v1-5-inpainting.ckpt: the v1 reference layout with a 9-channel UNet input conv."""
    with torch.device("meta"):
        model = instantiate_from_config(load_config(V1_INPAINT).model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: shape for k, (shape, _) in reference_layout().items()}
    assert expected["model.diffusion_model.input_blocks.0.0.weight"] == (320, 4, 3, 3)
    expected["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    assert ours == expected
    from ldm.families import config_family, detect_family
    assert config_family(load_config(V1_INPAINT)) == detect_family(ours) == "sd-v1-inpainting"
    assert config_family(load_config(V1_CONFIG)) == "sd-v1"


def test_nine_channel_model_matches_diffusers_inpainting_pipeline(inpaint_model, inpaint_ckpt, tmp_path):
    """Exported by scripts/convert_to_diffusers.py; the same prompts, start latents, mask (our latent mask, which
    diffusers' nearest downsampling gives back exactly) and masked-image latents: DDIM, 4 steps, guidance 5."""
    import diffusers
    folder = load_script("convert_to_diffusers").main([str(inpaint_ckpt), str(tmp_path / "pipe"), "--config",
                                                   str(TINY_INPAINT)])
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    assert isinstance(pipe, diffusers.StableDiffusionInpaintPipeline)  # model_index.json names the right class
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 9
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False,
                                                         set_alpha_to_one=False, steps_offset=1,
                                                         timestep_spacing="leading")
    image = to_tensor(Image.open(draw_picture(tmp_path / "photo.png", 80, 64)))[None]
    repaint = torch.zeros(64, 80, dtype=torch.bool)
    repaint[13:40, 21:50] = True  # not aligned with the 8 x 8 latent cells
    prompts, steps, scale = ["photo of sks person, detailed eyes", "a red car"], 4, 5.0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        encoded = encode_inputs(inpaint_model, image, repaint, 2, g)
        c, uc = guidance_conditioning(inpaint_model, prompts, "", scale)
        noise = torch.randn(encoded.x0.shape, generator=g)
        ours = denoise_part_way(DDIMSampler(inpaint_model), encoded.x0, steps, 1.0, with_concat(c, encoded.concat),
                                with_concat(uc, encoded.concat), scale, noise, g, disable_progress=True)
        mask, masked = encoded.concat
        assert torch.equal(mask[0], latent_mask(repaint, 8)[0])
        # The masked image as diffusers makes it (image * (mask < 0.5)) through its own VAE, sampled with the draw
        # that follows the two image latents.
        replay = torch.Generator().manual_seed(0)
        torch.randn(encoded.x0.shape, generator=replay)
        dist = pipe.vae.encode(image * (repaint < 0.5)).latent_dist
        assert rel_err(masked[0], dist.sample(generator=replay)[0] * pipe.vae.config.scaling_factor) < 1e-4
        pixel_mask = mask[:1].repeat_interleave(8, 2).repeat_interleave(8, 3)
        theirs = pipe(prompts, image=(image + 1) / 2, mask_image=pixel_mask, masked_image_latents=masked, height=64,
                      width=80, num_inference_steps=steps, guidance_scale=scale, latents=noise.clone(), strength=1.0,
                      output_type="latent").images
    assert ours.shape == theirs.shape == (2, 4, 8, 10)
    assert rel_err(ours, theirs) < 1e-4
    # The mask and the masked image matter (so the comparison above is not of two models ignoring them).
    with torch.no_grad():
        other = [torch.zeros_like(mask), masked]
        ignored = denoise_part_way(DDIMSampler(inpaint_model), encoded.x0, steps, 1.0, with_concat(c, other),
                                   with_concat(uc, other), scale, noise, g, disable_progress=True)
    assert rel_err(ignored, ours) > 1e-3


def test_inpainting_checkpoint_in_the_script(inpaint_ckpt, picture, tmp_path, capsys):
    image, mask = picture
    (path,) = run(inpaint_ckpt, image, tmp_path / "out", "--mask", str(mask), "--mask_blur", "2",
                  config=TINY_INPAINT)
    assert Image.open(path).text["strength"] == "1.0"  # the inpainting model's default
    check_only_the_mask_changed(pixels(image), pixels(path), MASK_BOX, 2)
    # Without --config: recognised from the file, and the (full-size) inpainting config is chosen.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        inpaint.main(["--ckpt", str(inpaint_ckpt), "--image", str(image), "--mask", str(mask)])
    out, err = capsys.readouterr()
    assert "Stable Diffusion v1 inpainting (9-channel UNet) (config v1-inpainting-inference.yaml)" in out
    assert len(err.strip().splitlines()) == 1 and "of another size than the config builds" in err


def test_regular_checkpoint_with_the_inpainting_config_is_one_line(tiny_ckpt, picture, tmp_path, one_line):
    image, mask = picture
    line = one_line(inpaint.main, ["--config", str(TINY_INPAINT), "--ckpt", str(tiny_ckpt), "--image", str(image),
                                   "--mask", str(mask), "--outdir", str(tmp_path / "out")])
    assert "it is a Stable Diffusion v1 checkpoint, but the config builds another model" in line
    assert "configs/stable-diffusion/v1-inference.yaml" in line


# ---- the command line --------------------------------------------------------------------------------------------
def test_files_numbered_and_tagged_never_overwritten(tiny_ckpt, picture, tmp_path, capsys):
    image, mask = picture
    # A mask of another size but the same shape (within 1 %) is resized, and said so.
    Image.open(mask).resize((140, 181)).save(tmp_path / "big-mask.png")
    args = ["--mask", str(tmp_path / "big-mask.png"), "--n_samples", "2", "--prompt", "photo of sks person"]
    first = inpaint.main(["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--image", str(image),
                          "--outdir", str(tmp_path / "out"), "--ddim_steps", "4", "--seed", "2", *args])
    assert "resized from 140x181 to the image's 70x90 pixels" in capsys.readouterr().out
    second = inpaint.main(["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--image", str(image),
                           "--outdir", str(tmp_path / "out"), "--ddim_steps", "4", "--seed", "2", *args])
    names = [p.relative_to(tmp_path / "out").as_posix() for p in first + second]
    assert names == ["samples/00000.png", "samples/00001.png", "grid-0000.png",
                     "samples/00002.png", "samples/00003.png", "grid-0001.png"]
    for a, b in zip(first, second):
        assert np.array_equal(pixels(a), pixels(b))
    text = Image.open(first[0]).text
    assert {k: text[k] for k in ("prompt", "init_image", "mask", "strength", "mask_blur", "steps", "sampler",
                                 "size", "seed")} == {
        "prompt": "photo of sks person", "init_image": "photo.png", "mask": "big-mask.png",
        "strength": "0.75", "mask_blur": "4", "steps": "4", "sampler": "ddim", "size": "70x90", "seed": "2"}
    assert Image.open(first[2]).size == (2 + 2 * (70 + 2), 2 + 90 + 2)


def test_bad_input_is_one_line_before_the_model_loads(tiny_ckpt, picture, tmp_path, monkeypatch, one_line):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(inpaint, "load_sampling_model", no_model)
    image, mask = picture
    Image.new("L", (70, 90), 0).save(tmp_path / "empty.png")
    draw_mask(tmp_path / "white.png", 70, 90, (0, 0, 70, 90))
    draw_mask(tmp_path / "wide.png", 90, 90, MASK_BOX)
    (tmp_path / "notes.png").write_text("not a picture")
    m = ["--mask", str(mask)]
    cases = [
        (["--mask", str(tmp_path / "wide.png")], "90x90 pixels, another shape than --image"),
        (["--mask", str(tmp_path / "empty.png")], "nothing to repaint"),
        (["--mask", str(tmp_path / "white.png")], "the mask covers the whole image; to change all of it use "
                                                  "scripts/img2img.py"),
        (["--mask", str(tmp_path / "notes.png")], "notes.png: not an image Pillow can read"),
        (["--mask", str(tmp_path / "missing.png")], "missing.png: file not found"),
        ([], "no --mask given and the image has no transparent pixels"),
        ([*m, "--strength", "2"], "--strength 2.0: must be in [0, 1]"),
        ([*m, "--strength", "inf"], "--strength inf: must be a finite number"),
        ([*m, "--sampler", "plms"], "PLMS cannot start part-way"),
        ([*m, "--mask_blur", "-1"], "--mask_blur -1: must be between 0 and"),
        ([*m, "--padding", "-3"], "--padding -3: must be 0 or more"),
        ([*m, "--ddim_eta", "2"], "--ddim_eta 2.0: must be in [0, 1]"),
    ]
    for flags, needle in cases:
        line = one_line(inpaint.main, ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--image", str(image),
                                       "--outdir", str(tmp_path / "out"), *flags])
        assert needle in line, (flags, line)
    line = one_line(inpaint.main, ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), *m])
    assert "--image is required" in line
    assert not (tmp_path / "out").exists()
