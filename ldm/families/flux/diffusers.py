"""Export a FLUX.1 model ([dev] or [schnell]) as a diffusers ``FluxPipeline`` folder, laid out as Black Forest Labs'
own diffusers releases are: ``transformer/``, ``vae/``, ``text_encoder/`` + ``tokenizer/`` (CLIP-L),
``text_encoder_2/`` + ``tokenizer_2/`` (T5 v1.1), ``scheduler/`` and ``model_index.json``.

The shared parts (CLIP-L under transformers' names, the CLIP tokenizer files, the strict meta-device build, the
atomic folder) are ``ldm.export.diffusers``'s. FLUX.1 adds:

* the transformer under diffusers' ``FluxTransformer2DModel`` names (:func:`transformer_weights`): the renaming of
  diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, written here because that converter splits the
  single blocks' fused ``linear1`` at FLUX.1's width (3072) whatever the model's, so it cannot export a smaller one;
* the 16-channel autoencoder without quant convs, with its scale and shift (``latent = (z - shift) * scale``),
  through diffusers' ``convert_ldm_vae_checkpoint``;
* T5's encoder as transformers' ``T5EncoderModel`` (our module names are transformers', so the weights load as they
  are) and ``tokenizer_2`` as ``T5TokenizerFast`` from the same ``spiece.model`` our embedder reads;
* the ``FlowMatchEulerDiscreteScheduler`` of each release (:func:`flow_scheduler_config`).

diffusers' pipeline hard-codes parts of the architecture (MLP ratio 4, rotary theta 10000, biased q/k/v; CLIP's
pooled vector, T5's unmasked last hidden state): ``pipeline_configs`` refuses (``UnsupportedModel``) a model that
differs, since the folder would then sample another model.

One setting cannot travel in the folder: ``FluxPipeline`` takes T5's length per call (``max_sequence_length``,
default 512), and without a mask the padding changes every token's state. Sample a schnell folder with
``max_sequence_length=256`` (its embedder's ``max_length``, also written as ``tokenizer_2``'s ``model_max_length``).
"""
from __future__ import annotations

import inspect
import json
import re
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.export.diffusers import (TEXT_MODEL, UNET, VAE, UnsupportedModel, _build, _with_defaults, clip_text_config,
                                  inference_weights, save_text_model, vae_config, write_text_encoder,
                                  write_tokenizer)
from ldm.families.flux.modules.t5 import T5Config
from ldm.models.diffusion.objectives import shift_mu

CONDITIONER = "conditioner."
CLIP_TEXT = "conditioner.embedders.0.transformer.text_model."
T5 = "conditioner.embedders.1.transformer."

# ---- the transformer's names (diffusers' convert_flux_transformer_checkpoint_to_diffusers) ---------------------

#: BFL module -> diffusers module, outside the blocks.
RENAMES = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
#: Inside ``double_blocks.{i}`` (diffusers' ``transformer_blocks.{i}``): the image stream keeps diffusers' plain
#: names, the text stream its ``context`` / ``added`` ones.
DOUBLE_RENAMES = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
#: Inside ``single_blocks.{i}`` (diffusers' ``single_transformer_blocks.{i}``).
SINGLE_RENAMES = {"modulation.lin": "norm.linear", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k",
                  "linear2": "proj_out"}
#: Fused projections diffusers keeps as separate layers: their output rows, cut into blocks of the model width in
#: this order, the last taking the rest (``linear1``'s MLP input, mlp_ratio x width rows).
DOUBLE_SPLITS = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_SPLITS = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
#: The final adaLN projection: BFL chunks its output as (shift, scale), diffusers' ``AdaLayerNormContinuous`` as
#: (scale, shift), so the two halves swap.
FINAL_MODULATION = "final_layer.adaLN_modulation.1"
BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.(.+)")


def transformer_weights(state_dict: Mapping[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    """The tensors of a FLUX transformer in Black Forest Labs' names (no prefix) under the names of diffusers'
    ``FluxTransformer2DModel``; every key is placed (a ``KeyError`` names one that is not)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        module, param = key.rsplit(".", 1)
        param = "weight" if param == "scale" else param  # BFL's RMSNorm ``scale`` is diffusers' RMSNorm ``weight``
        block = BLOCK.fullmatch(module)
        if block is None:
            prefix, name, renames, splits = "", module, RENAMES, {}
        elif block[1] == "double":
            prefix, name, renames, splits = f"transformer_blocks.{block[2]}.", block[3], DOUBLE_RENAMES, DOUBLE_SPLITS
        else:
            prefix, name, renames, splits = (f"single_transformer_blocks.{block[2]}.", block[3], SINGLE_RENAMES,
                                             SINGLE_SPLITS)
        if name in splits:
            sizes = [hidden_size] * (len(splits[name]) - 1)
            parts = value.split([*sizes, value.shape[0] - sum(sizes)])
            out.update({f"{prefix}{new}.{param}": part for new, part in zip(splits[name], parts)})
        elif name == FINAL_MODULATION:
            shift, scale = value.chunk(2)
            out[f"norm_out.linear.{param}"] = torch.cat([scale, shift])
        elif name in renames:
            out[f"{prefix}{renames[name]}.{param}"] = value
        else:
            raise KeyError(f"{key}: not a tensor of the FLUX.1 transformer (no diffusers name for it)")
    return out


# ---- configs ---------------------------------------------------------------------------------------------------

#: What diffusers' ``FluxTransformer2DModel`` hard-codes (its blocks' MLP ratio and q/k/v bias, ``FluxPosEmbed``'s
#: theta): a model that differs samples differently there.
FIXED = {"mlp_ratio": 4.0, "theta": 10_000, "qkv_bias": True}


def transformer_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """``FluxTransformer2DModel`` config of the network ``flux_transformer(**unet_config.params)`` builds."""
    flux = _with_defaults(params["unet_config"])
    for key, value in FIXED.items():
        if flux[key] != value:
            raise UnsupportedModel(f"unet_config {key} {flux[key]!r}: diffusers' FluxTransformer2DModel only has "
                                   f"{value!r}")
    return dict(patch_size=1, in_channels=flux["in_channels"], out_channels=flux["out_channels"],
                num_layers=flux["depth"], num_single_layers=flux["depth_single_blocks"],
                attention_head_dim=flux["hidden_size"] // flux["num_heads"], num_attention_heads=flux["num_heads"],
                joint_attention_dim=flux["context_in_dim"], pooled_projection_dim=flux["vec_in_dim"],
                guidance_embeds=bool(flux["guidance_embed"]), axes_dims_rope=list(flux["axes_dim"]))


def flux_vae_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config of FLUX.1's autoencoder (``ae.safetensors``'s diffusers release: 16
    latent channels, no quant convs, latent = (z - shift_factor) * scaling_factor, upcast in float16)."""
    first_stage = params["first_stage_config"]["params"]
    quant = bool(first_stage.get("use_quant_conv", True))
    return {**vae_config(params), "shift_factor": _model_param(params, "shift_factor"), "use_quant_conv": quant,
            "use_post_quant_conv": quant, "force_upcast": True}


def t5_config(section: Mapping[str, Any]) -> dict[str, Any]:
    """transformers ``T5Config`` kwargs of a ``FrozenT5Embedder`` config section: its ``T5Config`` fields (XXL's
    where not given), v1.1's gated GELU, T5's pad/eos ids; dropout 0.1 as in the release (only training reads it)."""
    given = dict(section.get("params") or {})
    t5 = {f.name: given.get(f.name, f.default) for f in fields(T5Config)}
    return dict(t5, feed_forward_proj="gated-gelu", dropout_rate=0.1, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


def flow_scheduler_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``FlowMatchEulerDiscreteScheduler`` config of FLUX.1's releases (their ``scheduler_config.json``): [dev]
    shifts the schedule by resolution (``use_dynamic_shifting``: mu linear in the image's tokens, from ``base_shift``
    at 256 to ``max_shift`` at 4096, as ``time_shift`` does in our sampler; its unused fixed ``shift`` is 3), [schnell]
    does not (shift 1)."""
    dynamic = bool(_model_param(params, "time_shift"))
    tokens = inspect.signature(shift_mu).parameters  # the token counts our sampler's mu is anchored at
    return dict(num_train_timesteps=1000, shift=3.0 if dynamic else 1.0, use_dynamic_shifting=dynamic,
                base_shift=_model_param(params, "base_shift"), max_shift=_model_param(params, "max_shift"),
                base_image_seq_len=tokens["base_tokens"].default, max_image_seq_len=tokens["max_tokens"].default)


def _model_param(params: Mapping[str, Any], name: str) -> Any:
    """``model.params[name]``, or ``LatentDiffusion``'s default when the config leaves it out."""
    if name in params:
        return params[name]
    from ldm.models.diffusion.ddpm import LatentDiffusion
    return inspect.signature(LatentDiffusion).parameters[name].default


def _embedder(section: Mapping[str, Any], index: int, target: str) -> None:
    if not str(section["target"]).endswith(target):
        raise UnsupportedModel(f"conditioner embedder {index} is {section['target']}; diffusers' FluxPipeline needs "
                               f"{target} there")


def t5_tokenizer_file(path: Any) -> Path:
    """The ``spiece.model`` a T5 embedder's ``tokenizer_path`` names (the file, or a folder holding it)."""
    if not path:
        raise UnsupportedModel("the model has no T5 tokenizer file to write tokenizer_2/ from: pass --t5_tokenizer "
                               "spiece.model (or set the T5 embedder's tokenizer_path in the config)")
    path = Path(path)
    path = path / "spiece.model" if path.is_dir() else path
    if not path.is_file():
        raise UnsupportedModel(f"T5 tokenizer file {path} not found (the spiece.model of tokenizer_2)")
    return path


def pipeline_configs(params: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers/transformers configs of a FLUX.1 model config; ``UnsupportedModel`` for a model diffusers'
    ``FluxPipeline`` would not reproduce, or without the T5 tokenizer file."""
    if _model_param(params, "parameterization") != "flow" or params.get("conditioning_key") != "flux":
        raise UnsupportedModel("diffusers' FluxPipeline samples a flow model conditioned as FLUX.1 "
                               "(parameterization: flow, conditioning_key: flux)")
    embedders = params["conditioner_config"]["params"]["emb_models"]
    if len(embedders) != 2:
        raise UnsupportedModel(f"the conditioner has {len(embedders)} embedders; diffusers' FluxPipeline needs "
                               f"CLIP's pooled vector and T5's tokens")
    _embedder(embedders[0], 0, "FrozenCLIPEmbedder")
    _embedder(embedders[1], 1, "FrozenT5Embedder")
    clip, t5 = _with_defaults(embedders[0]), _with_defaults(embedders[1])
    if clip["layer"] != "pooler_output" or clip["always_return_pooled"]:
        raise UnsupportedModel(f"conditioner embedder 0 gives {clip['layer']!r}; diffusers' FluxPipeline takes "
                               f"CLIP's pooler_output")
    return {
        "transformer": transformer_config(params), "vae": flux_vae_config(params),
        "text": clip_text_config(embedders[0]), "t5": t5_config(embedders[1]),
        "scheduler": flow_scheduler_config(params), "clip": clip,
        "t5_tokenizer": {"path": t5_tokenizer_file(t5["tokenizer_path"]), "max_length": t5["max_length"]},
    }


# ---- writing -----------------------------------------------------------------------------------------------------

def write_t5_encoder(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], folder: Path,
                     dtype: torch.dtype, safetensors: bool) -> None:
    """``text_encoder_2/``: our T5 encoder's tensors (transformers' names already) in ``T5EncoderModel``."""
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel
    t5 = {k[len(T5):]: v for k, v in weights.items() if k.startswith(T5)}
    model = _build(T5EncoderModel, t5, dtype, config=HFT5Config(**config))
    # Loading by assignment gave ``shared`` and ``encoder.embed_tokens`` a tensor each: make them one again, as
    # transformers' own loading does.
    model.encoder.embed_tokens.weight = model.shared.weight
    save_text_model(model, folder, dtype, safetensors)


def write_t5_tokenizer(folder: Path, spiece: Path, max_length: int) -> None:
    """``tokenizer_2/``: transformers' ``T5TokenizerFast`` built from ``spiece`` (its ``tokenizer.json`` and
    configs), and the ``spiece.model`` itself beside them, as the release has it (what our ``T5Tokenizer`` reads).
    ``model_max_length`` is the embedder's ``max_length`` (512 for dev, 256 for schnell)."""
    from transformers import T5TokenizerFast
    with tempfile.TemporaryDirectory() as tmp:  # from_pretrained reads a folder's spiece.model
        shutil.copyfile(spiece, Path(tmp) / "spiece.model")
        tokenizer = T5TokenizerFast.from_pretrained(tmp, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    shutil.copyfile(spiece, folder / "spiece.model")


def flux_model_index() -> dict[str, Any]:
    import diffusers
    return {
        "_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def write_pipeline(folder: Path, configs: Mapping[str, Any], model: torch.nn.Module, dtype: torch.dtype,
                   safetensors: bool, prefer_ema: bool) -> None:
    """The components of a ``FluxPipeline`` folder."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    weights = inference_weights(model, prefer_ema, prefixes=(UNET, VAE, CONDITIONER))
    config = configs["transformer"]
    bfl = {k[len(UNET):]: v for k, v in weights.items() if k.startswith(UNET)}
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    transformer = _build(FluxTransformer2DModel, transformer_weights(bfl, hidden), dtype, **config)
    transformer.save_pretrained(folder / "transformer", safe_serialization=safetensors)
    vae = _build(AutoencoderKL, convert_ldm_vae_checkpoint(weights, configs["vae"]), dtype, **configs["vae"])
    vae.save_pretrained(folder / "vae", safe_serialization=safetensors)
    # CLIP-L has SD v1's text encoder's names under another prefix: the shared writer takes it as it is.
    clip = {TEXT_MODEL + k[len(CLIP_TEXT):]: v for k, v in weights.items() if k.startswith(CLIP_TEXT)}
    write_text_encoder(clip, configs["text"], folder / "text_encoder", dtype, safetensors)
    write_t5_encoder(weights, configs["t5"], folder / "text_encoder_2", dtype, safetensors)
    write_tokenizer(folder / "tokenizer", configs["clip"]["bpe_path"], configs["clip"]["max_length"])
    write_t5_tokenizer(folder / "tokenizer_2", configs["t5_tokenizer"]["path"], configs["t5_tokenizer"]["max_length"])
    FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(flux_model_index(), indent=2) + "\n")
