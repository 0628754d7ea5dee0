"""scripts/prune_ckpt.py on SDXL: a Lightning-style training save of the toy SDXL pruned to exactly what its sampling
model holds (UNet, VAE, conditioner; no schedule buffers), loading back and sampling the same pictures."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_SDXL_CONFIG, load_config, load_script
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS
from ldm.util import instantiate_from_config
from ldm.weights.checkpoint import ema_key, read_checkpoint
from ldm.weights.load import load_model_from_config

prune_ckpt = load_script("prune_ckpt")
txt2img = load_script("stable_txt2img")
UNET = "model.diffusion_model."
POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def inference_keys():
    """The keys of a fresh toy SDXL sampling model: what a pruned file must hold, no more."""
    with torch.device("meta"):
        return set(instantiate_from_config(load_config(TINY_SDXL_CONFIG).model).state_dict())


@pytest.fixture(scope="module")
def training_ckpt(tiny_sdxl_model, tmp_path_factory):
    """What a training save holds besides the model: an EMA copy of the UNet (made to differ), schedule buffers
    (a config with persist_schedule on), optimizer, scheduler and loop states."""
    sd = dict(tiny_sdxl_model.state_dict())
    gen = torch.Generator().manual_seed(5)
    for k in [k for k in sd if k.startswith(UNET)]:
        sd[ema_key(k)] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=gen)
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(42, dtype=torch.int32)
    sd.update({name: getattr(tiny_sdxl_model, name).clone() for name in SCHEDULE_BUFFERS})
    obj = {"epoch": 3, "global_step": 42, "state_dict": sd,
           "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"params": [0]}]}],
           "lr_schedulers": [{"last_epoch": 42}], "loops": {"fit_loop": {"state_dict": {}}}}
    path = tmp_path_factory.mktemp("train-sdxl") / "last.ckpt"
    torch.save(obj, path)
    return path


def prune(*argv):
    return prune_ckpt.main([str(a) for a in argv])


def test_pruned_to_exactly_the_inference_keys(training_ckpt, inference_keys, tmp_path, capsys):
    out = prune(training_ckpt, tmp_path / "pruned.safetensors", "--fp16")
    assert "EMA weights" in capsys.readouterr().out
    sd, meta = read_checkpoint(out)
    assert set(sd) == inference_keys
    assert not set(sd) & set(SCHEDULE_BUFFERS) and {k.split(".")[0] for k in sd} == \
        {"model", "first_stage_model", "conditioner"}
    assert meta["global_step"] == 42 and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert all(v.dtype == (torch.int64 if k == POSITION_IDS else torch.float16) for k, v in sd.items())
    original, _ = read_checkpoint(training_ckpt)
    key = UNET + "label_emb.0.0.weight"
    assert torch.equal(sd[key], original[ema_key(key)].half())  # the EMA UNet, by default
    live = read_checkpoint(prune(training_ckpt, tmp_path / "live.ckpt", "--no-ema"))[0]
    assert set(live) == inference_keys and torch.equal(live[key], original[key])


def test_pruned_file_loads_back_and_samples_like_the_training_save(training_ckpt, tmp_path):
    # Same file name (the PNGs record it): an fp32 prune must give the very same bytes.
    pruned = prune(training_ckpt, tmp_path / "fp32" / training_ckpt.name)
    model = load_model_from_config(load_config(TINY_SDXL_CONFIG), pruned, verbose=False)
    assert model.conditioner.embedders[1].model.text_projection.dtype == torch.float32
    args = ["--config", str(TINY_SDXL_CONFIG), "--H", "64", "--W", "64", "--ddim_steps", "4", "--n_samples", "2",
            "--n_iter", "1", "--scale", "5", "--seed", "3", "--prompt", "photo of a sks dog", "--skip_grid"]
    reference = txt2img.main(args + ["--ckpt", str(training_ckpt), "--outdir", str(tmp_path / "ref")])
    again = txt2img.main(args + ["--ckpt", str(pruned), "--outdir", str(tmp_path / "out")])
    assert len(reference) == len(again) == 2
    for a, b in zip(reference, again):
        assert a.read_bytes() == b.read_bytes()
        assert np.asarray(Image.open(a), dtype=np.float64).std() > 1.0  # not blank images that match trivially


def test_sdxl_without_vae_fails_with_one_line(tiny_sdxl_model, tmp_path, capsys):
    sd = {k: v for k, v in tiny_sdxl_model.state_dict().items() if not k.startswith("first_stage_model.")}
    torch.save({"state_dict": sd}, tmp_path / "no-vae.ckpt")
    with pytest.raises(SystemExit) as e:
        prune(tmp_path / "no-vae.ckpt", tmp_path / "o.ckpt")
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Stable Diffusion XL" in lines[0] and "no VAE" in lines[0]
