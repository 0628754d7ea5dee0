#!/usr/bin/env python
"""Score DreamBooth samples with the paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV; Ruiz et al. 2023, Sec. 4).

From a folder of generated images (layout below):

    python scripts/evaluate.py --samples samples/ --out eval/ \
        --clip models/eval/clip-vit-base-patch32 --dino models/eval/dino-vits16 --lpips models/eval/lpips

or from fine-tuned checkpoints, one per subject, generating the paper's 4 images per prompt first (into
--samples, default OUT/samples):

    python scripts/evaluate.py --ckpt_pattern 'runs/{subject}/last.ckpt' --out eval/ \
        --config configs/stable-diffusion/v1-inference.yaml
    python scripts/evaluate.py --ckpt dog.ckpt --subjects dog --out eval/

Samples layout: SAMPLES/<subject>/<NN>/<k>.png is image k of prompt NN (00..24, the order of the dataset's
prompts_and_classes.txt), SAMPLES/<subject>/class_prior/<k>.png an image of "a [class noun]" (for PRES).
Every image in those folders is scored. Writes OUT/metrics.json, OUT/metrics.md (next to the paper's numbers) and OUT/subjects/<subject>.json; run it
again and finished subjects are read back, existing images are kept.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "dreambooth"
DEFAULT_MODELS = REPO / "models" / "eval"


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--clip/--dino/--lpips, shared with scripts/reproduce_paper.py."""
    p.add_argument("--clip", default=str(DEFAULT_MODELS / "clip-vit-base-patch32"),
                   help="folder with openai/clip-vit-base-patch32 (CLIP-I, CLIP-T)")
    p.add_argument("--dino", default=str(DEFAULT_MODELS / "dino-vits16"),
                   help="folder with facebook/dino-vits16 (DINO, PRES)")
    p.add_argument("--lpips", default=str(DEFAULT_MODELS / "lpips"),
                   help="folder with torchvision's alexnet-owt-7be5be79.pth (+ LPIPS' alex.pth) (DIV)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """How evaluation images are generated (the paper's defaults), shared with scripts/reproduce_paper.py."""
    p.add_argument("--images_per_prompt", type=int, default=4, help="images per prompt (paper: 4)")
    p.add_argument("--prompts", type=int, default=None, help="use only the first N of the 25 prompts (quick runs)")
    p.add_argument("--prior_images", type=int, default=25, help="'a [class noun]' images per subject, for PRES")
    p.add_argument("--ddim_steps", type=int, default=50, help="DDIM steps (eta 0)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="prompt NN uses seed + NN; class-prior images seed + 1000")
    p.add_argument("--size", type=int, default=512, help="image side (generated, and the real photos' crop)")
    p.add_argument("--batch_size", type=int, default=4, help="images per sampler batch")


def sampling_settings(opt: argparse.Namespace) -> Any:
    from ldm.eval.run import SamplingSettings
    return SamplingSettings(images_per_prompt=opt.images_per_prompt, prompts=opt.prompts, ddim_steps=opt.ddim_steps,
                            scale=opt.scale, seed=opt.seed, size=opt.size, prior_images=opt.prior_images,
                            batch_size=opt.batch_size)


def select_subjects(root: str, names: Optional[str]) -> list:
    """The dataset's subjects, or the comma-separated ``names`` among them (unknown names are a DatasetError)."""
    from ldm.eval.dataset import DatasetError, subjects
    every = subjects(root)
    if not names:
        return every
    by_name = {s.name: s for s in every}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise DatasetError(f"--subjects: unknown subject(s) {', '.join(unknown)}; the dataset has {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", default=None, help="samples folder (read; with --ckpt/--ckpt_pattern also written)")
    p.add_argument("--ckpt", default=None, help="fine-tuned checkpoint of the one subject given with --subjects")
    p.add_argument("--ckpt_pattern", default=None, help="checkpoint per subject, e.g. 'runs/{subject}/last.ckpt'")
    p.add_argument("--config", default=str(REPO / "configs/stable-diffusion/v1-inference.yaml"),
                   help="model config of the checkpoints")
    p.add_argument("--dataset", default=str(DEFAULT_DATASET), help="the DreamBooth dataset (google/dreambooth)")
    p.add_argument("--subjects", default=None, help="comma-separated subject names (default: all 30)")
    p.add_argument("--token", default="sks", help="the identifier the models were fine-tuned with")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--device", default=None, help="cuda, cpu... (default: cuda if available)")
    add_model_flags(p)
    add_sampling_flags(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the script; returns ``{subject: record}`` as written to OUT/metrics.json."""
    import torch

    from ldm.data.image_loading import ImageError
    from ldm.eval.dataset import DatasetError
    from ldm.eval.embedders import ModelFilesError
    from ldm.eval.run import EvalError
    from ldm.weights.checkpoint import CheckpointError

    parser = build_parser()
    opt = parser.parse_args(argv)
    generating = bool(opt.ckpt or opt.ckpt_pattern)
    if opt.ckpt and opt.ckpt_pattern:
        parser.error("give --ckpt (one subject) or --ckpt_pattern (one per subject), not both")
    if not generating and not opt.samples:
        parser.error("nothing to score: give --samples DIR, or --ckpt/--ckpt_pattern to generate samples first")
    if opt.ckpt_pattern and "{subject}" not in opt.ckpt_pattern:
        parser.error(f"--ckpt_pattern {opt.ckpt_pattern!r} must contain {{subject}}")
    from ldm.files import is_within
    if opt.samples and is_within(opt.out, opt.samples) and not generating:
        parser.exit(2, f"{parser.prog}: error: --out {opt.out}: lies in --samples {opt.samples}, which is read: "
                       f"write results elsewhere\n")
    if is_within(opt.out, opt.dataset):
        parser.exit(2, f"{parser.prog}: error: --out {opt.out}: lies in the dataset folder {opt.dataset}: write "
                       f"results elsewhere\n")
    device = torch.device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        chosen = select_subjects(opt.dataset, opt.subjects)
        if opt.ckpt and len(chosen) != 1:
            parser.error("--ckpt scores one subject: pass --subjects NAME (or use --ckpt_pattern)")
        return evaluate(opt, chosen, device)
    except (ModelFilesError, CheckpointError, DatasetError, ImageError, EvalError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def evaluate(opt: argparse.Namespace, chosen: list, device: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from ldm.eval.run import Embedders, evaluate_subjects, generate_from_checkpoint, unscored, write_results

    out = Path(opt.out)
    samples = Path(opt.samples) if opt.samples else out / "samples"
    settings = sampling_settings(opt)
    generating = bool(opt.ckpt or opt.ckpt_pattern)
    embedders = Embedders(opt.clip, opt.dino, opt.lpips, device)
    if unscored(chosen, samples, out, opt.token, embedders, opt.size):
        # Model files are checked before any image is drawn: a missing file should cost seconds, not hours
        # (and a rerun whose subjects are all scored loads no model at all).
        embedders.load()
    if generating:
        config = OmegaConf.load(opt.config)
        for subject in chosen:
            ckpt = opt.ckpt or opt.ckpt_pattern.format(subject=subject.name)
            generate_from_checkpoint(config, ckpt, subject, samples / subject.name, opt.token, settings, device)
    results = evaluate_subjects(chosen, samples, out, opt.token, embedders, real_size=opt.size)
    write_results(results, out / "metrics.json", out / "metrics.md", settings if generating else None,
                  notes=[f"Samples: {samples}; identifier '{opt.token}'."])
    print((out / "metrics.md").read_text(encoding="utf-8"))
    return results


if __name__ == "__main__":
    main()
