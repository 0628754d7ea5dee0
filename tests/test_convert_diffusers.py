"""scripts/convert_to_diffusers.py: the tiny checkpoint becomes a diffusers folder that StableDiffusionPipeline
loads offline and that samples the same images as our DDIMSampler; its tokenizer gives our ids; its configs agree
with diffusers' own reading of the v1 config."""
import importlib.util
import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, TINY_CONFIG, V1_CONFIG, rel_err
from ldm.weights.checkpoint import ema_key, save_checkpoint

import diffusers  # noqa: E402 - test-only reference, installed with .[test]
import transformers  # noqa: E402,F401

spec = importlib.util.spec_from_file_location("convert_to_diffusers", REPO / "scripts/convert_to_diffusers.py")
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)
COMPONENTS = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}


def run(ckpt, out, *extra):
    return convert.main([str(ckpt), str(out), "--config", str(TINY_CONFIG), *extra])


@pytest.fixture(scope="module")
def folder(tiny_ckpt, tmp_path_factory):
    return run(tiny_ckpt, tmp_path_factory.mktemp("diffusers") / "tiny-sd")


@pytest.fixture(scope="module")
def pipe(folder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: nothing may be fetched
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_layout_and_model_index(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {k for k, v in index.items() if isinstance(v, list) and v != [None, None]} == COMPONENTS
    assert index["safety_checker"] == index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert {p.name for p in folder.iterdir()} == COMPONENTS | {"model_index.json"}
    assert (folder / "unet/diffusion_pytorch_model.safetensors").is_file()
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler"
    assert {k: scheduler[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                      "steps_offset", "set_alpha_to_one", "skip_prk_steps", "clip_sample")} == {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False}


PROMPTS = ["photo of a sks dog", "A painting, of   a VIRUS monster! playing guitar's", "", "héllo wörld 123 don't",
           " ".join(["a very long prompt"] * 30)]


def test_pipeline_tokenizer_and_text_encoder_match_ours(pipe, tiny_model):
    tok = pipe.tokenizer
    assert tok.model_max_length == 77 and tok.pad_token == "<|endoftext|>"
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    ours = tiny_model.cond_stage_model.tokenize(PROMPTS)
    assert torch.equal(ids, ours)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        assert rel_err(hidden, tiny_model.get_learned_conditioning(PROMPTS)) < 1e-5


def test_pipeline_samples_our_images(pipe, tiny_model):
    """Same initial latents, prompts, guidance and DDIM steps: diffusers' pipeline and our DDIMSampler +
    decode_first_stage give the same images before quantisation."""
    from ldm.models.diffusion.ddim import DDIMSampler
    prompts, steps, scale = ["photo of a sks dog", "a red car"], 4, 5.0
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # The original DDIM: timesteps 1 + 250k ("leading" + offset 1), alpha_prev of the last step = alphas_cumprod[0].
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False,
                                                         set_alpha_to_one=False, steps_offset=1,
                                                         timestep_spacing="leading")
    theirs = pipe(prompts, height=64, width=64, num_inference_steps=steps, guidance_scale=scale,
                  latents=latents.clone(), output_type="pt").images
    with torch.no_grad():
        c = tiny_model.get_learned_conditioning(prompts)
        uc = tiny_model.get_learned_conditioning(len(prompts) * [""])
        samples, _ = DDIMSampler(tiny_model).sample(
            S=steps, conditioning=c, batch_size=2, shape=[4, 8, 8], x_T=latents, eta=0.0, verbose=False,
            unconditional_guidance_scale=scale, unconditional_conditioning=uc, disable_progress=True)
        ours = ((tiny_model.decode_first_stage(samples) + 1) / 2).clamp(0, 1)
    assert theirs.shape == ours.shape == (2, 3, 64, 64)
    assert ours.std() > 0.05 and ((ours > 0) & (ours < 1)).float().mean() > 0.5  # not a saturated image
    assert rel_err(theirs, ours) < 1e-4


def test_configs_agree_with_diffusers_reading_of_v1():
    """diffusers' create_*_diffusers_config_from_ldm read the same v1 YAML independently."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, \
        create_vae_diffusers_config_from_ldm
    from ldm.export.diffusers import model_params, text_encoder_config, unet_config, vae_config
    original = OmegaConf.to_container(OmegaConf.load(V1_CONFIG))
    params = model_params(original)
    for ours, theirs in [(unet_config(params), create_unet_diffusers_config_from_ldm(original, {})),
                         (vae_config(params), create_vae_diffusers_config_from_ldm(original, {}))]:
        shared = set(ours) & set(theirs)
        assert {"block_out_channels", "sample_size"} <= shared
        assert {k: ours[k] for k in shared} == {k: list(v) if isinstance(v, tuple) else v
                                                for k, v in theirs.items() if k in shared}
    text = text_encoder_config(params)  # shared/reference/README.md: the ViT-L/14 text tower
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
            text["intermediate_size"], text["max_position_embeddings"]) == (768, 12, 12, 3072, 77)


def test_v1_reference_layout_maps_onto_every_diffusers_tensor():
    """The released v1 layout (shared/reference, shapes only, as meta tensors) through our configs and mapping:
    every tensor of diffusers' and transformers' v1 models is filled, with its shape, and nothing is left over."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel
    from conftest import reference_layout
    from ldm.export.diffusers import model_params, text_encoder_config, text_encoder_weights, unet_config, \
        vae_config
    params = model_params(OmegaConf.to_container(OmegaConf.load(V1_CONFIG)))
    weights = {k: torch.empty(shape, device="meta") for k, (shape, _) in reference_layout().items()}
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**unet_config(params)), "vae": AutoencoderKL(**vae_config(params)),
                  "text": CLIPTextModel(CLIPTextConfig(**text_encoder_config(params)))}
    converted = {"unet": convert_ldm_unet_checkpoint(weights, unet_config(params)),
                 "vae": convert_ldm_vae_checkpoint(weights, vae_config(params)),
                 "text": text_encoder_weights(weights, models["text"].state_dict().keys())}
    for name, model in models.items():
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted[name].items()} == expected, name
    assert sum(v.numel() for v in converted["unet"].values()) == 859_520_964  # README's UNet count


def test_ema_half_and_bin_options(tiny_model, tmp_path):
    from safetensors.torch import load_file
    sd = dict(tiny_model.state_dict())
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    sd.update({ema_key(k): sd[k] + 1.0 for k in unet_keys})  # a full-EMA file whose EMA is easy to tell apart
    ckpt = save_checkpoint(tmp_path / "full-ema.ckpt", sd)
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    ema = load_file(run(ckpt, tmp_path / "ema") / "unet/diffusion_pytorch_model.safetensors")
    assert torch.equal(ema["conv_in.weight"], sd[ema_key(conv_in)])
    live = run(ckpt, tmp_path / "live", "--no-ema", "--half", "--no-safetensors")
    assert not list(live.rglob("*.safetensors"))
    unet = torch.load(live / "unet/diffusion_pytorch_model.bin", weights_only=True)
    assert unet["conv_in.weight"].dtype == torch.float16
    assert torch.equal(unet["conv_in.weight"], sd[conv_in].half())
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(live, local_files_only=True, torch_dtype=torch.float16)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float16


def _expect_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        run(*argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_errors_are_one_line(tiny_ckpt, tmp_path, capsys, monkeypatch):
    assert "checkpoint file not found" in _expect_error(capsys, tmp_path / "nope.ckpt", tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    assert "not an empty folder" in _expect_error(capsys, tiny_ckpt, tmp_path / "full")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what an environment without diffusers looks like
    assert "pip install diffusers transformers" in _expect_error(capsys, tiny_ckpt, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
