"""The command-line pieces the sampling scripts share (``stable_txt2img.py``, ``img2img.py``, ``inpaint.py``): the
flags, the one check of their values, loading the model with its adapters, and writing numbered PNGs that never
overwrite anything.

``check_sampling_args`` is the one place where a sampling run's flags are checked, from the maths of each: the
image side must be a multiple of the VAE's and the UNet's downsampling together; DDIM's eta must lie in [0, 1]
(above 1 the variance sigma_t^2 exceeds 1 - alpha_{t-1} and the direction term becomes the square root of a
negative number: NaN, i.e. black images); the step count lies between 1 and the schedule's length; the seed is one
Lightning's ``seed_everything`` accepts; every number is finite. Each problem is one line, before a model loads.
"""
from __future__ import annotations

import argparse
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.config import MAX_SEED, ConfigError, load_configs, spatial_factor

SAMPLER_NAMES = ("ddim", "plms", "euler", "dpmpp_2m", "flow_euler")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=str, default=None,
                   help="config which constructs the model (default: the one of the checkpoint's family, "
                        "recognised from its keys: SD v1, SD v1 inpainting or SDXL base)")
    p.add_argument("--vae", type=str, default=None,
                   help="a separate VAE file (original or diffusers layout) in place of the checkpoint's own, "
                        "e.g. sdxl-vae-fp16-fix")
    p.add_argument("--ckpt", type=str, default="models/ldm/stable-diffusion-v1/model.ckpt",
                   help="path to checkpoint of model (.ckpt or .safetensors)")
    p.add_argument("--precision", type=str, choices=["full", "autocast", "fp16", "bf16"], default="autocast",
                   help="evaluate at this precision on CUDA (autocast = fp16); CPU always runs in full fp32")
    p.add_argument("--device", type=str, default=None, help="cuda, cuda:1, cpu... (default: cuda if available)")
    p.add_argument("--no_ema", action="store_true", help="with a full-EMA checkpoint, sample the non-EMA weights")
    p.add_argument("--lora", type=str, default=None, metavar="FILE[:SCALE]",
                   help="apply a LoRA adapter (.safetensors, kohya layout) with an optional strength, e.g. "
                        "a.safetensors:0.8 (to combine several, bake them in with scripts/merge_lora.py)")
    p.add_argument("--allow_any_target", action="store_true",
                   help="let --config's target: strings import any module (only for configs you trust)")
    flux = p.add_argument_group("FLUX.1 (released as separate files; --ckpt is the transformer)")
    flux.add_argument("--ae", type=str, default=None, help="the autoencoder, ae.safetensors")
    flux.add_argument("--t5", type=str, default=None, help="the T5 v1.1 XXL text encoder (transformers' layout)")
    flux.add_argument("--clip", type=str, default=None, help="the CLIP ViT-L text model (transformers' layout)")
    flux.add_argument("--t5_tokenizer", type=str, default=None, help="T5's SentencePiece model, spiece.model")
    flux.add_argument("--guidance", type=float, default=None,
                      help="FLUX.1 [dev]'s distilled guidance strength, an input of the network (default 3.5); "
                           "--scale above 1 adds classifier-free guidance on top")


def add_sampling_flags(p: argparse.ArgumentParser, steps: int = 50, scale: float = 7.5, n_samples: int = 3,
                       n_iter: int = 2) -> None:
    """The original scripts' sampling flags (their defaults differ per script: passed in). A model family may
    have its own defaults for steps and scale (``Family.sampling_defaults``: FLUX.1): ``check_sampling_args``
    settles them once the model's family is known."""
    p.set_defaults(script_defaults={"ddim_steps": steps, "scale": scale})
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                   help="the prompt to render")
    p.add_argument("--negative_prompt", type=str, default="",
                   help="what to steer away from: replaces the empty unconditional prompt of guidance")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", type=int, default=None, help=f"number of sampling steps (default {steps}; "
                   f"FLUX.1: 28 dev, 4 schnell)")
    p.add_argument("--plms", action="store_true", help="use plms sampling (same as --sampler plms)")
    p.add_argument("--sampler", type=str, choices=SAMPLER_NAMES, default=None,
                   help="ddim (default), plms, euler, or dpmpp_2m (DPM-Solver++ 2M with Karras sigmas); flow_euler "
                        "(the only one, and the default, for FLUX.1)")
    p.add_argument("--fixed_code", action="store_true",
                   help="use the same starting code for every iteration (n_iter)")
    p.add_argument("--ddim_eta", type=float, default=0.0,
                   help="ddim eta in [0, 1] (eta=0.0 is deterministic sampling)")
    p.add_argument("--n_iter", type=int, default=n_iter, help="sample this often")
    p.add_argument("--n_samples", type=int, default=n_samples,
                   help="how many samples to produce for each given prompt (the batch size)")
    p.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    p.add_argument("--scale", type=float, default=None,
                   help=f"unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty)) "
                        f"(default {scale}; FLUX.1: 1, no unconditional pass)")
    p.add_argument("--from-file", type=str, help="if specified, load prompts from this file, one per line")
    p.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")


def sampler_name(opt: argparse.Namespace) -> str:
    if opt.plms and opt.sampler not in (None, "plms"):
        raise ConfigError(f"--plms and --sampler {opt.sampler} contradict each other")
    return "plms" if opt.plms else (opt.sampler or "ddim")


def _finite(flag: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{flag} {value}: must be a finite number")


def pick_device(name: Optional[str]) -> torch.device:
    """``--device``: a device torch knows and this machine has."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r}: not a device (expected cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: unsupported device type {device.type!r}")
    return device


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--from-file {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--from-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--from-file {path}: contains no prompts")
    return prompts


def load_model_config(opt: argparse.Namespace) -> DictConfig:
    """``--config``, or the config of the checkpoint's family when it is not given (sets ``opt.config``), with
    the settings of the family's parts given on the command line (FLUX.1's ``--t5_tokenizer``)."""
    from ldm.families import apply_part_settings
    from ldm.util import allow_any_target
    allow_any_target(getattr(opt, "allow_any_target", False))
    if opt.config is None:
        opt.config = str(config_for_checkpoint(opt.ckpt))
    return apply_part_settings(load_configs([opt.config], flag="--config"), vars(opt))


def family_of(config: DictConfig) -> Any:
    """The ``Family`` record ``config`` builds, or None (a config of no known family: the tiny test models)."""
    from ldm.families import FAMILIES, config_family
    return FAMILIES.get(config_family(config) or "")


#: The flags that name a family's separate files, and those that set its parts (FLUX.1's).
PART_FLAGS, PART_SETTINGS = ("ae", "t5", "clip"), ("t5_tokenizer",)


def check_parts(values: Mapping[str, Any], config: DictConfig) -> dict[str, str]:
    """The files of the model's other parts (``--ae``, ``--t5``, ``--clip``: ``Family.components``) and their
    settings (``--t5_tokenizer``) in ``values`` (flag -> value): each given one must be one of the family's and
    exist; the T5 tokenizer must be a SentencePiece model whose ids fit the encoder. Returns the components given,
    flag -> file."""
    family = family_of(config)
    parts = {name: values[name] for name in PART_FLAGS if values.get(name)}
    settings = [name for name in PART_SETTINGS if values.get(name)]
    for name in list(parts) + settings:
        owns = family is not None and (name in family.components or name in family.config_flags)
        if not owns:
            what = family.label if family else "this model"
            raise ConfigError(f"--{name}: {what} has no such part (--ae, --t5, --clip and --t5_tokenizer are "
                              f"FLUX.1's)")
    for name, path in parts.items():
        if not Path(path).is_file():
            raise ConfigError(f"--{name} {path}: file not found")
    if family is not None and "t5_tokenizer" in family.config_flags:
        key = family.config_flags["t5_tokenizer"]
        check_t5_tokenizer(OmegaConf.select(config, key), config, key)
    return parts


def check_t5_tokenizer(path: Any, config: DictConfig, key: str) -> None:
    """A T5 tokenizer file given, readable as SentencePiece with T5's ids, and no larger than the encoder's
    vocabulary (one line each, before a model is built)."""
    from ldm.families.flux.modules.t5 import T5Tokenizer
    if not path:
        raise ConfigError("--t5_tokenizer: missing: FLUX.1's T5 needs its SentencePiece model (spiece.model, beside "
                          "the T5 weights in their release), which this project does not ship")
    try:
        tokenizer = T5Tokenizer(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--t5_tokenizer: {' '.join(str(e).split())}") from None
    params = OmegaConf.select(config, key.rsplit(".", 1)[0]) or {}
    vocab = int(params.get("vocab_size", 32128))
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"--t5_tokenizer {path}: {tokenizer.vocab_size} tokens, but the T5 encoder has {vocab}: "
                          f"the tokenizer of another model")


def config_for_checkpoint(ckpt: str | Path) -> Path:
    """The inference config of the family ``ckpt`` belongs to (recognised from its keys and shapes)."""
    from ldm.families import FAMILIES, detect_family, family_config
    from ldm.weights.checkpoint import checkpoint_shapes
    if not Path(ckpt).exists():
        raise ConfigError(f"--ckpt {ckpt}: file not found")
    family = detect_family(checkpoint_shapes(ckpt))
    if family is None:
        known = ", ".join(f.label for f in FAMILIES.values())
        raise ConfigError(f"--ckpt {ckpt}: not a checkpoint of a known family ({known}); pass --config for it")
    print(f"{ckpt}: {FAMILIES[family].label} (config {family_config(family).name})")
    return family_config(family)


def native_size(config: DictConfig) -> int:
    """The side in pixels a model was trained at: its latent ``image_size`` times the VAE's factor."""
    ch_mult = OmegaConf.select(config, "model.params.first_stage_config.params.ddconfig.ch_mult", default=[1, 2, 4, 4])
    return int(OmegaConf.select(config, "model.params.image_size", default=64)) * 2 ** (len(ch_mult) - 1)


def settle_defaults(opt: argparse.Namespace, config: DictConfig) -> None:
    """Steps, scale, sampler and guidance not given on the command line: the model family's defaults
    (``Family.sampling_defaults``), else the script's. A flow model samples with ``flow_euler`` only, and only a
    guidance-distilled network takes ``--guidance``."""
    family = family_of(config)
    defaults = {**opt.script_defaults, **(family.sampling_defaults if family else {})}
    for flag in ("ddim_steps", "scale"):
        if getattr(opt, flag) is None:
            setattr(opt, flag, defaults[flag])
    flow = OmegaConf.select(config, "model.params.parameterization", default="eps") == "flow"
    label = family.label if family else "this model"
    if flow and (opt.plms or opt.sampler not in (None, "flow_euler")):
        given = "--plms" if opt.plms else f"--sampler {opt.sampler}"
        raise ConfigError(f"{given}: {label} is a rectified flow; it samples with flow_euler")
    if not flow and opt.sampler == "flow_euler":
        raise ConfigError("--sampler flow_euler: samples rectified-flow models (FLUX.1); this model predicts eps")
    opt.sampler = "flow_euler" if flow else opt.sampler
    distilled = OmegaConf.select(config, "model.params.unet_config.params.guidance_embed", default=False)
    if opt.guidance is not None and not distilled:
        raise ConfigError(f"--guidance {opt.guidance}: {label} has no guidance "
                          f"input (only FLUX.1 [dev] is guidance-distilled; use --scale for classifier-free guidance)")
    opt.guidance = defaults.get("guidance") if opt.guidance is None and distilled else opt.guidance
    if opt.guidance is not None:
        _finite("--guidance", opt.guidance)


def check_sampling_args(opt: argparse.Namespace, config: DictConfig, sizes: bool = True) -> list[list[str]]:
    """Check every sampling flag against ``config`` (one ``ConfigError`` line each); returns the prompt batches."""
    settle_defaults(opt, config)
    opt.components = check_parts(vars(opt), config)
    timesteps = int(OmegaConf.select(config, "model.params.timesteps", default=1000))
    if sizes:
        factor = spatial_factor(config)
        vae_f = 2 ** (len(OmegaConf.select(config, "model.params.first_stage_config.params.ddconfig.ch_mult",
                                           default=[1, 2, 4, 4])) - 1)
        channels = int(OmegaConf.select(config, "model.params.channels", default=4))
        opt.H = native_size(config) if opt.H is None else opt.H
        opt.W = native_size(config) if opt.W is None else opt.W
        opt.f = vae_f if opt.f is None else opt.f
        opt.C = channels if opt.C is None else opt.C
        if opt.f != vae_f:
            raise ConfigError(f"--f {opt.f}: this model's VAE downsamples by {vae_f}")
        if opt.C != channels:
            raise ConfigError(f"--C {opt.C}: this model's latents have {channels} channels")
        for flag in ("H", "W"):
            value = getattr(opt, flag)
            if value < factor or value % factor:
                raise ConfigError(f"--{flag} {value}: must be a positive multiple of {factor} for this model (the "
                                  f"VAE's and the UNet's downsampling together), e.g. "
                                  f"{max(factor, value // factor * factor)}")
    for flag in ("n_samples", "n_iter"):
        if getattr(opt, flag) < 1:
            raise ConfigError(f"--{flag} {getattr(opt, flag)}: must be at least 1")
    if opt.n_rows < 0:
        raise ConfigError(f"--n_rows {opt.n_rows}: must be 0 (one row per batch) or more")
    if not 1 <= opt.ddim_steps <= timesteps:
        raise ConfigError(f"--ddim_steps {opt.ddim_steps}: must be between 1 and {timesteps} (the schedule's length)")
    _finite("--scale", opt.scale)
    _finite("--ddim_eta", opt.ddim_eta)
    name = sampler_name(opt)
    if not 0 <= opt.ddim_eta <= 1:
        raise ConfigError(f"--ddim_eta {opt.ddim_eta}: must be in [0, 1] (above 1 DDIM's noise exceeds the "
                          f"remaining variance and every pixel becomes NaN)")
    if name != "ddim" and opt.ddim_eta != 0:
        raise ConfigError(f"--ddim_eta {opt.ddim_eta}: only DDIM takes eta (this run uses {name})")
    if not 0 <= opt.seed <= MAX_SEED:
        raise ConfigError(f"--seed {opt.seed}: must be between 0 and {MAX_SEED}")
    if not Path(opt.ckpt).exists():
        raise ConfigError(f"--ckpt {opt.ckpt}: file not found")
    if opt.vae and not Path(opt.vae).is_file():
        raise ConfigError(f"--vae {opt.vae}: file not found")
    if opt.lora:
        from ldm.weights.lora import parse_lora_spec
        try:
            path = parse_lora_spec(opt.lora)[0]
        except ValueError as e:
            raise ConfigError(f"--lora {e}") from None
        if not Path(path).is_file():
            raise ConfigError(f"--lora {path}: file not found")
    pick_device(opt.device)
    if opt.from_file:
        prompts = read_prompts(opt.from_file)
        return [prompts[i:i + opt.n_samples] for i in range(0, len(prompts), opt.n_samples)]
    if not opt.prompt:
        raise ConfigError("--prompt is empty")
    return [opt.n_samples * [opt.prompt]]


def is_inpainting_config(config: DictConfig) -> bool:
    """The config builds an inpainting model: its UNet also reads the mask and masked image (``hybrid``)."""
    return OmegaConf.select(config, "model.params.conditioning_key") == "hybrid"


def check_strength(opt: argparse.Namespace) -> None:
    """``--strength`` of image-to-image and inpainting: finite, in [0, 1]; PLMS only at 1 (it cannot start
    part-way, nor could the original's)."""
    _finite("--strength", opt.strength)
    if not 0 <= opt.strength <= 1:
        raise ConfigError(f"--strength {opt.strength}: must be in [0, 1] (0 returns the image, 1 repaints it from "
                          f"pure noise)")
    if sampler_name(opt) == "plms" and opt.strength != 1:
        raise ConfigError(f"--strength {opt.strength}: PLMS cannot start part-way (nor could the original's); use "
                          f"--sampler ddim, euler or dpmpp_2m, or --strength 1")


def load_sampling_model(opt: argparse.Namespace, config: DictConfig, device: torch.device) -> Any:
    """The checkpoint's model on ``device``, with ``--lora`` applied; problems raise ``CheckpointError``."""
    from ldm.weights.checkpoint import CheckpointError
    from ldm.weights.load import load_model_from_config
    from ldm.weights.lora import load_lora, read_lora
    model = load_model_from_config(config, opt.ckpt, prefer_ema=not opt.no_ema, vae=opt.vae,
                                   components=getattr(opt, "components", None)).to(device)
    if opt.lora:
        path, strength, sd = read_lora(opt.lora)
        try:
            n = load_lora(model, sd, strength)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        print(f"Applied LoRA {path} ({n} modules, strength {strength})")
    return model


def guidance_conditioning(model: Any, prompts: list[str], negative_prompt: str, scale: float,
                          sizes: Any = None, guidance: Optional[float] = None) -> tuple[Any, Any]:
    """(conditional, unconditional) inputs for classifier-free guidance; no unconditional one at scale 1. A
    guidance-distilled network (FLUX.1 [dev]) gets ``guidance`` as an input in both."""
    uc = None
    if scale != 1.0:
        uc = model.get_unconditional_conditioning(len(prompts) * [negative_prompt], sizes)
        uc = model.with_guidance(uc, guidance) if guidance is not None else uc
    c = model.get_learned_conditioning(prompts, sizes)
    return (model.with_guidance(c, guidance) if guidance is not None else c), uc


def guidance_meta(opt: argparse.Namespace) -> dict[str, float]:
    """The distilled guidance for a PNG's metadata, when the model took one."""
    return {"guidance": opt.guidance} if getattr(opt, "guidance", None) is not None else {}


def precision_context(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "full":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a sampling script reports as one line (exit code 2)."""
    from ldm.data.image_loading import ImageError
    from ldm.files import DiskFullError, OutputError
    from ldm.sampling.samplers import NonFiniteSample
    from ldm.util import TargetNotAllowed
    from ldm.weights.checkpoint import CheckpointError
    return ConfigError, CheckpointError, ImageError, TargetNotAllowed, OutputError, DiskFullError, NonFiniteSample


def output_folder(outdir: str | Path) -> Path:
    """``--outdir``, with what killed earlier runs left in it removed (their partial PNGs, never a file another
    run is still writing)."""
    from ldm.files import clean_partial
    outpath = Path(outdir)
    for folder in (outpath, outpath / "samples"):
        for partial in clean_partial(folder):
            print(f"Removed {partial}: left by an interrupted run")
    return outpath


def report_samples(outpath: str | Path, count: int, seconds: float) -> None:
    """The sampling scripts' closing lines (the original txt2img's wording, with the count and time)."""
    print(f"Your samples are ready and waiting for you here: \n{outpath} \n{count} images in {seconds:.1f} s. \nEnjoy.")


def run_script(build_parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], Any],
               argv: Optional[Sequence[str]] = None) -> Any:
    """A sampling script's ``main``: parse ``argv``, call ``run(opt)``; bad input is one line and exit code 2."""
    parser = build_parser()
    opt = parser.parse_args(argv)
    try:
        return run(opt)
    except user_errors() as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
