"""scripts/convert_to_diffusers.py on SDXL: the toy SDXL checkpoint becomes a StableDiffusionXLPipeline folder that
loads offline and whose guided DDIM run ends on our DDIMSampler's latent; its tokenizers and text encoders give ours;
the full-size config and the released layout (shared/reference) map onto every tensor of diffusers' SDXL models."""
import dataclasses
import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, TINY_SDXL_CONFIG, load_config, load_script, reference_layout, rel_err

import diffusers  # noqa: E402 - test-only reference, installed with .[test]

SDXL_CONFIG = REPO / "configs/stable-diffusion/sdxl-base-inference.yaml"
COMPONENTS = {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}
PROMPTS = ["photo of a sks dog", "A painting, of   a VIRUS monster, playing guitar's", "",
           " ".join(["a very long prompt"] * 30)]
convert = load_script("convert_to_diffusers")


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_folder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: nothing may be fetched
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_layout_and_configs(tiny_sdxl_folder):
    folder = tiny_sdxl_folder
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert {k for k, v in index.items() if isinstance(v, list) and v != [None, None]} == COMPONENTS
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert {p.name for p in folder.iterdir()} == COMPONENTS | {"model_index.json"}
    unet = json.loads((folder / "unet/config.json").read_text())
    assert {k: unet[k] for k in ("addition_embed_type", "addition_time_embed_dim", "use_linear_projection",
                                 "projection_class_embeddings_input_dim", "transformer_layers_per_block",
                                 "cross_attention_dim")} == {
        "addition_embed_type": "text_time", "addition_time_embed_dim": 8, "use_linear_projection": True,
        "projection_class_embeddings_input_dim": 96, "transformer_layers_per_block": [1, 1, 2],
        "cross_attention_dim": 80}
    vae = json.loads((folder / "vae/config.json").read_text())
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"
    assert {k: scheduler[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                      "prediction_type", "timestep_spacing", "steps_offset", "interpolation_type",
                                      "use_karras_sigmas")} == {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
        "interpolation_type": "linear", "use_karras_sigmas": False}
    assert json.loads((folder / "tokenizer_2/special_tokens_map.json").read_text())["pad_token"] == "!"


def test_tokenizers_and_text_encoders_match_ours(pipe, tiny_sdxl_model):
    clip, bigg = tiny_sdxl_model.conditioner.embedders[:2]
    ids = [tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    assert torch.equal(ids[0], clip.tokenize(PROMPTS)) and torch.equal(ids[1], bigg.tokenize(PROMPTS))
    assert int(ids[0][2, -1]) == 49407 and int(ids[1][2, -1]) == 0  # end-of-text padding vs OpenCLIP's zeros
    # The one known difference, as in the released SDXL folder (diffusers issue #4153): tokenizer_2's pad token
    # "!" (id 0) is special, so a "!" typed in a prompt becomes id 0, where OpenCLIP (and we) give "!</w>" (256).
    assert 0 in pipe.tokenizer_2("wow!").input_ids and 256 in bigg.tokenize(["wow!"])[0].tolist()
    with torch.no_grad():
        h1 = pipe.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
        out2 = pipe.text_encoder_2(ids[1], output_hidden_states=True)
        z2, pooled = bigg(PROMPTS)
        assert rel_err(h1, clip(PROMPTS)) < 1e-5
        assert rel_err(out2.hidden_states[-2], z2) < 1e-5 and rel_err(out2.text_embeds, pooled) < 1e-5


def test_guided_ddim_run_ends_on_our_latent(pipe, tiny_sdxl_model):
    """Same initial latents, prompts, guidance and 10 DDIM steps: diffusers' SDXL pipeline and our DDIMSampler end on
    the same latent. Our empty negative prompt is zero text conditioning; diffusers gives zeros when no negative
    prompt is passed (force_zeros_for_empty_prompt; an explicit "" would be encoded)."""
    from ldm.models.diffusion.ddim import DDIMSampler
    prompts, steps, scale = ["photo of a sks dog", "a red car"], 10, 5.0
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # The original DDIM: timesteps 1 + 100k ("leading" + offset 1), alpha_prev of the last step = alphas_cumprod[0].
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                                    steps_offset=1, timestep_spacing="leading")
    theirs = diffusers.StableDiffusionXLPipeline(**{**pipe.components, "scheduler": scheduler})(
        prompts, height=64, width=64, num_inference_steps=steps, guidance_scale=scale, latents=latents.clone(),
        output_type="latent").images
    model = tiny_sdxl_model
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        uc = model.get_unconditional_conditioning(len(prompts) * [""])
        ours, _ = DDIMSampler(model).sample(S=steps, conditioning=c, batch_size=2, shape=[4, 8, 8], x_T=latents,
                                            eta=0.0, verbose=False, unconditional_guidance_scale=scale,
                                            unconditional_conditioning=uc, disable_progress=True)
        # Guidance matters here: without the unconditional branch the run ends elsewhere.
        cond_only, _ = DDIMSampler(model).sample(S=steps, conditioning=c, batch_size=2, shape=[4, 8, 8],
                                                 x_T=latents, eta=0.0, verbose=False, disable_progress=True)
    assert theirs.shape == ours.shape == (2, 4, 8, 8)
    assert rel_err(theirs, ours) < 1e-4
    assert rel_err(cond_only, ours) > 1e-2


def test_family_is_recognised_without_config(tiny_sdxl_ckpt, tmp_path, monkeypatch, capsys):
    """No --config: the family read from the checkpoint's keys picks the config (here the SDXL family's config is
    pointed at the toy one, since the toy weights do not fit the full-size config)."""
    from ldm import families
    toy = dataclasses.replace(families.FAMILIES["sdxl-base"], config="stable-diffusion/tiny-sdxl-inference.yaml")
    monkeypatch.setitem(families.FAMILIES, "sdxl-base", toy)
    out = convert.main([str(tiny_sdxl_ckpt), str(tmp_path / "auto")])
    assert "StableDiffusionXLPipeline.from_pretrained" in capsys.readouterr().out
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_unreproducible_conditioner_is_one_line(tiny_sdxl_ckpt, tmp_path, capsys):
    config = load_config(TINY_SDXL_CONFIG)
    config.model.params.conditioner_config.params.emb_models[0].params.layer_idx = 1  # not the penultimate state
    path = tmp_path / "other.yaml"
    OmegaConf.save(config, path)
    with pytest.raises(SystemExit) as e:
        convert.main([str(tiny_sdxl_ckpt), str(tmp_path / "out"), "--config", str(path)])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "penultimate hidden state" in lines[0]
    assert not (tmp_path / "out").exists()


def test_full_size_configs_agree_with_diffusers_reading_of_sdxl():
    """diffusers' create_*_diffusers_config_from_ldm read the full-size SDXL YAML independently."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, \
        create_vae_diffusers_config_from_ldm
    from ldm.export.diffusers import model_params
    from ldm.families.sdxl.diffusers import pipeline_configs
    original = OmegaConf.to_container(OmegaConf.load(SDXL_CONFIG))
    configs = pipeline_configs(model_params(original))
    theirs = {"unet": create_unet_diffusers_config_from_ldm(original, {}),
              "vae": create_vae_diffusers_config_from_ldm(original, {})}
    for name in ("unet", "vae"):
        # sample_size: diffusers derives it from the checkpoint's size (none here, so SD's 512 px); ours from the
        # config, 1024 px as in the released SDXL folder (unet 128, vae 1024).
        shared = set(configs[name]) & set(theirs[name]) - {"sample_size"}
        assert {"block_out_channels", "layers_per_block"} <= shared
        assert {k: configs[name][k] for k in shared} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in theirs[name].items() if k in shared}, name
    assert (configs["unet"]["sample_size"], configs["vae"]["sample_size"]) == (128, 1024)
    assert {"addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
            "use_linear_projection", "transformer_layers_per_block"} <= set(theirs["unet"])


def test_sdxl_reference_layout_maps_onto_every_diffusers_tensor():
    """The released SDXL layout (shared/reference, shapes only, as meta tensors) through our configs and diffusers'
    converters: every tensor of diffusers' and transformers' SDXL models is filled, with its shape, nothing left."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, \
        convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from ldm.export.diffusers import TEXT_MODEL, model_params, text_encoder_weights
    from ldm.families.sdxl.diffusers import TEXT_1, TEXT_2, open_clip_text_config, pipeline_configs
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(SDXL_CONFIG)
    configs = pipeline_configs(model_params(OmegaConf.to_container(config)))
    weights = {k: torch.empty(shape, device="meta") for k, (shape, _) in
               reference_layout("sdxl-base-state-dict.tsv").items()}
    with torch.device("meta"):
        tower = instantiate_from_config(config.model.params.conditioner_config).embedders[1].model
        models = {"unet": UNet2DConditionModel(**configs["unet"]), "vae": AutoencoderKL(**configs["vae"]),
                  "text": CLIPTextModel(CLIPTextConfig(**configs["text"])),
                  "text_2": CLIPTextModelWithProjection(CLIPTextConfig(**open_clip_text_config(tower)))}
    clip_l = {TEXT_MODEL + k[len(TEXT_1):]: v for k, v in weights.items() if k.startswith(TEXT_1)}
    converted = {"unet": convert_ldm_unet_checkpoint(weights, configs["unet"]),
                 "vae": convert_ldm_vae_checkpoint(weights, configs["vae"]),
                 "text": text_encoder_weights(clip_l, models["text"].state_dict().keys()),
                 "text_2": convert_open_clip_checkpoint(models["text_2"], weights, prefix=TEXT_2)}
    for name, model in models.items():
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        got = {k: tuple(v.shape) for k, v in converted[name].items() if not k.endswith("position_ids")}
        assert got == expected, name
    assert sum(v.numel() for v in converted["unet"].values()) == 2_567_463_684  # README's UNet count


def test_half_and_bin_options(tiny_sdxl_ckpt, tiny_sdxl_model, tmp_path):
    out = convert.main([str(tiny_sdxl_ckpt), str(tmp_path / "half"), "--config", str(TINY_SDXL_CONFIG), "--half",
                        "--no-safetensors"])
    assert not list(out.rglob("*.safetensors"))
    te2 = torch.load(out / "text_encoder_2/pytorch_model.bin", weights_only=True)
    projection = tiny_sdxl_model.conditioner.embedders[1].model.text_projection
    assert torch.equal(te2["text_projection.weight"], projection.detach().T.half())  # x @ P is Linear(P.T)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True, torch_dtype=torch.float16)
    assert pipe.text_encoder_2.dtype == pipe.text_encoder.dtype == pipe.unet.dtype == torch.float16
