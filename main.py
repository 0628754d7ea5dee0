#!/usr/bin/env python
"""DreamBooth fine-tuning of Stable Diffusion v1 (the command line of the original DreamBooth port).

    python main.py --base configs/stable-diffusion/v1-finetune_unfrozen.yaml -t --actual_resume sd-v1-4.ckpt \
        -n my_dog --gpus 0, --data_root ./training_images --reg_data_root ./regularization_images --class_word dog

Trailing ``key=value`` arguments override the config (``model.params.reg_weight=0.5``). A run writes
``logs/<date>_<name>/`` with configs/, checkpoints/ (step checkpoints and last.ckpt), images/, TensorBoard and
CSV metrics. ``python main.py -r logs/<run>`` continues an interrupted run.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ldm.config import ConfigError, apply_flags, apply_overrides, load_configs, require


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("Boolean value expected.")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--name", type=str, default="", help="run name: logs/<date>_<name>")
    p.add_argument("-r", "--resume", type=str, default="",
                   help="continue a run: its log folder or a checkpoint inside it (config and flags are restored)")
    p.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                   help="config files, merged left to right (later ones win); dotted overrides may follow")
    p.add_argument("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    p.add_argument("--no-test", type=str2bool, const=True, default=False, nargs="?",
                   help="skip testing after training (accepted for compatibility: DreamBooth has no test stage)")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    p.add_argument("-f", "--postfix", type=str, default="", help="appended to the run folder's name")
    p.add_argument("-l", "--logdir", type=str, default="logs", help="folder that holds the run folders")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="learning rate = base_learning_rate * devices * batch_size * accumulate_grad_batches")
    p.add_argument("--actual_resume", type=str, default=None,
                   help="Stable Diffusion v1 weights to start from (.ckpt or .safetensors)")
    p.add_argument("--data_root", type=str, default=None, help="folder with the subject's photos (5-30)")
    p.add_argument("--reg_data_root", type=str, default=None,
                   help="folder with class (regularization) images for the prior-preservation loss")
    p.add_argument("--class_word", type=str, nargs="+", default=None,
                   help="the subject's class, e.g. dog or 'stuffed animal'")
    p.add_argument("--token", type=str, default=None, help="the rare identifier that names the subject "
                   "(default from the config: sks)")
    p.add_argument("--num_class_images", type=int, default=None,
                   help="generate class images with the starting model until --reg_data_root holds this many")
    p.add_argument("--max_steps", type=int, default=None, help="stop after exactly this many optimizer steps")
    p.add_argument("--lora_rank", type=int, default=None,
                   help="train LoRA adapters of this rank on the frozen model instead of the whole UNet "
                        "(sets model.params.lora_config.rank; alpha, targets and the text encoder are config keys)")
    p.add_argument("--gpus", type=str, default=None,
                   help="GPU ids: '0,' is GPU 0, '0,1' two GPUs with DDP; without a GPU training runs on the CPU")
    return p


def parse_gpus(gpus: Optional[str]) -> list[int]:
    if gpus is None or gpus.strip(", ") == "":
        return []
    try:
        return [int(g) for g in gpus.split(",") if g.strip() != ""]
    except ValueError:
        raise ConfigError(f"--gpus {gpus!r}: expected ids like '0,' or '0,1'") from None


def find_resume(resume: str) -> tuple[Path, Path]:
    """``(run folder, checkpoint)`` for ``-r``: a run folder (newest of last.ckpt or step checkpoints) or a file."""
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"--resume {resume}: no such run folder or checkpoint")
    if path.is_file():
        return path.parent.parent, path
    candidates = sorted((path / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    last = path / "checkpoints" / "last.ckpt"
    if last.exists():
        return path, last
    if not candidates:
        raise ConfigError(f"--resume {resume}: no checkpoint in {path / 'checkpoints'}")
    return path, candidates[-1]


def trainer_devices(config, gpus: list[int]) -> dict:
    """accelerator/devices/strategy/precision from --gpus, unless the config sets them."""
    import torch
    cfg = dict(config.get("lightning", {}).get("trainer", {}) or {})
    out: dict = {}
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
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    opt, unknown = parser.parse_known_args(argv)
    try:
        return run(opt, unknown)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except Exception as e:  # noqa: BLE001 - bad-input errors from the data and checkpoint layers
        from ldm.checkpoint import CheckpointError
        from ldm.data.image_loading import ImageError
        if isinstance(e, (CheckpointError, ImageError)):
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        raise


def run(opt: argparse.Namespace, overrides: Sequence[str]) -> int:
    import warnings

    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from ldm.callbacks import AtomicCheckpointIO

    if opt.name and opt.resume:
        raise ConfigError("-n/--name and -r/--resume cannot both be given: a resumed run keeps its folder")
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    ckpt_to_resume = None
    base = list(opt.base)
    if opt.resume:
        logdir, ckpt_to_resume = find_resume(opt.resume)
        saved = sorted((logdir / "configs").glob("*-project.yaml"))
        if not saved:
            raise ConfigError(f"--resume {opt.resume}: no saved config in {logdir / 'configs'}")
        base = [saved[-1]] + base
        opt.train = True
    else:
        if not base:
            raise ConfigError("no config: pass --base configs/stable-diffusion/v1-finetune_unfrozen.yaml")
        name = opt.name or Path(base[0]).stem
        logdir = Path(opt.logdir) / f"{now}_{name}{opt.postfix}"
    config = apply_overrides(apply_flags(load_configs(base), opt), overrides)
    if opt.resume and opt.actual_resume:
        print("--actual_resume is ignored with -r: the run continues from its own checkpoint")
    if not opt.resume and opt.actual_resume:
        OmegaConf.update(config, "actual_resume", opt.actual_resume, force_add=True)
    if not opt.train:
        raise ConfigError("nothing to do: add -t to train (sampling is scripts/stable_txt2img.py)")

    require(config, "data.params.data_root", "--data_root")
    class_word = require(config, "data.params.class_word", "--class_word")
    token = require(config, "data.params.token", "--token")
    # The frozen VAE (and a frozen text encoder) stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    pl.seed_everything(opt.seed, workers=True)
    gpus = parse_gpus(opt.gpus)
    devices = trainer_devices(config, gpus)
    n_devices = devices.pop("n_devices")

    model = build_model(config)
    if model.lora_settings:
        model.add_lora()
    maybe_generate_class_images(config, model, devices)

    data = instantiate(config.data)
    data.setup("fit")  # decodes and checks every image now: a bad file stops the run before the first step

    trainer_cfg = OmegaConf.to_container(config.lightning.get("trainer", {}), resolve=True)
    accumulate = int(trainer_cfg.get("accumulate_grad_batches", 1))
    bs = int(config.data.params.get("batch_size", 1))
    base_lr = float(config.model.base_learning_rate)
    model.learning_rate = base_lr * (n_devices * bs * accumulate if opt.scale_lr else 1)
    print(f"Learning rate {model.learning_rate:.2e}" + (
        f" = {n_devices} (devices) * {bs} (batch) * {accumulate} (accumulate) * {base_lr:.2e} (base)"
        if opt.scale_lr else " (not scaled)"))

    callbacks, loggers = build_callbacks(config, logdir, now, resume=bool(opt.resume), token=str(token),
                                         class_word=str(class_word))
    trainer_cfg.update(devices)
    trainer_cfg.setdefault("max_epochs", -1)  # max_steps alone decides when training ends
    trainer = pl.Trainer(default_root_dir=str(logdir), callbacks=callbacks, logger=loggers,
                         plugins=[AtomicCheckpointIO()], num_sanity_val_steps=0, limit_val_batches=0,
                         **trainer_cfg)
    trainer.fit(model, datamodule=data, ckpt_path=str(ckpt_to_resume) if ckpt_to_resume else None,
                weights_only=True)
    if trainer.is_global_zero:
        print(f"Done: {trainer.global_step} steps. Checkpoints in {logdir / 'checkpoints'}")
    return 0


def build_callbacks(config, logdir: Path, now: str, resume: bool, token: str, class_word: str) -> tuple[list, list]:
    """Lightning callbacks (run folder, checkpoints, exports, progress, the config's own) and the loggers."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from ldm.callbacks import ExportWeights, SaveOnInterrupt, SetupCallback
    ckptdir = logdir / "checkpoints"
    every = int(config.lightning.get("modelcheckpoint", {}).get("params", {}).get("every_n_train_steps", 0) or 0)
    export = config.lightning.get("export")
    export = OmegaConf.to_container(export, resolve=True) if export is not None else {}
    callbacks = [SetupCallback(str(logdir), config, now, resume=resume), SaveOnInterrupt(str(ckptdir)),
                 ExportWeights(str(ckptdir), every_n_train_steps=every, **export),
                 pl.callbacks.ModelCheckpoint(dirpath=ckptdir, filename="{step:06d}", save_top_k=-1,
                                              **config.lightning.get("modelcheckpoint", {}).get("params", {})),
                 pl.callbacks.TQDMProgressBar(refresh_rate=1)]
    for name, cb in (config.lightning.get("callbacks") or {}).items():
        params = OmegaConf.to_container(cb.get("params", {}), resolve=True)
        if "prompts" in params:
            params["prompts"] = [p.format(token=token, class_word=class_word) for p in params["prompts"]]
            params.setdefault("logdir", str(logdir))
        callbacks.append(instantiate({"target": cb.target, "params": params}))
    loggers = [pl.loggers.TensorBoardLogger(save_dir=str(logdir), name="", version="tensorboard"),
               # Lightning's CSV logger deletes an existing metrics file, so a resumed run writes a new one.
               pl.loggers.CSVLogger(save_dir=str(logdir), name="", version=f"csv-resumed-{now}" if resume else "csv")]
    return callbacks, loggers


def instantiate(cfg):
    from ldm.util import instantiate_from_config
    return instantiate_from_config(cfg)


def build_model(config):
    """The model of ``config.model``; with ``actual_resume``, built on the meta device and filled from the file
    (no random init of a billion parameters that are overwritten anyway)."""
    import torch
    from ldm.checkpoint import load_checkpoint
    weights = config.get("actual_resume")
    if weights is None:
        print("No --actual_resume: training starts from random weights (only sensible for the tiny demo model)")
        return instantiate(config.model)
    if not Path(weights).is_file():
        raise ConfigError(f"--actual_resume {weights}: file not found")
    with torch.device("meta"):
        model = instantiate(config.model)
    load_checkpoint(model, weights, assign=True)
    return model


def maybe_generate_class_images(config, model, devices: dict) -> None:
    import torch
    from ldm.class_images import generate_class_images
    from ldm.data.dreambooth import DEFAULT_CLASS_TEMPLATE
    num = int(config.get("class_images", {}).get("num", 0) or 0)
    reg = config.data.params.get("reg_data_root")
    if num <= 0 or int(os.environ.get("LOCAL_RANK", 0)) != 0 or int(os.environ.get("NODE_RANK", 0)) != 0:
        return
    if not reg:
        raise ConfigError("--num_class_images needs --reg_data_root: the folder the class images go to")
    params = config.data.params
    prompt = params.get("class_template", DEFAULT_CLASS_TEMPLATE).format(
        token=params.token, class_word=params.class_word)
    cfg = config.class_images
    device = torch.device(f"cuda:{devices['devices'][0]}" if devices.get("accelerator") == "gpu" else "cpu")
    model.to(device)
    with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        generate_class_images(model, reg, prompt, num, size=int(params.get("size", 512)),
                              ddim_steps=int(cfg.get("ddim_steps", 50)), scale=float(cfg.get("scale", 7.5)),
                              batch_size=int(cfg.get("batch_size", 4)), seed=int(cfg.get("seed", 0)))
    model.to("cpu")


if __name__ == "__main__":
    sys.exit(main())
