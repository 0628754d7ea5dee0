"""One DreamBooth training run, from options to a finished run folder.

``main.py`` is only a command line over :func:`run`; a notebook or the web UI build a :class:`TrainOptions` and
call the same function. The order of the work is what keeps bad input cheap and results safe:

1. the configs are merged and every key and value is checked (``ldm.training.config.check_training_config``), the data
   folders are checked against each other, and the weights file is found, all before any model is loaded;
2. the model is built (on the meta device, filled from the checkpoint), class images are generated, and every
   training image is decoded and checked;
3. only then is the run folder created, exclusively (two runs started in the same second get two folders), and
   the Lightning ``Trainer`` runs. A resumed run (``-r``) continues from the newest complete checkpoint of its
   folder, from the weights in that checkpoint, and repeats the uninterrupted run's batches exactly.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from ldm.config import MAX_SEED, ConfigError, Range, apply_overrides, load_configs
from ldm.families import apply_part_settings
from ldm.sampling.cli import PART_SETTINGS, check_parts
from ldm.files import is_within
from ldm.training.config import apply_flags, check_training_config, full_base_prior

#: Set by rank 0 for the processes Lightning's DDP launcher starts, so that all ranks share one run folder.
RUN_FOLDER_ENV = "LDM_RUN_FOLDER"
#: The exit code of a run stopped by SIGTERM after saving (128 + SIGTERM, what a shell reports for a kill).
SIGTERM_EXIT = 143


@dataclass
class TrainOptions:
    """The settings of one run; the command line's flags have the same names (``python main.py --help``)."""
    base: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    name: str = ""
    resume: str = ""
    train: bool = True
    seed: int = 23
    postfix: str = ""
    logdir: str = "logs"
    scale_lr: bool = True
    actual_resume: Optional[str] = None
    data_root: Optional[str] = None
    reg_data_root: Optional[str] = None
    class_word: Optional[str | list[str]] = None
    token: Optional[str] = None
    num_class_images: Optional[int] = None
    max_steps: Optional[int] = None
    lora_rank: Optional[int] = None
    vae: Optional[str] = None
    ae: Optional[str] = None
    t5: Optional[str] = None
    clip: Optional[str] = None
    t5_tokenizer: Optional[str] = None
    concepts: Optional[str] = None
    gpus: Optional[str] = None
    allow_any_target: bool = False

    @classmethod
    def from_namespace(cls, namespace: Any, overrides: Sequence[str] = ()) -> "TrainOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(namespace).items() if k in known}, overrides=list(overrides))


@dataclass
class Plan:
    """What :func:`prepare` decided: the checked config and where the run's files go."""
    config: DictConfig
    now: str
    run_folder: Optional[Path]  # None until created (new runs); the existing folder when resuming
    resume_ckpt: Optional[Path]
    weights: Optional[Path]  # the file the model's weights come from (resume checkpoint or --actual_resume)


# ---- options -> checked config ---------------------------------------------------------------------------------

def prepare(options: TrainOptions) -> Plan:
    """Merge and check everything that can be checked without loading a model."""
    from ldm.util import allow_any_target
    allow_any_target(options.allow_any_target)
    Range(0, MAX_SEED, integer=True).check("--seed", options.seed)
    if options.name and options.resume:
        raise ConfigError("-n/--name and -r/--resume cannot both be given: a resumed run keeps its folder")
    if not options.train and not options.resume:
        raise ConfigError("nothing to do: add -t to train (sampling is scripts/stable_txt2img.py)")
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    base, run_folder, resume_ckpt = list(options.base), None, None
    if options.resume:
        run_folder, resume_ckpt = find_resume(options.resume)
        saved = sorted((run_folder / "configs").glob("*-project.yaml"))
        if not saved:
            raise ConfigError(f"--resume {options.resume}: no saved config in {run_folder / 'configs'}")
        base = [saved[-1]] + base
    elif not base:
        raise ConfigError("no config: pass --base configs/stable-diffusion/v1-finetune_unfrozen.yaml")
    else:
        check_run_name(options.name or Path(base[0]).stem, options.postfix)
    config = apply_overrides(apply_flags(load_configs(base), options), options.overrides)
    apply_part_settings(config, vars(options))
    base_copy = full_base_prior(config)
    if options.resume and base_copy:
        # A full fine-tune whose prior is a frozen copy of its base weights: the model is built from the base
        # files again (the copy is taken from them), and Lightning then restores the trained weights over it.
        if options.actual_resume:
            print("--actual_resume is ignored with -r: the run continues from its own checkpoint (its base file "
                  "stays the one it started from, the frozen copy for the prior)")
        if not Path(config.get("actual_resume") or "").is_file():
            raise ConfigError(f"-r {options.resume}: model.params.prior_preservation=base_model takes its prior from "
                              f"the base model the run started from, {config.get('actual_resume')}, which is missing")
    elif options.resume:
        if options.actual_resume:
            print("--actual_resume is ignored with -r: the run continues from its own checkpoint")
        # The weights (VAE and a family's other files included) are in the checkpoint: the original files are not
        # needed any more.
        config.pop("actual_resume", None)
        for key in ("model.params.vae_path", "model.params.component_paths"):
            if OmegaConf.select(config, key) is not None:
                OmegaConf.update(config, key, None)
    elif options.actual_resume:
        OmegaConf.update(config, "actual_resume", options.actual_resume, force_add=True)
    if options.concepts:
        OmegaConf.update(config, "data.params.concepts", read_concepts_file(options.concepts), force_add=True)
    check_training_config(config)
    check_subjects(config, options.concepts)
    check_data_folders(config)
    check_validation_models(config)
    weights = config.get("actual_resume") if base_copy else resume_ckpt or config.get("actual_resume")
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"--actual_resume {weights}: file not found")
    vae = OmegaConf.select(config, "model.params.vae_path")
    if vae is not None and not Path(vae).is_file():
        raise ConfigError(f"--vae {vae}: file not found")
    check_parts({**(OmegaConf.select(config, "model.params.component_paths") or {}),
                 **{k: getattr(options, k) for k in PART_SETTINGS}}, config)
    return Plan(config, now, run_folder, resume_ckpt, Path(weights) if weights else None)


def check_run_name(name: str, postfix: str) -> None:
    """A run name is one folder name: ``-n "x/../other_run"`` would write into another run's folder."""
    for flag, value in (("-n/--name", name), ("-f/--postfix", postfix)):
        if any(c in value for c in "/\\\0") or value in (".", ".."):
            raise ConfigError(f"{flag} {value!r}: must be a plain name (no '/', '\\\\' or '..'): runs live in "
                              f"--logdir/<date>_<name>")


def read_concepts_file(path: str) -> list:
    """``--concepts FILE``: a YAML list of subjects (data_root, token, class_word, reg_data_root,
    num_class_images); relative folders are taken relative to the file."""
    import yaml
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--concepts {path}: file not found")
    try:
        concepts = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--concepts {path}: not valid YAML: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(concepts, list) or not concepts or not all(isinstance(c, dict) for c in concepts):
        raise ConfigError(f"--concepts {path}: expected a list of subjects (mappings with data_root, token, "
                          f"class_word, ...)")
    for c in concepts:
        for key in ("data_root", "reg_data_root"):
            if c.get(key) is not None and not Path(str(c[key])).is_absolute():
                c[key] = str(file.parent / str(c[key]))
    return concepts


#: The subject settings, with the flags that set them for a single subject.
SUBJECT_FLAGS = {"data_root": "--data_root", "token": "--token", "class_word": "--class_word",
                 "reg_data_root": "--reg_data_root", "num_class_images": "--num_class_images"}


def check_subjects(config: DictConfig, concepts_file: Optional[str] = None) -> None:
    """Every subject's settings get the checks of the flags they replace, before any model is loaded: a photo folder
    that exists and holds images, a non-empty identifier and class, ``num_class_images`` a whole number >= 0, and a
    class folder that exists with images unless class images are to be generated into it. Each problem is one
    line naming the flag, or the concepts file and its entry (``--concepts c.yaml, entry 2 (zwx dog): ...``)."""
    from ldm.data.dreambooth import Concept
    params = config.data.get("params") or {}
    known = [f.name for f in fields(Concept)]
    if params.get("concepts"):
        source = f"--concepts {concepts_file}" if concepts_file else "data.params.concepts"
        checked = []
        for k, entry in enumerate(params.concepts):
            entry = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else entry
            if not isinstance(entry, dict):
                raise ConfigError(f"{source}, entry {k + 1}: expected a mapping of {', '.join(known)}, got {entry!r}")
            named = all(isinstance(entry.get(key), str) and entry[key] for key in ("token", "class_word"))
            label = f"{source}, entry {k + 1}" + (f" ({entry['token']} {entry['class_word']})" if named else "")
            unknown = sorted(set(entry) - set(known))
            if unknown:
                raise ConfigError(f"{label}: unknown keys {unknown} (known: {', '.join(known)})")
            checked.append(_check_subject(config, entry, {key: f"{label}: {key}" for key in known}))
        OmegaConf.update(config, "data.params.concepts", checked, merge=False)  # numbers given as text typed
    elif "data_root" in params:  # a DreamBooth run (pretraining data has other settings)
        _check_subject(config, {key: params.get(key) for key in ("data_root", "token", "class_word", "reg_data_root")},
                       SUBJECT_FLAGS)


def _check_subject(config: DictConfig, entry: dict, names: dict[str, str]) -> dict:
    """One subject of :func:`check_subjects`; ``names`` says how each setting is called in messages."""
    from ldm.data.image_loading import find_images
    for key in ("data_root", "token", "class_word"):
        value = entry.get(key)
        if value is None or value == "":
            raise ConfigError(f"missing {names[key]}" + (f" (or data.params.{key}=...)" if names is SUBJECT_FLAGS else ""))
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{names[key]} {value!r}: expected text")
    entry["num_class_images"] = Range(0, integer=True).check(names["num_class_images"],
                                                             entry.get("num_class_images", 0))
    find_images(entry["data_root"], names["data_root"], warn=False)
    reg = entry.get("reg_data_root")
    if reg is not None:
        if not isinstance(reg, str) or not reg.strip():
            raise ConfigError(f"{names['reg_data_root']} {reg!r}: expected a folder")
        if max(entry["num_class_images"], int(OmegaConf.select(config, "class_images.num", default=0) or 0)) == 0:
            find_images(reg, names["reg_data_root"], warn=False)  # nothing generates class images: they must be there
        elif Path(reg).exists() and not Path(reg).is_dir():
            raise ConfigError(f"{names['reg_data_root']} {reg}: not a folder")
    return entry


def run_concepts(config: DictConfig) -> list:
    """The run's subjects as ``Concept``s (the concepts list, or the single-subject settings); [] for data that
    is not DreamBooth's."""
    from ldm.data.dreambooth import make_concepts
    params = OmegaConf.to_container(config.data.get("params") or {}, resolve=True)
    if not params.get("concepts") and params.get("data_root") is None:
        return []
    try:
        return make_concepts(params.get("concepts"), params.get("data_root"), params.get("token"),
                             params.get("class_word"), params.get("reg_data_root"))
    except ValueError as e:
        raise ConfigError(f"data.params.concepts: {e}") from None


def check_data_folders(config: DictConfig) -> None:
    """The subjects' photos and the class images must be separate folders: generated class images written into
    a photo folder would be trained as the subject, and subject photos inside a class folder as the class."""
    concepts = run_concepts(config)
    for a in concepts:
        for b in concepts:
            if b.reg_data_root is None:
                continue
            data_root, reg = Path(str(a.data_root)), Path(str(b.reg_data_root))
            if is_within(reg, data_root) or is_within(data_root, reg):
                raise ConfigError(f"--reg_data_root {reg} and --data_root {data_root} overlap (one is inside the "
                                  f"other): keep the class images in a folder of their own")


def check_validation_models(config: DictConfig) -> None:
    """``lightning.validation.clip`` / ``.dino``: both or neither (then only the loss is validated), and each a
    folder with its model's files; or ``.judge``, the toy world's classifier file, instead of both. Checked with
    the config rather than at the first validation."""
    validation = config.lightning.get("validation") or {}
    judge = validation.get("judge")
    if judge and not Path(judge).is_file():
        raise ConfigError(f"lightning.validation.judge {judge}: file not found (the toy world's judge is "
                          f"assets/toy/classifier.safetensors)")
    given = {key: validation.get(key) for key in ("clip", "dino") if validation.get(key)}
    if judge and given:
        raise ConfigError("lightning.validation.judge scores the toy world instead of CLIP and DINO: set judge, or "
                          "clip and dino, not both")
    if len(given) == 1:
        (key, _), = given.items()
        other = "dino" if key == "clip" else "clip"
        raise ConfigError(f"lightning.validation.{key} is set but .{other} is not: the metrics need both model "
                          f"folders (or neither, to validate the loss only)")
    from ldm.eval.embedders import ModelFilesError, check_clip_folder, check_dino_folder
    for key, check in (("clip", check_clip_folder), ("dino", check_dino_folder)):
        if key in given:
            try:
                check(given[key])
            except ModelFilesError as e:
                raise ConfigError(f"lightning.validation.{key}: {e}") from None


# ---- resuming --------------------------------------------------------------------------------------------------

def checkpoint_state(path: Path) -> Optional[int]:
    """The global step of a complete Lightning training checkpoint (weights, optimizer and loop states), or None
    for a file that is partial, unreadable or holds weights only (exported or pruned files)."""
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a candidate
        return None
    if not isinstance(obj, dict) or not {"state_dict", "optimizer_states", "loops"} <= set(obj):
        return None
    step = obj.get("global_step")
    return step if isinstance(step, int) else None


def find_resume(resume: str) -> tuple[Path, Path]:
    """``(run folder, checkpoint)`` for ``-r``: a checkpoint file, or a run folder whose complete checkpoint with
    the highest global step wins (a stale ``last.ckpt`` loses to newer step files; partial files are skipped)."""
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"--resume {resume}: no such run folder or checkpoint")
    if path.is_file():
        if checkpoint_state(path) is None:
            raise ConfigError(f"--resume {resume}: not a complete training checkpoint (no optimizer/loop state)")
        return path.parent.parent, path
    candidates = []
    for ckpt in sorted((path / "checkpoints").glob("*.ckpt")):
        step = checkpoint_state(ckpt)
        if step is None:
            print(f"Skipping {ckpt}: not a complete training checkpoint")
        else:
            candidates.append((step, ckpt.stat().st_mtime, ckpt))
    if not candidates:
        raise ConfigError(f"--resume {resume}: no complete checkpoint in {path / 'checkpoints'}")
    step, _, ckpt = max(candidates)
    print(f"Resuming from {ckpt} (global step {step})")
    return path, ckpt


def create_run_folder(logdir: str | Path, name: str, now: str, postfix: str = "") -> Path:
    """``logdir/<now>_<name><postfix>``, created exclusively: when it exists already (another run started in
    the same second), ``_2``, ``_3``, ... are tried."""
    root = Path(logdir)
    root.mkdir(parents=True, exist_ok=True)
    stem = f"{now}_{name}{postfix}"
    for attempt in range(1, 1000):
        folder = root / (stem if attempt == 1 else f"{stem}_{attempt}")
        if folder.resolve().parent != root.resolve():
            raise ConfigError(f"-n/--name {name!r}: the run folder {folder} would lie outside --logdir {root}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise ConfigError(f"--logdir {root}: could not create a new run folder for {stem}")


# ---- building the parts ----------------------------------------------------------------------------------------

def trainer_devices(config: DictConfig, gpus: list[int]) -> dict[str, Any]:
    """accelerator/devices/strategy/precision from --gpus, unless the config sets them."""
    import torch
    cfg = dict(config.get("lightning", {}).get("trainer", {}) or {})
    out: dict[str, Any] = {}
    if "accelerator" not in cfg:
        if gpus and torch.cuda.is_available():
            out.update(accelerator="gpu", devices=gpus)
        else:
            if gpus:
                print(f"No GPU found: ignoring --gpus {','.join(map(str, gpus))} and training on the CPU")
            out.update(accelerator="cpu", devices=1)
    n_devices = len(gpus) if out.get("accelerator") == "gpu" else cfg.get("devices", out.get("devices", 1))
    n_devices = n_devices if isinstance(n_devices, int) else len(n_devices)
    if "strategy" not in cfg and n_devices > 1:
        out["strategy"] = "ddp"
    precision = cfg.get("precision", "auto")
    if precision == "auto":
        on_gpu = out.get("accelerator", cfg.get("accelerator")) in ("gpu", "cuda") and torch.cuda.is_available()
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true"
    out["precision"] = precision
    out["n_devices"] = n_devices
    check_lean_devices(config, {**out, "accelerator": out.get("accelerator", cfg.get("accelerator"))}, n_devices,
                       str(cfg.get("strategy", out.get("strategy", ""))))
    return out


def check_lean_devices(config: DictConfig, devices: dict[str, Any], n_devices: int, strategy: str) -> None:
    """What the lean-training switches need from this machine (ldm.training.config checks what the config alone decides):
    fused backward on one device, in a precision without GradScaler; DeepSpeed with a CUDA GPU and deepspeed."""
    import importlib.util

    import torch
    fused = OmegaConf.select(config, "model.params.optimizer_config.fused_backward", default=False)
    if fused and n_devices > 1:
        raise ConfigError(f"model.params.optimizer_config.fused_backward on {n_devices} devices: each weight would be "
                          f"updated before DDP has averaged its gradient across devices; train on one device")
    if fused and str(devices["precision"]) in ("16", "16-mixed"):
        raise ConfigError("model.params.optimizer_config.fused_backward: this GPU has no bf16, so precision auto is "
                          "16-mixed, whose GradScaler needs all gradients before any update; set "
                          "lightning.trainer.precision=32-true")
    if OmegaConf.select(config, "model.params.weights_dtype", default="fp32") == "bf16" \
            and str(devices["precision"]).startswith("16"):
        raise ConfigError("model.params.weights_dtype=bf16: this GPU has no bf16 arithmetic (precision auto is "
                          "16-mixed); use weights_dtype: fp32")
    frozen = OmegaConf.select(config, "model.params.frozen_dtype", default="fp32")
    if frozen != "fp32" and not str(devices["precision"]).startswith("bf16"):
        raise ConfigError(f"model.params.frozen_dtype={frozen}: the frozen weights are bf16 (fp8: dequantized to "
                          f"bf16) and need bf16 autocast, but precision is {devices['precision']}; set "
                          f"lightning.trainer.precision=bf16-mixed (it also runs on a CPU), or frozen_dtype: fp32")
    if strategy.startswith("deepspeed"):
        missing = []
        if not torch.cuda.is_available():
            missing.append("a CUDA GPU (this machine has none)")
        elif devices.get("accelerator") not in ("gpu", "cuda"):
            missing.append("a CUDA GPU (pass --gpus 0,)")
        if importlib.util.find_spec("deepspeed") is None:
            missing.append("the deepspeed package (pip install deepspeed)")
        if missing:
            raise ConfigError(f"lightning.trainer.strategy={strategy} needs {' and '.join(missing)}: DeepSpeed's "
                              f"ZeRO runs on CUDA GPUs only")


def parse_gpus(gpus: Optional[str]) -> list[int]:
    if gpus is None or gpus.strip(", ") == "":
        return []
    try:
        return [int(g) for g in gpus.split(",") if g.strip() != ""]
    except ValueError:
        raise ConfigError(f"--gpus {gpus!r}: expected ids like '0,' or '0,1'") from None


def build_model(config: DictConfig, weights: Optional[Path]) -> Any:
    """The model of ``config.model``, filled from ``weights`` (built on the meta device: no random init of a
    billion parameters that are overwritten anyway), or with random weights when there are none."""
    from ldm.util import instantiate_from_config
    from ldm.weights.load import load_model_from_config
    if weights is None:
        print("No --actual_resume: training starts from random weights (pretraining, or the tiny test models)")
        model = instantiate_from_config(config.model)
        if getattr(model, "vae_path", None):  # pretraining a diffusion model on a trained first stage
            from ldm.weights.vae import load_vae
            load_vae(model.first_stage_model, model.vae_path)
        return model
    return load_model_from_config(config, weights)


def class_image_jobs(config: DictConfig) -> dict[Path, tuple[str, int]]:
    """Class folder -> (class prompt, images wanted there): each subject's ``num_class_images`` (or, for one
    subject, ``class_images.num`` / ``--num_class_images``); subjects of one class in one folder share them."""
    from ldm.data.dreambooth import DEFAULT_CLASS_TEMPLATE
    params = config.data.params
    default = int(config.get("class_images", {}).get("num", 0) or 0)
    template = params.get("class_template", DEFAULT_CLASS_TEMPLATE)
    jobs: dict[Path, tuple[str, int]] = {}
    for concept in run_concepts(config):
        num = max(concept.num_class_images, default)
        if num <= 0:
            continue
        if concept.reg_data_root is None:
            raise ConfigError(f"class images for '{concept.token} {concept.class_word}' need a folder: "
                              f"--reg_data_root (or reg_data_root in the concepts file)")
        folder = Path(concept.reg_data_root).resolve()
        prompt = template.format(token=concept.token, class_word=concept.class_word)
        jobs[folder] = (prompt, max(num, jobs.get(folder, ("", 0))[1]))
    return jobs


def maybe_generate_class_images(config: DictConfig, model: Any, devices: dict[str, Any]) -> None:
    """Fill every class folder up to the number of images asked for with samples of its class prompt (rank 0)."""
    import torch

    from ldm.training.class_images import generate_class_images
    jobs = class_image_jobs(config)
    if not jobs or int(os.environ.get("LOCAL_RANK", 0)) != 0 or int(os.environ.get("NODE_RANK", 0)) != 0:
        return
    cfg = config.class_images
    device = torch.device(f"cuda:{devices['devices'][0]}" if devices.get("accelerator") == "gpu" else "cpu")
    model.to(device)
    with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        for folder, (prompt, num) in jobs.items():
            generate_class_images(model, folder, prompt, num, size=int(config.data.params.get("size", 512)),
                                  ddim_steps=int(cfg.get("ddim_steps", 50)), scale=float(cfg.get("scale", 7.5)),
                                  batch_size=int(cfg.get("batch_size", 4)), seed=int(cfg.get("seed", 0)))
    model.to("cpu")


def warn_about_identifiers(concepts: list) -> None:
    """The identifier warnings of ``check_identifier`` (a frequent word, several tokens) and, with several
    subjects, ``check_concepts`` (one identifier inside another), with CLIP's vocabulary; a shared identifier is an
    error."""
    from pytorch_lightning.utilities import rank_zero_warn

    from ldm.data.dreambooth import check_concepts, check_identifier
    from ldm.modules.encoders.tokenizer import CLIPTokenizer
    try:
        tokenizer = CLIPTokenizer()
    except FileNotFoundError:  # the text encoder reports the missing vocabulary itself
        tokenizer = None
    try:
        warnings_ = check_concepts(concepts, tokenizer)
    except ValueError as e:
        raise ConfigError(f"data.params.concepts: {e}") from None
    if tokenizer is not None:
        warnings_ = [w for c in concepts for w in check_identifier(c.token, tokenizer)] + warnings_
    for warning in warnings_:
        rank_zero_warn(warning)


def build_callbacks(config: DictConfig, run_folder: Path, now: str, resume: bool) -> tuple[list, list]:
    """Lightning callbacks (run folder, checkpoints, exports, caches, progress, the config's own) and loggers."""
    import pytorch_lightning as pl

    from ldm.training.callbacks import CacheFrozenInputs, ExportWeights, ReleaseFreedMemory, SaveOnInterrupt, SetupCallback
    from ldm.util import instantiate_from_config
    ckptdir = run_folder / "checkpoints"
    checkpoint_params = OmegaConf.to_container(config.lightning.get("modelcheckpoint", {}).get("params", {}) or {},
                                               resolve=True)
    every = int(checkpoint_params.get("every_n_train_steps", 0) or 0)
    export = config.lightning.get("export")
    export = OmegaConf.to_container(export, resolve=True) if export is not None else {}
    callbacks = [SetupCallback(str(run_folder), config, now, resume=resume), SaveOnInterrupt(str(ckptdir)),
                 ExportWeights(str(ckptdir), every_n_train_steps=every, **export), CacheFrozenInputs(),
                 pl.callbacks.ModelCheckpoint(dirpath=ckptdir, filename="{step:06d}", save_top_k=-1,
                                              **checkpoint_params),
                 pl.callbacks.TQDMProgressBar(refresh_rate=1)]
    if config.lightning.get("release_freed_memory", True):
        callbacks.append(ReleaseFreedMemory())
    for cb in (config.lightning.get("callbacks") or {}).values():
        callbacks.append(instantiate_from_config(OmegaConf.to_container(cb, resolve=True)))
    if config.lightning.get("validation"):
        from ldm.training.validation import ValidationMetrics
        callbacks.append(ValidationMetrics(**OmegaConf.to_container(config.lightning.validation, resolve=True)))
    loggers = [pl.loggers.TensorBoardLogger(save_dir=str(run_folder), name="", version="tensorboard"),
               # Lightning's CSV logger deletes an existing metrics file, so a resumed run writes a new one.
               pl.loggers.CSVLogger(save_dir=str(run_folder), name="",
                                    version=f"csv-resumed-{now}" if resume else "csv")]
    return callbacks, loggers


def check_resume(model: Any, ckpt: Path) -> None:
    """The model's :meth:`check_resumable` on the checkpoint ``-r`` continues from (memory-mapped: only what the
    check reads is paged in); its one-line refusal names the file."""
    import torch

    from ldm.weights.checkpoint import CheckpointError
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    try:
        model.check_resumable(checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"-r {ckpt}: {e}") from None


def scale_learning_rate(config: DictConfig, n_devices: int, scale_lr: bool, base_lr: Optional[float] = None,
                        what: str = "Learning rate") -> float:
    """``base_lr`` (default: ``model.base_learning_rate``) times devices x batch x accumulation with ``scale_lr``."""
    accumulate = int(config.lightning.get("trainer", {}).get("accumulate_grad_batches", 1))
    bs = int(config.data.params.get("batch_size", 1))
    base_lr = float(config.model.base_learning_rate if base_lr is None else base_lr)
    lr = base_lr * (n_devices * bs * accumulate if scale_lr else 1)
    print(f"{what} {lr:.2e}" + (
        f" = {n_devices} (devices) * {bs} (batch) * {accumulate} (accumulate) * {base_lr:.2e} (base)"
        if scale_lr else " (not scaled)"))
    return lr


def _run_folder_for(plan: Plan, options: TrainOptions) -> Path:
    if plan.run_folder is not None:
        return plan.run_folder
    inherited = os.environ.get(RUN_FOLDER_ENV)
    if inherited and int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return Path(inherited)  # a DDP worker: rank 0 created the folder
    folder = create_run_folder(options.logdir, options.name or Path(options.base[0]).stem, plan.now, options.postfix)
    os.environ[RUN_FOLDER_ENV] = str(folder)
    return folder


# ---- the run ---------------------------------------------------------------------------------------------------

def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (or a full disk): the command line prints them as one line."""
    from ldm.data.image_loading import ImageError
    from ldm.files import DiskFullError, OutputError
    from ldm.sampling.samplers import NonFiniteSample
    from ldm.util import TargetNotAllowed
    from ldm.weights.checkpoint import CheckpointError
    return ConfigError, CheckpointError, ImageError, TargetNotAllowed, OutputError, DiskFullError, NonFiniteSample


def run(options: TrainOptions) -> int:
    """Train as ``options`` say; returns the process exit code (0, or 143 after a SIGTERM that was saved)."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from ldm.training.callbacks import AtomicCheckpointIO
    from ldm.util import instantiate_from_config
    plan = prepare(options)
    config = plan.config
    # The frozen VAE (and a frozen text encoder) stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    # Fused backward's manual optimization: Lightning's checkpoints then hold the weights after the step, as they do
    # in automatic optimization, which is what a resumed run continues from.
    warnings.filterwarnings("ignore", message=".*manual optimization and every_n_train_steps.*")
    pl.seed_everything(options.seed, workers=True)
    devices = trainer_devices(config, parse_gpus(options.gpus))
    n_devices = devices.pop("n_devices")

    warn_about_identifiers(run_concepts(config))
    model = build_model(config, plan.weights)
    model.noise_seed = options.seed
    if getattr(model, "lora_settings", None):
        model.add_lora()
    maybe_generate_class_images(config, model, devices)
    data = instantiate_from_config(config.data)
    data.seed = options.seed
    data.setup("fit")  # decodes and checks every image now: a bad file stops the run before the first step
    model.learning_rate = scale_learning_rate(config, n_devices, options.scale_lr)
    if getattr(model, "text_encoder_lr", None) is not None:  # the same batch scaling as the network's rate
        model.text_learning_rate = scale_learning_rate(config, n_devices, options.scale_lr, model.text_encoder_lr,
                                                       "Text encoder learning rate")
    if plan.resume_ckpt is not None:  # refused here, before the Trainer writes anything into the run folder
        check_resume(model, plan.resume_ckpt)

    run_folder = _run_folder_for(plan, options)
    callbacks, loggers = build_callbacks(config, run_folder, plan.now, resume=plan.resume_ckpt is not None)
    trainer_cfg = OmegaConf.to_container(config.lightning.get("trainer", {}), resolve=True)
    trainer_cfg.update(devices)
    trainer_cfg.setdefault("max_epochs", -1)  # max_steps alone decides when training ends
    trainer = pl.Trainer(default_root_dir=str(run_folder), callbacks=callbacks, logger=loggers,
                         plugins=[AtomicCheckpointIO()], num_sanity_val_steps=0, limit_val_batches=0,
                         use_distributed_sampler=False,  # ResumableSampler splits the data between ranks itself
                         **trainer_cfg)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=str(plan.resume_ckpt) if plan.resume_ckpt else None,
                    weights_only=True)
    except SIGTERMException:
        print(f"Stopped by SIGTERM at step {trainer.global_step}; resume with: python main.py -r {run_folder}")
        return SIGTERM_EXIT
    except OSError as e:
        from ldm.files import DiskFullError, disk_full_message, is_disk_full
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise DiskFullError(e.errno, disk_full_message(e)) from None
        raise
    if trainer.is_global_zero:
        print(f"Done: {trainer.global_step} steps. Checkpoints in {run_folder / 'checkpoints'}")
    return 0
