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
import os
import sys
from typing import Optional, Sequence

from ldm.util import TRAINING_ENVIRONMENT

for _key, _value in TRAINING_ENVIRONMENT.items():  # read at torch's first allocation: set before importing torch
    os.environ.setdefault(_key, _value)


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
                   help="Stable Diffusion weights to start from (.ckpt or .safetensors; SD v1 or SDXL, as --base)")
    p.add_argument("--vae", type=str, default=None,
                   help="a separate VAE file to use instead of the checkpoint's own (original or diffusers layout, "
                        "e.g. sdxl-vae-fp16-fix); sets model.params.vae_path")
    flux = p.add_argument_group("FLUX.1 (released as separate files; --actual_resume is the transformer)")
    flux.add_argument("--ae", type=str, default=None, help="the autoencoder, ae.safetensors")
    flux.add_argument("--t5", type=str, default=None, help="the T5 v1.1 XXL text encoder (transformers' layout)")
    flux.add_argument("--clip", type=str, default=None, help="the CLIP ViT-L text model (transformers' layout)")
    flux.add_argument("--t5_tokenizer", type=str, default=None, help="T5's SentencePiece model, spiece.model")
    p.add_argument("--data_root", type=str, default=None, help="folder with the subject's photos (5-30)")
    p.add_argument("--reg_data_root", type=str, default=None,
                   help="folder with class (regularization) images for the prior-preservation loss")
    p.add_argument("--class_word", type=str, nargs="+", default=None,
                   help="the subject's class, e.g. dog or 'stuffed animal'")
    p.add_argument("--token", type=str, default=None, help="the rare identifier that names the subject "
                   "(default from the config: sks)")
    p.add_argument("--concepts", type=str, default=None, metavar="concepts.yaml",
                   help="several subjects in one run: a YAML list of {data_root, token, class_word, reg_data_root, "
                        "num_class_images} (sets data.params.concepts; instead of --data_root/--token/--class_word)")
    p.add_argument("--num_class_images", type=int, default=None,
                   help="generate class images with the starting model until --reg_data_root holds this many")
    p.add_argument("--max_steps", type=int, default=None, help="stop after exactly this many optimizer steps")
    p.add_argument("--lora_rank", type=int, default=None,
                   help="train LoRA adapters of this rank on the frozen model instead of the whole UNet "
                        "(sets model.params.lora_config.rank; alpha, targets and the text encoder are config keys)")
    p.add_argument("--gpus", type=str, default=None,
                   help="GPU ids: '0,' is GPU 0, '0,1' two GPUs with DDP; without a GPU training runs on the CPU")
    p.add_argument("--allow_any_target", action="store_true",
                   help="let the config's target: strings import any module (by default only ldm, torch and "
                        "Lightning): only for configs you trust")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the command line and run the training module; bad input ends with one line and exit code 2."""
    parser = get_parser()
    opt, overrides = parser.parse_known_args(argv)
    if opt.class_word:  # --class_word takes several words ("stuffed animal"): overrides after it are not words
        overrides = [w for w in opt.class_word if "=" in w] + overrides
        opt.class_word = [w for w in opt.class_word if "=" not in w] or None
    from ldm.training.run import TrainOptions, run, user_errors
    try:
        return run(TrainOptions.from_namespace(opt, overrides))
    except user_errors() as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
