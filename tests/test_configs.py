"""Every shipped config: every key is one the code takes (checked against the signatures of the classes it names)
and none is a key the code accepts only for the original configs' sake."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from ldm.config import load_configs
from ldm.training.config import _check_object, check_keys, unread_keys

# Every complete training config (a model and a data section).
TRAINING = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml")
                  if {"model", "data"} <= set(OmegaConf.load(p)) and "target" in OmegaConf.load(p).model)
PAPER = {"dreambooth/paper-tiny.yaml": "stable-diffusion/tiny-finetune.yaml",
         "dreambooth/paper-sd.yaml": "stable-diffusion/v1-finetune_unfrozen.yaml"}
# Every config with a whole model section (the paper configs are partial: merged onto the ones above).
MODELS = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml")
                if "target" in (OmegaConf.load(p).get("model") or {}))


@pytest.mark.parametrize("name", TRAINING + list(PAPER))
def test_training_configs_name_only_keys_that_are_read(name):
    files = [REPO / "configs" / PAPER[name], REPO / "configs" / name] if name in PAPER else [REPO / "configs" / name]
    config = load_configs(files)
    check_keys(config)
    assert unread_keys(OmegaConf.to_container(config.model), "model") == []


@pytest.mark.parametrize("name", MODELS)
def test_every_model_section_is_read(name):
    config = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / name))
    _check_object(config["model"], "model", extra=("base_learning_rate",))
    assert unread_keys(config["model"], "model") == []


@pytest.mark.parametrize("name", MODELS)
def test_every_model_section_builds_on_the_meta_device(name):
    """Each target the config names (after the package moves, through the same paths) builds its model."""
    import torch

    from ldm.util import instantiate_from_config
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(REPO / "configs" / name).model)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_an_original_config_key_is_noticed():
    """The check can fail: the original configs' log_every_t is accepted, and reported as doing nothing."""
    config = OmegaConf.to_container(OmegaConf.load(REPO / "configs/stable-diffusion/v1-inference.yaml"))
    config["model"]["params"]["log_every_t"] = 200
    config["model"]["params"]["unet_config"]["params"]["image_size"] = 32
    assert sorted(unread_keys(config["model"], "model")) == ["model.params.log_every_t",
                                                              "model.params.unet_config.params.image_size"]
