"""Shared fixtures: the tiny model of configs/stable-diffusion/tiny-inference.yaml with seeded random weights."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY_CONFIG = REPO / "configs/stable-diffusion/tiny-inference.yaml"
V1_CONFIG = REPO / "configs/stable-diffusion/v1-inference.yaml"
sys.path.insert(0, str(REPO))

# Tiny models gain nothing from more threads, and OpenMP threads that wait on a busy core slow a step 20x.
torch.set_num_threads(1)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter (zero-initialised output layers and norms included) seeded random values, so no
    comparison passes because a layer is identically zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if name.endswith("weight") and ("norm" in name or p.ndim == 1):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return module


def load_config(path: Path = TINY_CONFIG):
    return OmegaConf.load(path)


def reference_layout(name: str = "sd-v1-state-dict.tsv") -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype) from the reference layout file of the original SD v1 checkpoints."""
    rows = {}
    for line in (SHARED / "reference" / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        dims = shape.strip("[]")
        rows[key] = (tuple(int(d) for d in dims.split(",")) if dims else (), dtype)
    return rows


@pytest.fixture(scope="session")
def tiny_model():
    from ldm.util import instantiate_from_config
    torch.manual_seed(0)
    model = instantiate_from_config(load_config().model)
    randomize_(model.model, seed=1)
    randomize_(model.first_stage_model, seed=2, std=0.1)
    randomize_(model.cond_stage_model, seed=3)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model, tmp_path_factory) -> Path:
    from ldm.checkpoint import save_checkpoint
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    return save_checkpoint(path, tiny_model.state_dict(), global_step=7)


def diffusers_unet(ldm_model):
    """The tiny UNet of ``ldm_model`` converted by diffusers' own converter into diffusers'
    ``UNet2DConditionModel``: an independent implementation holding the same weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32, norm_eps=1e-5,
        flip_sin_to_cos=True, freq_shift=0)
    unet = UNet2DConditionModel(**config).eval()
    sd = {k: v for k, v in ldm_model.state_dict().items() if k.startswith("model.diffusion_model.")}
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, config), strict=True)
    return unet


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
