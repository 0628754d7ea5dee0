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
TINY_SDXL_CONFIG = REPO / "configs/stable-diffusion/tiny-sdxl-inference.yaml"
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


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (its ``main(argv)`` is what the command line runs)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path: Path = TINY_CONFIG):
    return OmegaConf.load(path)


def reference_layout(name: str = "sd-v1-state-dict.tsv") -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype) from the reference layout file in ../shared/reference (not the package's copy)."""
    from ldm.reference import read_layout
    return read_layout(SHARED / "reference" / name)


def seeded_tiny_model(config: Path = TINY_CONFIG, seed: int = 0):
    """The model of ``config`` with seeded random weights everywhere (text encoders included)."""
    from ldm.util import instantiate_from_config
    torch.manual_seed(seed)
    model = instantiate_from_config(load_config(config).model)
    randomize_(model.model, seed=1)
    randomize_(model.first_stage_model, seed=2, std=0.1)
    randomize_(model.text_model, seed=3)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model():
    return seeded_tiny_model(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model, tmp_path_factory) -> Path:
    from ldm.weights.checkpoint import save_checkpoint
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    return save_checkpoint(path, tiny_model.state_dict(), global_step=7)


@pytest.fixture(scope="session")
def tiny_sdxl_model():
    """The toy SDXL of tiny-sdxl-inference.yaml (two text encoders, size conditioning) with seeded random weights."""
    return seeded_tiny_model(TINY_SDXL_CONFIG)


@pytest.fixture(scope="session")
def tiny_sdxl_ckpt(tiny_sdxl_model, tmp_path_factory) -> Path:
    from ldm.weights.checkpoint import save_checkpoint
    path = tmp_path_factory.mktemp("ckpt-sdxl") / "tiny-sdxl.safetensors"
    return save_checkpoint(path, tiny_sdxl_model.state_dict(), global_step=7)




@pytest.fixture(scope="session")
def tiny_sdxl_folder(tiny_sdxl_ckpt, tmp_path_factory) -> Path:
    """``tiny_sdxl_ckpt`` as a diffusers ``StableDiffusionXLPipeline`` folder, by scripts/convert_to_diffusers.py."""
    out = tmp_path_factory.mktemp("diffusers-sdxl") / "tiny-sdxl"
    return load_script("convert_to_diffusers").main([str(tiny_sdxl_ckpt), str(out), "--config", str(TINY_SDXL_CONFIG)])


def diffusers_unet_config(unet_params: dict, vae_ch_mult=(1, 2, 4, 4)) -> dict:
    """The ``UNet2DConditionModel`` config that diffusers' own single-file loader derives from a CompVis-style
    config: independent of our export code."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    original = {"model": {"params": {"unet_config": {"params": dict(unet_params)},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": list(vae_ch_mult)}}}}}}
    return create_unet_diffusers_config_from_ldm(original, {})


def diffusers_unet(ldm_model, config=None):
    """The UNet of ``ldm_model`` (built from ``config``, the tiny one by default) converted by diffusers' own
    converter into diffusers' ``UNet2DConditionModel``: an independent implementation holding the same weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    config = OmegaConf.to_container(config if config is not None else load_config(), resolve=True)
    params = config["model"]["params"]
    unet_config = diffusers_unet_config(params["unet_config"]["params"],
                                        params["first_stage_config"]["params"]["ddconfig"]["ch_mult"])
    unet = UNet2DConditionModel(**unet_config).eval()
    sd = {k: v for k, v in ldm_model.state_dict().items() if k.startswith("model.diffusion_model.")}
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet_config), strict=True)
    return unet


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


#: The test files that take minutes, slowest first: run first, so that a parallel run (pytest -n auto --dist
#: loadfile) ends with short files on every worker instead of one long file on one.
SLOW_FILES = ("test_toy_controls.py", "test_toy_model.py", "test_benchmark.py", "test_webui_browser.py",
              "test_flux_training.py", "test_toy_world.py", "test_lean.py", "test_train.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


TINY_FLUX_CONFIG = REPO / "configs/flux/tiny-flux-inference.yaml"


@pytest.fixture(scope="session")
def t5_tokenizer(tmp_path_factory) -> Path:
    """A 300-piece SentencePiece model with T5's special ids (the real spiece.model is not shipped)."""
    from helpers import train_spiece
    return train_spiece(tmp_path_factory.mktemp("t5-tokenizer"))


def tiny_flux_config(tokenizer: Path, config: Path = TINY_FLUX_CONFIG):
    """The tiny FLUX config with the test tokenizer as its T5 tokenizer."""
    cfg = load_config(config)
    cfg.model.params.conditioner_config.params.emb_models[1].params.tokenizer_path = str(tokenizer)
    return cfg


def seeded_flux_model(config):
    """The model of a (tiny) FLUX config with seeded random weights everywhere (norm scales included)."""
    from ldm.util import instantiate_from_config
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    randomize_(model.model, seed=1)
    randomize_(model.first_stage_model, seed=2, std=0.1)
    randomize_(model.conditioner, seed=3)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_flux_model(t5_tokenizer):
    return seeded_flux_model(tiny_flux_config(t5_tokenizer))
