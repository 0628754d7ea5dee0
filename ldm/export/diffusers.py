"""Export a checkpoint as a diffusers pipeline folder: the parts every family's writer shares, and
:func:`export_diffusers`, which hands the folder to the writer of the checkpoint's family
(``ldm/families/<package>/diffusers.py``: a ``StableDiffusionPipeline`` for SD v1, ...XLPipeline for SDXL).

The diffusers configs are derived from our OmegaConf model config, so the tiny test config and v1 both work:
the UNet and VAE weights go through diffusers' own converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``), the text encoder keeps its transformers names (we mirror them), and the tokenizer
files are written from the same BPE merge table our tokenizer reads. No safety checker or feature extractor is
written (``null`` in ``model_index.json``), so the folder loads offline with nothing downloaded.

diffusers and transformers are optional dependencies of this module only: they are imported when used.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch
from omegaconf import OmegaConf

from ldm.files import (DiskFullError, atomic_folder, clean_partial_outputs, default_dir_mode, default_file_mode,
                       disk_full_message, is_disk_full, is_within)
from ldm.modules.encoders.tokenizer import END_OF_TEXT, START_OF_TEXT, build_vocab, default_bpe_path, read_merges
from ldm.util import get_obj_from_str
from ldm.weights.checkpoint import ema_key
from ldm.weights.load import load_model_from_config

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT_MODEL = "cond_stage_model.transformer.text_model."
INSTALL_HINT = "pip install diffusers transformers"
#: Our schedule names -> diffusers'. Our "linear" is linear in sqrt(beta) (SD v1), diffusers' "scaled_linear".
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear"}


class MissingDependency(ImportError):
    """diffusers or transformers is not installed; the message is the one line to show."""


class UnsupportedModel(ValueError):
    """The model config has a part diffusers' pipeline would not reproduce; the message is one line."""


def require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"converting to diffusers needs the {e.name or 'diffusers'} package: "
                                f"{INSTALL_HINT}") from None


def model_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.model.params`` as plain Python (interpolations resolved)."""
    return OmegaConf.to_container(OmegaConf.create(dict(config))["model"]["params"], resolve=True)


def _with_defaults(section: Mapping[str, Any]) -> dict[str, Any]:
    """A ``target``/``params`` section's params completed with the target's signature defaults: the v1 config
    gives ``FrozenCLIPEmbedder`` no params at all, and its defaults are what the model was built with."""
    target = get_obj_from_str(section["target"])
    defaults = {n: p.default for n, p in inspect.signature(target).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return defaults | dict(section.get("params") or {})


def latent_side(params: Mapping[str, Any]) -> int:
    """``model.params.image_size``: the latent side the model was trained at, or ``LatentDiffusion``'s default
    when a config leaves it out (the model built from that config has the default too)."""
    if "image_size" in params:
        return params["image_size"]
    from ldm.models.diffusion.ddpm import LatentDiffusion
    return inspect.signature(LatentDiffusion).parameters["image_size"].default


def unet_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """``UNet2DConditionModel`` config of the network ``UNetModel(**unet_config.params)`` builds.

    A level has cross-attention blocks when its downsampling factor 2**level is in ``attention_resolutions``
    (as ``UNetModel.__init__`` decides). diffusers' SD1 naming calls the head *count* ``attention_head_dim``;
    with ``num_head_channels`` the count grows with the width, so it is given per level.
    """
    unet = _with_defaults(params["unet_config"])
    mults = list(unet["channel_mult"])
    attn = [2 ** level in unet["attention_resolutions"] for level in range(len(mults))]
    head_channels = unet["num_head_channels"]
    heads = unet["num_heads"] if head_channels == -1 else [unet["model_channels"] * m // head_channels
                                                           for m in mults]
    return dict(
        # sample_size is the latent side the model was trained at: the pipeline's default height is it x 8.
        sample_size=latent_side(params), in_channels=unet["in_channels"], out_channels=unet["out_channels"],
        block_out_channels=[unet["model_channels"] * m for m in mults],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        layers_per_block=unet["num_res_blocks"], cross_attention_dim=unet["context_dim"],
        attention_head_dim=heads, transformer_layers_per_block=unet["transformer_depth"],
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)


def vae_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config of our ``AutoencoderKL(ddconfig=...)``.

    ``sample_size`` is the pixel side of the latent ``image_size`` (512 for v1, as diffusers' own v1 folders
    have), not ``ddconfig.resolution`` (the VAE's 256 training crop): diffusers only uses it to size tiles.
    """
    dd = params["first_stage_config"]["params"]["ddconfig"]
    return dict(
        in_channels=dd["in_channels"], out_channels=dd["out_ch"],
        down_block_types=["DownEncoderBlock2D"] * len(dd["ch_mult"]),
        up_block_types=["UpDecoderBlock2D"] * len(dd["ch_mult"]),
        block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
        latent_channels=dd["z_channels"], norm_num_groups=32,
        sample_size=latent_side(params) * 2 ** (len(dd["ch_mult"]) - 1), scaling_factor=params["scale_factor"])


def text_encoder_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` kwargs of our ``FrozenCLIPEmbedder`` (CLIP's quick-GELU text tower).

    BOS/EOS/pad are the tokenizer's real ids (49406/49407/49407), so transformers pools at the EOS token; the
    old ``openai/clip-vit-large-patch14`` config's 0/2/1 only worked through a legacy argmax path. SD uses
    ``last_hidden_state``, which pooling does not touch.
    """
    section = params["cond_stage_config"]
    if not section["target"].endswith("FrozenCLIPEmbedder"):
        raise ValueError(f"cond_stage_config {section['target']}: only SD v1's FrozenCLIPEmbedder is supported")
    return clip_text_config(section)


def clip_text_config(section: Mapping[str, Any]) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs of a ``FrozenCLIPEmbedder`` config section (SD v1's, or SDXL's first embedder)."""
    clip = _with_defaults(section)
    return dict(
        vocab_size=clip["vocab_size"], hidden_size=clip["width"], num_hidden_layers=clip["layers"],
        num_attention_heads=clip["heads"], intermediate_size=clip["mlp_dim"],
        max_position_embeddings=clip["max_length"], layer_norm_eps=clip["layer_norm_eps"], hidden_act="quick_gelu",
        projection_dim=clip["width"], bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def scheduler_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """The PNDM config SD v1 was released with; ``clip_sample: false`` is kept for ``DDIMScheduler.from_config``
    (whose default would clip x0 to [-1, 1], which latents must not be)."""
    schedule = params.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule {schedule!r} has no diffusers equivalent (linear or sqrt_linear)")
    return dict(num_train_timesteps=params.get("timesteps", 1000), beta_start=params["linear_start"],
                beta_end=params["linear_end"], beta_schedule=BETA_SCHEDULES[schedule], trained_betas=None,
                prediction_type="epsilon", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                timestep_spacing="leading", clip_sample=False)


def tokenizer_files(bpe_path: str | Path | None = None, max_length: int = 77,
                    pad_token: str = END_OF_TEXT) -> dict[str, str]:
    """File name -> text of a ``CLIPTokenizer`` folder, from the merge table our tokenizer reads.

    ``vocab.json`` lists the same tokens in the same order as ``build_vocab`` (so ids agree by construction);
    ``merges.txt`` starts with a header line that transformers skips, as in the openai release. ``pad_token``
    is OpenAI's end-of-text, or ``"!"`` (id 0) for OpenCLIP's zero padding (SDXL's ``tokenizer_2``).
    """
    merges = read_merges(bpe_path or default_bpe_path())
    vocab = {token: i for i, token in enumerate(build_vocab(merges))}
    specials = {"bos_token": START_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT,
                "pad_token": pad_token}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **specials}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(specials, indent=2),
    }


def inference_weights(model: torch.nn.Module, prefer_ema: bool = True,
                      prefixes: tuple[str, ...] = (UNET, VAE, TEXT_MODEL)) -> dict[str, torch.Tensor]:
    """The model's UNet/VAE/text-encoder tensors (those under ``prefixes``); a model with its own EMA
    (``use_ema: True``) gives its EMA UNet unless ``prefer_ema`` is False (a ``use_ema: False`` model already took
    the file's EMA when loading)."""
    sd = model.state_dict()
    out = {k: v for k, v in sd.items() if k.startswith(prefixes)}
    if getattr(model, "use_ema", False) and prefer_ema:
        out.update({k: sd[ema_key(k)] for k in out if k.startswith(UNET)})
    return out


def _build(cls: Any, weights: Mapping[str, torch.Tensor], dtype: torch.dtype, **config: Any) -> Any:
    """``cls(**config)`` holding ``weights``: built on the meta device (no random init of a 3 GB UNet) and
    filled with ``strict=True``, so a key the converter missed or left over fails here, not at sampling."""
    with torch.device("meta"):
        module = cls(**config)
    # Cast before loading (assign keeps the given dtype): diffusers warns about ``.to(dtype)`` on a built model.
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    module.load_state_dict(weights, strict=True, assign=True)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    for name in leftover:  # non-persistent buffers (CLIP's position_ids) are not in a state dict
        if not name.endswith("position_ids"):
            raise RuntimeError(f"{cls.__name__}: {name} has no value after loading")
        owner = module.get_submodule(name.rsplit(".", 1)[0])
        buf = getattr(owner, "position_ids")
        owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape).clone(),
                              persistent=False)
    return module.eval()


def text_encoder_weights(weights: Mapping[str, torch.Tensor], expected: Collection[str]) -> dict[str, torch.Tensor]:
    """Our ``cond_stage_model.transformer.text_model.*`` tensors under the key names of the installed
    transformers' ``CLIPTextModel`` (``expected``): version 4 has a ``text_model.`` level, version 5 none, and
    only some versions keep ``position_ids`` in the state dict."""
    prefix = "text_model." if any(k.startswith("text_model.") for k in expected) else ""
    out = {prefix + k[len(TEXT_MODEL):]: v for k, v in weights.items() if k.startswith(TEXT_MODEL)}
    return {k: v for k, v in out.items() if k in expected or not k.endswith("position_ids")}


def write_text_encoder(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], folder: Path,
                       dtype: torch.dtype, safetensors: bool) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel
    hf_config = CLIPTextConfig(**config)
    with torch.device("meta"):
        expected = CLIPTextModel(hf_config).state_dict().keys()
    model = _build(CLIPTextModel, text_encoder_weights(weights, expected), dtype, config=hf_config)
    save_text_model(model, folder, dtype, safetensors)


def save_text_model(model: Any, folder: Path, dtype: torch.dtype, safetensors: bool) -> None:
    """``save_pretrained`` a transformers model, or its config and a ``pytorch_model.bin`` (``safetensors``
    False: transformers 5 only writes safetensors, and still reads .bin)."""
    if safetensors:
        model.save_pretrained(folder)
    else:
        hf_config = model.config
        hf_config.architectures = [type(model).__name__]
        setattr(hf_config, "dtype" if hasattr(hf_config, "dtype") else "torch_dtype", dtype)  # v5 renamed it
        hf_config.save_pretrained(folder)
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")


def export_diffusers(config: Mapping[str, Any], ckpt: str | os.PathLike, outdir: str | os.PathLike,
                     half: bool = False, safetensors: bool = True, prefer_ema: bool = True,
                     verbose: bool = True) -> Path:
    """Write ``outdir`` (which must not exist or be empty) as a diffusers pipeline folder: a
    ``StableDiffusionPipeline`` for SD v1, a ``StableDiffusionXLPipeline`` for SDXL (the family of ``config``).

    The folder is assembled next to ``outdir`` and renamed into place at the end, so a failed conversion
    leaves nothing half-written. Raises ``CheckpointError`` for a bad checkpoint, ``MissingDependency``
    without diffusers/transformers, ``FileExistsError`` for a non-empty ``outdir``, ``UnsupportedModel`` for a
    model diffusers' pipeline would not reproduce.
    """
    require_diffusers()
    outdir = Path(outdir)
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise FileExistsError(f"{outdir}: exists and is not an empty folder; choose a new output folder")
    if is_within(ckpt, outdir):
        raise FileExistsError(f"{outdir}: holds the input checkpoint {ckpt}; choose a new output folder")
    params = model_params(config)
    make_configs, write = pipeline_writer(config)
    configs = make_configs(params)  # config problems surface before the weights are read
    model = load_model_from_config(config, ckpt, prefer_ema=prefer_ema, verbose=verbose)
    dtype = torch.float16 if half else torch.float32

    clean_partial_outputs(outdir)
    try:
        with atomic_folder(outdir) as tmp:
            write(tmp, configs, model, dtype, safetensors, prefer_ema)
            make_public(tmp)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(exc.errno, disk_full_message(exc, outdir), str(outdir)) from None
        raise
    return outdir


def pipeline_writer(config: Mapping[str, Any]) -> tuple[Callable, Callable]:
    """``(pipeline_configs(params), write_pipeline(folder, configs, model, dtype, safetensors, prefer_ema))`` of the
    family ``config`` builds, from its folder (``ldm/families/<package>/diffusers.py``); SD v1's for a config of no
    known family (the tiny test models)."""
    import importlib

    from ldm.families import FAMILIES, config_family
    family = FAMILIES[config_family(config) or "sd-v1"]
    writer = importlib.import_module(family.diffusers_module)  # a family's part, found by its record
    return writer.pipeline_configs, writer.write_pipeline


def write_unet_vae(folder: Path, weights: Mapping[str, torch.Tensor], configs: Mapping[str, Any],
                   dtype: torch.dtype, safetensors: bool) -> None:
    """``unet/`` and ``vae/`` through diffusers' own converters of the original layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    unet = _build(UNet2DConditionModel, convert_ldm_unet_checkpoint(weights, configs["unet"]), dtype,
                  **configs["unet"])
    unet.save_pretrained(folder / "unet", safe_serialization=safetensors)
    vae = _build(AutoencoderKL, convert_ldm_vae_checkpoint(weights, configs["vae"]), dtype, **configs["vae"])
    vae.save_pretrained(folder / "vae", safe_serialization=safetensors)


def write_tokenizer(folder: Path, bpe_path: str | Path | None, max_length: int, pad_token: str = END_OF_TEXT
                    ) -> None:
    folder.mkdir()
    for name, text in tokenizer_files(bpe_path, max_length, pad_token).items():
        (folder / name).write_text(text, encoding="utf-8")


def make_public(folder: Path) -> None:
    """Give a folder assembled under ``mkdtemp`` (0o700) and its files the modes the user's umask asks for."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(default_dir_mode() if path.is_dir() else default_file_mode())
