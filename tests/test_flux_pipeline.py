"""The whole FLUX.1 model against diffusers' ``FluxPipeline`` on the same weights, and its export as a diffusers folder.

The reference pipeline is assembled without our exporter: the transformer through diffusers' single-file converter
(at the tiny width, as tests/test_flux_transformer.py does), the autoencoder through ``convert_ldm_vae_checkpoint``
into an ``AutoencoderKL`` configured here, CLIP-L and T5 as transformers' ``CLIPTextModel`` / ``T5EncoderModel``
(our names are theirs), ``T5TokenizerFast`` over the test SentencePiece file, and the schedulers of FLUX.1-dev and
schnell's released ``scheduler_config.json``. The exported folder (scripts/convert_to_diffusers.py) must then load
offline and sample as we do.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_FLUX_CONFIG, load_config, load_script, rel_err, seeded_flux_model, tiny_flux_config
from test_flux_transformer import diffusers_flux

import diffusers  # noqa: E402 - test-only reference, installed with .[test]
from diffusers import FluxPipeline  # noqa: E402

PROMPTS = ["a photo of sks dog", "a painting of a cat in the snow, by van gogh!"]
STEPS, GUIDANCE = 4, 3.5
#: The released FLUX.1 scheduler_config.json files (black-forest-labs/FLUX.1-dev and FLUX.1-schnell).
SCHEDULERS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096),
}
VARIANTS = list(SCHEDULERS)
convert = load_script("convert_to_diffusers")


def schnell_config(tokenizer: Path):
    """The tiny model as FLUX.1 [schnell] is to [dev]: no guidance embedding, the unshifted schedule."""
    config = tiny_flux_config(tokenizer)
    config.model.params.time_shift = False
    config.model.params.unet_config.params.guidance_embed = False
    return config


@pytest.fixture(scope="module")
def tiny_schnell_model(t5_tokenizer):
    """As conftest's ``tiny_flux_model``, from the schnell variant of its config."""
    return seeded_flux_model(schnell_config(t5_tokenizer))


@pytest.fixture(scope="module")
def models(tiny_flux_model, tiny_schnell_model):
    return {"dev": tiny_flux_model, "schnell": tiny_schnell_model}


# ---- the reference, built without our exporter ------------------------------------------------------------------

def tiny_params(section: str):
    """A section of the tiny FLUX config's ``model.params``, as plain Python."""
    return OmegaConf.to_container(OmegaConf.select(load_config(TINY_FLUX_CONFIG).model.params, section))


def reference_vae(model):
    """diffusers' ``AutoencoderKL`` as FLUX.1's release configures it, at the tiny config's sizes."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    dd = tiny_params("first_stage_config.params.ddconfig")
    config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(dd["ch_mult"]),
                  up_block_types=["UpDecoderBlock2D"] * len(dd["ch_mult"]),
                  block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
                  latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                  use_quant_conv=False, use_post_quant_conv=False)
    vae = diffusers.AutoencoderKL(**config).eval()
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("first_stage_model.")}
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, config), strict=True)
    return vae


def reference_clip(model):
    from transformers import CLIPTextConfig, CLIPTextModel
    params = tiny_params("conditioner_config.params.emb_models")[0]["params"]
    config = CLIPTextConfig(vocab_size=49408, hidden_size=params["width"], num_hidden_layers=params["layers"],
                            num_attention_heads=params["heads"], intermediate_size=params["mlp_dim"],
                            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    clip = CLIPTextModel(config).eval()
    ours = model.conditioner.embedders[0].transformer.state_dict()
    expected = clip.state_dict().keys()
    level = "" if any(k.startswith("text_model.") for k in expected) else "text_model."  # transformers 5 has none
    clip.load_state_dict({k.removeprefix(level): v for k, v in ours.items()
                          if k.removeprefix(level) in expected}, strict=True)
    return clip


def reference_t5(model):
    from transformers import T5Config, T5EncoderModel
    params = tiny_params("conditioner_config.params.emb_models")[1]["params"]
    sizes = {k: params[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")}
    t5 = T5EncoderModel(T5Config(**sizes, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    t5.load_state_dict(model.conditioner.embedders[1].transformer.state_dict(), strict=True)
    return t5


def reference_pipeline(model, spiece: Path, variant: str, folder: Path) -> FluxPipeline:
    from transformers import CLIPTokenizer, T5TokenizerFast

    from ldm.export.diffusers import tokenizer_files
    for name, text in tokenizer_files().items():  # the CLIP BPE files our tokenizer reads, in transformers' form
        (folder / name).write_text(text, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        transformer = diffusers_flux(model.model.diffusion_model, mp)
    pipe = FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant]), vae=reference_vae(model),
        text_encoder=reference_clip(model), tokenizer=CLIPTokenizer.from_pretrained(folder),
        text_encoder_2=reference_t5(model), tokenizer_2=T5TokenizerFast.from_pretrained(spiece.parent),
        transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def references(models, t5_tokenizer, tmp_path_factory):
    return {v: reference_pipeline(models[v], t5_tokenizer, v, tmp_path_factory.mktemp(f"clip-{v}")) for v in models}


# ---- sampling both ways ------------------------------------------------------------------------------------------

def noise(batch: int = len(PROMPTS), side: int = 8) -> torch.Tensor:
    return torch.randn(batch, 16, side, side, generator=torch.Generator().manual_seed(7))


def our_latents(model, x_T: torch.Tensor, guidance: float = GUIDANCE) -> torch.Tensor:
    """Our flow Euler sampler, as the scripts run a distilled model: the guidance strength in the conditioning."""
    from ldm.sampling.samplers import make_sampler
    with torch.no_grad():
        c = model.with_guidance(model.get_learned_conditioning(PROMPTS), guidance)
        z, _ = make_sampler("flow_euler", model).sample(STEPS, len(PROMPTS), x_T.shape[1:], conditioning=c,
                                                        x_T=x_T.clone(), verbose=False, disable_progress=True)
    return z


def our_images(model, z: torch.Tensor) -> torch.Tensor:
    """Decoded and mapped to [0, 1] as diffusers' ``output_type="pt"`` is."""
    return (model.decode_first_stage(z).clamp(-1, 1) + 1) / 2


def their_run(pipe: FluxPipeline, x_T: torch.Tensor, output_type: str, max_length: int) -> torch.Tensor:
    b, c, h, w = x_T.shape
    with torch.no_grad():
        out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=8 * h, width=8 * w,
                   latents=FluxPipeline._pack_latents(x_T.clone(), b, c, h, w), output_type=output_type,
                   max_sequence_length=max_length).images
    return FluxPipeline._unpack_latents(out, 8 * h, 8 * w, vae_scale_factor=8) if output_type == "latent" else out


def t5_length(model) -> int:
    return model.conditioner.embedders[1].max_length


# ---- the parts ---------------------------------------------------------------------------------------------------

def test_autoencoder_matches_diffusers(tiny_flux_model, references):
    """Encode: our scaled latent of the posterior's mode == (mode - shift) * scale; decode inverts that in both."""
    model, vae = tiny_flux_model, references["dev"].vae
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        z = model.get_first_stage_encoding(model.encode_first_stage(x).mode())
        expected = (vae.encode(x).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        decoded = model.decode_first_stage(z)
        expected_decoded = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert z.shape == (2, 16, 8, 8)
    assert rel_err(z, expected) <= 1e-4 and rel_err(decoded, expected_decoded) <= 1e-4
    assert expected_decoded.std() > 1e-2  # a real signal through the decoder


def test_conditioning_matches_encode_prompt(tiny_flux_model, references):
    """T5's tokens and CLIP's pooled vector == ``FluxPipeline.encode_prompt`` (its tokenizers, its encoders)."""
    model, pipe = tiny_flux_model, references["dev"]
    prompts = [*PROMPTS, "", "2024, 12! café naïve résumé <extra_id_0> " + "sks " * 40]
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        tokens, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=t5_length(model))
    (context,) = c["c_crossattn"]
    assert context.shape == tokens.shape == (len(prompts), t5_length(model), 32) and pooled.shape == (len(prompts), 32)
    assert rel_err(context, tokens) <= 1e-4 and rel_err(c["y"], pooled) <= 1e-4
    assert torch.equal(text_ids, torch.zeros(t5_length(model), 3))


@pytest.mark.parametrize("variant", VARIANTS)
def test_four_step_sample_matches_flux_pipeline(variant, models, references):
    """The same noise, prompts and guidance: ``FluxPipeline`` with the release's scheduler ends on our latents and
    decodes to our image (dev: the resolution shift and the distilled guidance; schnell: neither)."""
    model, pipe = models[variant], references[variant]
    x_T = noise()
    ours = our_latents(model, x_T)
    theirs = their_run(pipe, x_T, "latent", t5_length(model))
    assert ours.shape == theirs.shape == x_T.shape
    assert rel_err(ours, theirs) <= 1e-4
    assert rel_err(our_images(model, ours), their_run(pipe, x_T, "pt", t5_length(model))) <= 1e-4
    # Not vacuous: the run moved far from its noise, and for dev the guidance input was read.
    assert rel_err(ours, x_T) > 0.1
    if variant == "dev":
        assert rel_err(our_latents(model, x_T, guidance=1.0), ours) > 1e-3


# ---- the transformer's names -------------------------------------------------------------------------------------

def test_transformer_names_match_diffusers_converter_at_tiny_width(tiny_flux_model, monkeypatch):
    """Our renaming == diffusers' converter on the same tensors (its ``linear1`` split kept at the tiny width by the
    patch tests/test_flux_transformer.py uses), tensor for tensor."""
    from diffusers.loaders import single_file_utils

    from ldm.families.flux.diffusers import transformer_weights
    from test_flux_transformer import _TorchAtWidth
    flux = tiny_flux_model.model.diffusion_model
    ours = transformer_weights(flux.state_dict(), flux.hidden_size)
    monkeypatch.setattr(single_file_utils, "torch", _TorchAtWidth())
    theirs = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v.clone() for k, v in flux.state_dict().items()})
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformer_names_match_diffusers_at_full_size(variant):
    """At FLUX.1's own sizes, where diffusers' converter needs no patch: the same keys and shapes as it gives, and as
    diffusers' ``FluxTransformer2DModel`` has (built on the meta device)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from ldm.families.flux.diffusers import transformer_weights
    from ldm.families.flux.modules.transformer import Flux, FluxParams
    with torch.device("meta"):
        sd = Flux(getattr(FluxParams, variant)()).state_dict()
        model = diffusers.FluxTransformer2DModel(guidance_embeds=variant == "dev")
    ours = {k: tuple(v.shape) for k, v in transformer_weights(sd, 3072).items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v for k, v in sd.items()})
    assert ours == {k: tuple(v.shape) for k, v in theirs.items()}
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(ours) == (1160 if variant == "dev" else 1156)


def test_unknown_transformer_key_is_named():
    from ldm.families.flux.diffusers import transformer_weights
    with pytest.raises(KeyError, match="double_blocks.0.extra.weight"):
        transformer_weights({"double_blocks.0.extra.weight": torch.zeros(1)}, 8)


# ---- the exported folder -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(models, t5_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """Each tiny model saved as one file and converted by scripts/convert_to_diffusers.py: dev with the tokenizer
    given by ``--t5_tokenizer``, schnell with it named in its config."""
    from ldm.weights.checkpoint import save_checkpoint
    tmp = tmp_path_factory.mktemp("flux-export")
    schnell_yaml = tmp / "tiny-flux-schnell.yaml"
    OmegaConf.save(schnell_config(t5_tokenizer), schnell_yaml)
    args = {"dev": ["--config", str(TINY_FLUX_CONFIG), "--t5_tokenizer", str(t5_tokenizer)],
            "schnell": ["--config", str(schnell_yaml)]}
    out = {}
    for variant, model in models.items():
        ckpt = save_checkpoint(tmp / f"tiny-flux-{variant}.safetensors", model.state_dict(), global_step=3)
        out[variant] = convert.main([str(ckpt), str(tmp / variant), *args[variant]])
    return out


def load_folder(folder: Path) -> FluxPipeline:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # nothing may be fetched
        pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_layout_and_configs(exported, capsys):
    folder = exported["dev"]
    index = json.loads((folder / "model_index.json").read_text())
    components = {"transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"}
    assert index["_class_name"] == "FluxPipeline"
    assert {k for k, v in index.items() if isinstance(v, list) and v != [None, None]} == components
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert {p.name for p in folder.iterdir()} == components | {"model_index.json"}
    vae = json.loads((folder / "vae/config.json").read_text())
    assert {k: vae[k] for k in ("scaling_factor", "shift_factor", "latent_channels", "use_quant_conv",
                                "use_post_quant_conv")} == {
        "scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16, "use_quant_conv": False,
        "use_post_quant_conv": False}
    for variant, path in exported.items():
        scheduler = json.loads((path / "scheduler/scheduler_config.json").read_text())
        assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
        assert {k: scheduler[k] for k in SCHEDULERS[variant]} == SCHEDULERS[variant]
        transformer = json.loads((path / "transformer/config.json").read_text())
        assert transformer["guidance_embeds"] is (variant == "dev") and transformer["num_attention_heads"] == 2
    # tokenizer_2 holds the SentencePiece file too, as the release does: our tokenizer reads the folder.
    assert (folder / "tokenizer_2/spiece.model").is_file()
    assert json.loads((folder / "tokenizer_2/tokenizer_config.json").read_text())["model_max_length"] == 32


def test_folder_tokenizers_and_encoders_match_ours(exported, tiny_flux_model):
    from ldm.families.flux.modules.t5 import T5Tokenizer
    pipe, model = load_folder(exported["dev"]), tiny_flux_model
    prompts = [*PROMPTS, "", "x<extra_id_5>y " + "sks " * 40]
    t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=32, truncation=True,
                              return_tensors="pt").input_ids
    assert torch.equal(t5_ids, model.conditioner.embedders[1].tokenize(prompts))
    assert torch.equal(T5Tokenizer(exported["dev"] / "tokenizer_2")(prompts, 32), t5_ids)
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        tokens, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=32)
    assert rel_err(c["c_crossattn"][0], tokens) <= 1e-5 and rel_err(c["y"], pooled) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_folder_samples_as_ours(variant, exported, models):
    """``FluxPipeline.from_pretrained`` on the folder, 4 steps with its own scheduler: our latents and image."""
    pipe, model = load_folder(exported[variant]), models[variant]
    x_T = noise()
    ours = our_latents(model, x_T)
    assert rel_err(ours, their_run(pipe, x_T, "latent", t5_length(model))) <= 1e-4
    assert rel_err(our_images(model, ours), their_run(pipe, x_T, "pt", t5_length(model))) <= 1e-4


def test_missing_t5_tokenizer_is_one_line(exported, tmp_path, capsys):
    """The tiny config names no tokenizer file: without --t5_tokenizer there is nothing to write tokenizer_2 from."""
    ckpt = exported["dev"].parent / "tiny-flux-dev.safetensors"
    with pytest.raises(SystemExit) as e:
        convert.main([str(ckpt), str(tmp_path / "out"), "--config", str(TINY_FLUX_CONFIG)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "t5_tokenizer" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unreproducible_model_is_refused():
    """diffusers' transformer hard-codes an MLP ratio of 4, its pipeline CLIP's pooled output: a model that differs
    is named."""
    from ldm.export.diffusers import UnsupportedModel, model_params
    from ldm.families.flux.diffusers import pipeline_configs
    config = tiny_flux_config(Path(__file__))  # any existing file: the tokenizer is not read here
    config.model.params.unet_config.params.mlp_ratio = 2.0
    with pytest.raises(UnsupportedModel, match="mlp_ratio 2.0"):
        pipeline_configs(model_params(config))
    config = tiny_flux_config(Path(__file__))
    config.model.params.conditioner_config.params.emb_models[0].params.layer = "last"
    with pytest.raises(UnsupportedModel, match="pooler_output"):
        pipeline_configs(model_params(config))
    # Called as a library (export_diffusers), a model without its T5 tokenizer file is refused in one line too.
    with pytest.raises(UnsupportedModel, match="no T5 tokenizer file") as e:
        pipeline_configs(model_params(load_config(TINY_FLUX_CONFIG)))
    assert "\n" not in str(e.value)


def test_half_pickle_export_loads_in_float16(tiny_flux_model, t5_tokenizer, tmp_path):
    """``--half --no-safetensors``: float16 .bin files that load as float16 (T5's ``wo`` kept in float32 by
    transformers), holding our tensors rounded to float16; T5's token embedding stays one tensor."""
    from ldm.weights.checkpoint import save_checkpoint
    ckpt = save_checkpoint(tmp_path / "tiny-flux.ckpt", tiny_flux_model.state_dict(), global_step=3)
    out = convert.main([str(ckpt), str(tmp_path / "half"), "--config", str(TINY_FLUX_CONFIG), "--t5_tokenizer",
                        str(t5_tokenizer), "--half", "--no-safetensors"])
    assert not list(out.rglob("*.safetensors")) and list(out.rglob("*.bin"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        pipe = FluxPipeline.from_pretrained(out, local_files_only=True, torch_dtype=torch.float16)
    flux = tiny_flux_model.model.diffusion_model
    assert pipe.transformer.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    assert torch.equal(pipe.transformer.x_embedder.weight, flux.img_in.weight.half())
    t5 = pipe.text_encoder_2
    assert t5.shared.weight.dtype == torch.float16 and t5.shared.weight is t5.encoder.embed_tokens.weight
    assert torch.equal(t5.shared.weight, tiny_flux_model.conditioner.embedders[1].transformer.shared.weight.half())
