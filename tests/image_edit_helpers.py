"""Helpers for the img2img and inpainting tests: tiny SDXL and inpainting configs, drawn pictures and masks, diffusers' VAE holding our weights, and a model wrapper that records what the UNet sees."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from conftest import REPO

TINY_SDXL = REPO / "configs/stable-diffusion/tiny-sdxl-inference.yaml"
TINY_INPAINT = REPO / "configs/stable-diffusion/tiny-inpainting-inference.yaml"




def draw_picture(path: Path, width: int, height: int, mode: str = "RGB") -> Path:
    """A blue-grey picture with a red disc and a yellow square (``mode`` RGBA: fully opaque)."""
    img = Image.new("RGB", (width, height), (90, 110, 140))
    d = ImageDraw.Draw(img)
    d.ellipse([width // 8, height // 5, width // 8 + width // 2, height // 5 + height // 2], fill=(220, 40, 40))
    d.rectangle([width // 2, height // 2, width - 6, height - 8], fill=(240, 220, 30))
    img.convert(mode).save(path)
    return path


def draw_mask(path: Path, width: int, height: int, box: tuple[int, int, int, int]) -> Path:
    """Black with a white rectangle ``box`` = (left, top, right, bottom), inclusive."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    mask.save(path)
    return path


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int64)


def brute_force_feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """The feathered mask from its definition, by brute force over every pair of pixels: 1 - d / (radius + 1) for
    the Euclidean distance d to the nearest mask pixel when d <= radius, else 0."""
    ys, xs = np.nonzero(mask)
    gy, gx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    d = np.sqrt((gy[..., None] - ys) ** 2 + (gx[..., None] - xs) ** 2).min(axis=-1)
    return np.where(d <= radius, 1 - d / (radius + 1), 0.0)


def diffusers_vae(model, config_path: Path):
    """Our VAE converted by diffusers' own converter into diffusers' ``AutoencoderKL``."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    original = OmegaConf.to_container(OmegaConf.load(config_path))
    config = create_vae_diffusers_config_from_ldm(original, {})
    sd = {"first_stage_model." + k: v for k, v in model.first_stage_model.state_dict().items()}
    vae = AutoencoderKL(**config).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, config), strict=True)
    return vae


class Recorder:
    """``model`` for a sampler, recording every (timestep, input latent) the UNet is given (use it without
    guidance, so that each call is one batch)."""

    def __init__(self, model):
        self.model = model
        self.alphas_cumprod = model.alphas_cumprod
        self.num_timesteps = model.num_timesteps
        self.calls: list[tuple[int, torch.Tensor]] = []

    def apply_model(self, x, t, cond):
        self.calls.append((int(t[0]), x.clone()))
        return self.model.apply_model(x, t, cond)


@pytest.fixture
def one_line(capsys):
    """Run a script's main with these arguments; it must exit 2 with exactly one line on stderr: returns it."""
    def run(main, args):
        with pytest.raises(SystemExit) as info:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1, err
        return err[0]
    return run
