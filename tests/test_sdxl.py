"""Stable Diffusion XL through the same parts as v1: the whole model's layout, loading a float16 file, family
detection, a separate VAE in the diffusers layout, sampling with txt2img, and DreamBooth through main.py."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import main as main_module
from conftest import REPO, load_script, TINY_CONFIG, randomize_, reference_layout
from helpers import make_folder
from ldm.util import instantiate_from_config
from ldm.weights.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from ldm.weights.load import load_model_from_config

SDXL = REPO / "configs/stable-diffusion/sdxl-base-inference.yaml"
TINY_SDXL = REPO / "configs/stable-diffusion/tiny-sdxl-inference.yaml"
TINY_SDXL_FT = REPO / "configs/stable-diffusion/tiny-sdxl-finetune.yaml"


@pytest.fixture(scope="module")
def tiny_sdxl():
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(TINY_SDXL).model)
    randomize_(model.model, seed=1)
    randomize_(model.first_stage_model, seed=2, std=0.1)
    randomize_(model.conditioner, seed=3)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_sdxl_file(tiny_sdxl, tmp_path_factory):
    """Saved as the released file is: float16 everywhere, position_ids included."""
    sd = {k: v.half() for k, v in tiny_sdxl.state_dict().items()}
    return save_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny_sdxl.safetensors", sd)


def test_full_size_model_matches_the_released_layout():
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(SDXL).model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    reference = {k: shape for k, (shape, _) in reference_layout("sdxl-base-state-dict.tsv").items()}
    assert len(reference) == 2515
    assert sorted(set(ours) ^ set(reference)) == []
    assert {k: s for k, s in ours.items() if reference[k] != s} == {}


def test_float16_file_loads_with_integer_position_ids_and_modelspec(tiny_sdxl, tiny_sdxl_file):
    from safetensors import safe_open
    with safe_open(str(tiny_sdxl_file), framework="pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    model = load_model_from_config(OmegaConf.load(TINY_SDXL), tiny_sdxl_file)
    ids = model.conditioner.embedders[0].transformer.text_model.embeddings.position_ids
    assert ids.dtype == torch.int64 and torch.equal(ids[0], torch.arange(77))
    key = "model.diffusion_model.label_emb.0.0.weight"
    assert torch.equal(model.state_dict()[key], tiny_sdxl.state_dict()[key].half().float())
    assert not model.betas.is_meta and float(model.alphas_cumprod[0]) == pytest.approx(0.99915, abs=1e-5)


def test_wrong_family_for_the_config_is_one_line(tiny_sdxl_file, tiny_ckpt, capsys):
    with pytest.raises(CheckpointError) as info:
        load_model_from_config(OmegaConf.load(TINY_CONFIG), tiny_sdxl_file)
    message = str(info.value)
    assert "\n" not in message and "Stable Diffusion XL base checkpoint" in message
    assert "configs/stable-diffusion/sdxl-base-inference.yaml" in message
    from ldm.families import detect_family
    from ldm.weights.checkpoint import checkpoint_shapes
    assert detect_family(checkpoint_shapes(tiny_sdxl_file)) == "sdxl-base"
    assert detect_family(checkpoint_shapes(tiny_ckpt)) == "sd-v1"
    # Without --config, txt2img takes the family's config: here the full-size one, which this toy file does not fit.
    with pytest.raises(SystemExit):
        load_script("stable_txt2img").main(["--ckpt", str(tiny_sdxl_file), "--outdir", "/nonexistent/never"])
    out, err = capsys.readouterr()
    assert "Stable Diffusion XL base (config sdxl-base-inference.yaml)" in out
    assert len(err.strip().splitlines()) == 1 and "of another size than the config builds" in err


def test_diffusers_layout_vae_converts_to_the_original_names(tiny_sdxl, tmp_path):
    """diffusers' own converter renames our VAE into its layout; ours must rename it back exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from ldm.weights.vae import diffusers_vae_to_ldm, load_vae
    ours = {k: v for k, v in tiny_sdxl.first_stage_model.state_dict().items()}
    dd = OmegaConf.to_container(OmegaConf.load(TINY_SDXL).model.params.first_stage_config.params.ddconfig)
    levels = len(dd["ch_mult"])
    config = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
              "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]], "layers_per_block": dd["num_res_blocks"]}
    theirs = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ours.items()}, config)
    assert any(k.startswith("encoder.down_blocks.") for k in theirs)
    back = diffusers_vae_to_ldm(theirs)
    assert sorted(back) == sorted(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    # --vae FILE in the diffusers layout replaces a model's VAE.
    path = save_checkpoint(tmp_path / "vae-diffusers.safetensors", theirs)
    other = instantiate_from_config(OmegaConf.load(TINY_SDXL).model)
    load_vae(other.first_stage_model, path, verbose=False)
    assert all(torch.equal(other.first_stage_model.state_dict()[k], v) for k, v in ours.items())


def test_txt2img_finds_the_family_and_samples_at_native_size(tiny_sdxl, tiny_sdxl_file, tmp_path):
    """No --H/--W: the SDXL model's native size (64 px for the toy); an empty negative prompt makes the
    unconditional text inputs zero (diffusers' force_zeros_for_empty_prompt) and a real one does not. (Without
    --config the full-size SDXL config would be picked for this file: see the family test.)"""
    txt2img = load_script("stable_txt2img").main
    args = ["--ckpt", str(tiny_sdxl_file), "--config", str(TINY_SDXL), "--ddim_steps", "3", "--n_samples", "1", "--n_iter", "1",
            "--prompt", "photo of a sks robot", "--scale", "5", "--skip_grid"]
    (plain,) = txt2img([*args, "--outdir", str(tmp_path / "a")])
    img = Image.open(plain)
    assert img.size == (64, 64) and img.text["size"] == "64x64"
    (negative,) = txt2img([*args, "--outdir", str(tmp_path / "b"), "--negative_prompt", "blurry"])
    assert not np.array_equal(np.asarray(img), np.asarray(Image.open(negative)))
    for sampler in ("euler", "dpmpp_2m"):  # the dict conditioning goes through the k-diffusion samplers too
        (path,) = txt2img([*args, "--outdir", str(tmp_path / sampler), "--sampler", sampler])
        assert Image.open(path).text["sampler"] == sampler and np.asarray(Image.open(path)).std() > 1
    sizes = tiny_sdxl.default_sizes(1, 64, 64)
    uc = tiny_sdxl.get_unconditional_conditioning([""], sizes)
    pooled = tiny_sdxl.conditioner.embedders[1].model.text_projection.shape[1]
    assert not uc["c_crossattn"][0].any() and not uc["y"][:, :pooled].any() and uc["y"][:, pooled:].any()


def test_dreambooth_lora_run_with_real_sizes_and_caches(tiny_sdxl_file, tmp_path, monkeypatch):
    """main.py with the SDXL LoRA recipe on the toy model: the size vector each step sees is the real size and crop
    of each photo (a 96x128 portrait: original (128, 96), crop top (128-96)/2 * 64/96 = 11 rows)."""
    subject = make_folder(tmp_path / "subject", 3)
    Image.open(subject / "00.png").resize((96, 128)).save(subject / "00.png")
    seen = []
    from ldm.models.diffusion import conditioning
    real = conditioning.MicroConditioning.condition

    def spy(self, text, sizes=None):
        seen.append({k: v.tolist() for k, v in sizes.items()})
        return real(self, text, sizes)
    monkeypatch.setattr(conditioning.MicroConditioning, "condition", spy)
    args = ["--base", str(TINY_SDXL_FT), "-t", "--logdir", str(tmp_path / "logs"), "-n", "xl", "--actual_resume",
            str(tiny_sdxl_file), "--data_root", str(subject), "--reg_data_root",
            str(make_folder(tmp_path / "reg", 2, offset=30)), "--class_word", "toy", "--max_steps", "4",
            "data.params.flip_p=0", "lightning.callbacks.image_logger.params.batch_frequency=4"]
    assert main_module.main(args) == 0
    (run,) = (tmp_path / "logs").iterdir()
    assert (run / "checkpoints" / "lora-last.safetensors").is_file()
    assert (run / "images" / "train" / "step-000004.png").is_file()
    steps = [s for s in seen if len(s["original_size_as_tuple"]) == 2]  # training batches: subject + class
    portrait = [s for s in steps if s["original_size_as_tuple"][0] == [128, 96]]
    assert portrait and portrait[0]["crop_coords_top_left"][0] == [11, 0]
    assert all(s["target_size_as_tuple"] == [[64, 64], [64, 64]] for s in steps)
    # The base weights stay as they were (LoRA): last.ckpt keeps the original layout.
    last, _ = read_checkpoint(run / "checkpoints" / "last.ckpt")
    base, _ = read_checkpoint(tiny_sdxl_file)
    assert all(torch.equal(last[k].half(), v) for k, v in base.items())
