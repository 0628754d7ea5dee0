#!/usr/bin/env python
"""Reproduce DreamBooth's Stable Diffusion results (Ruiz et al., CVPR 2023, Table 1) on its 30-subject dataset:
for each subject, fine-tune with prior preservation, generate 4 images for each of its 25 prompts, score them
(DINO, CLIP-I, CLIP-T, PRES, DIV); then print and write the table next to the paper's numbers.

    python scripts/reproduce_paper.py --actual_resume sd-v1-4.ckpt --workdir repro \
        --clip models/eval/clip-vit-base-patch32 --dino models/eval/dino-vits16 --lpips models/eval/lpips

Trailing ``key=value`` arguments go to main.py as config overrides (``model.params.reg_weight=0`` trains
without prior preservation). The work folder:

    class_images/<class>/        class images, generated once per class by the starting model, shared
    runs/<subject>/              main.py's run folder(s); trained.json once training finished; the checkpoints
                                 are deleted once the subject is scored, unless --keep_checkpoints
    samples/<subject>/...        evaluation images (layout: ldm/eval/run.py)
    eval/subjects/<subject>.json the subject's scores
    results.json, results.md, results.png   the summary, the table, a bar chart against the paper

Run it again after an interruption: scored subjects are skipped, a trained subject is not retrained, an
interrupted training run continues from its last.ckpt, existing images are kept.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = [str(REPO / "configs/stable-diffusion/v1-finetune_unfrozen.yaml"),
                str(REPO / "configs/dreambooth/paper-sd.yaml")]
CHART_METRICS = ("DINO", "CLIP-I", "CLIP-T")


def _evaluate_script() -> Any:
    # The flags and subject selection of scripts/evaluate.py, so the two scripts cannot drift apart.
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser(ev: Any) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="reproduce", help="where everything is written (see above)")
    p.add_argument("--base", nargs="+", default=DEFAULT_BASE, help="training configs, merged left to right "
                   "(default: v1-finetune_unfrozen.yaml + dreambooth/paper-sd.yaml)")
    p.add_argument("--actual_resume", required=True, help="the Stable Diffusion v1 weights every subject starts from")
    p.add_argument("--max_steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--num_class_images", type=int, default=None, help="class images per class (default: the config's)")
    p.add_argument("--gpus", default=None, help="main.py's --gpus (default: '0,' when CUDA is available)")
    p.add_argument("--dataset", default=str(ev.DEFAULT_DATASET), help="the DreamBooth dataset (google/dreambooth)")
    p.add_argument("--subjects", default=None, help="comma-separated subject names (default: all 30)")
    p.add_argument("--token", default="sks", help="the identifier [V]")
    p.add_argument("--keep_checkpoints", action="store_true",
                   help="keep each subject's checkpoints after it is scored (Stable Diffusion: ~11 GB each)")
    p.add_argument("--device", default=None, help="for generation and scoring (default: cuda if available)")
    ev.add_model_flags(p)
    ev.add_sampling_flags(p)
    return p


# ---- training (main.py in a subprocess: all of its memory is returned when it exits) -------------------------

def newest_run(logdir: Path) -> Optional[Path]:
    runs = sorted((d for d in logdir.glob("*") if (d / "configs").is_dir()), key=lambda d: d.name)
    return runs[-1] if runs else None


def train_subject(opt: argparse.Namespace, subject: Any, overrides: Sequence[str]) -> tuple[Path, Path]:
    """``(last.ckpt, its run config)`` of the subject's finished training run, training (or continuing an
    interrupted run) first if needed. Finished runs are recorded in ``runs/<subject>/trained.json``."""
    logdir = Path(opt.workdir) / "runs" / subject.name
    marker = logdir / "trained.json"
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if Path(done["ckpt"]).is_file():
            return Path(done["ckpt"]), Path(done["config"])
        marker.unlink()  # checkpoint deleted after scoring, and images are needed again: train anew
    flags = ["-t", "--scale_lr", "false"]  # the paper's rate as given, whatever the number of GPUs
    flags += ["--max_steps", str(opt.max_steps)] if opt.max_steps is not None else []
    flags += ["--gpus", opt.gpus] if opt.gpus else []
    run = newest_run(logdir)
    if run is not None and (run / "checkpoints" / "last.ckpt").is_file():
        print(f"{subject.name}: continuing the interrupted run {run}")
        cmd = ["-r", str(run), *flags]
    else:
        class_dir = Path(opt.workdir) / "class_images" / subject.class_word.replace(" ", "_")
        cmd = ["--base", *opt.base, *flags, "--actual_resume", opt.actual_resume, "-n", subject.name,
               "--logdir", str(logdir), "--data_root", str(subject.images[0].parent.resolve()), "--reg_data_root",
               str(class_dir), "--class_word", subject.class_word, "--token", opt.token]
        cmd += ["--num_class_images", str(opt.num_class_images)] if opt.num_class_images is not None else []
    cmd = [sys.executable, str(REPO / "main.py"), *cmd, *overrides]
    print("$ " + " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=REPO, env=dict(os.environ)).returncode
    run = newest_run(logdir)
    if code != 0 or run is None or not (run / "checkpoints" / "last.ckpt").is_file():
        raise SystemExit(f"training {subject.name} failed (exit code {code}); run this command again to continue")
    config = sorted((run / "configs").glob("*-project.yaml"))[-1]
    record = {"run": str(run), "ckpt": str(run / "checkpoints" / "last.ckpt"), "config": str(config)}
    marker.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return Path(record["ckpt"]), config


def remove_checkpoints(opt: argparse.Namespace, subject: Any) -> None:
    for path in (Path(opt.workdir) / "runs" / subject.name).glob("*/checkpoints/*"):
        if path.suffix in (".ckpt", ".safetensors"):
            path.unlink()


# ---- the protocol -------------------------------------------------------------------------------------------

def reproduce(opt: argparse.Namespace, chosen: list, overrides: Sequence[str], ev: Any) -> dict[str, Any]:
    import torch
    from omegaconf import OmegaConf

    from ldm.eval.run import (Embedders, count_missing, evaluate_subjects, generate_from_checkpoint, summarize,
                              unscored, write_results)
    from ldm.weights.checkpoint import CheckpointError

    work = Path(opt.workdir)
    settings = ev.sampling_settings(opt)
    device = torch.device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    embedders = Embedders(opt.clip, opt.dino, opt.lpips, device)
    todo = unscored(chosen, work / "samples", work / "eval", opt.token, embedders, settings.size)
    if todo:
        # Every input is checked before the first of many hours of training.
        if not Path(opt.actual_resume).is_file():
            raise CheckpointError(f"--actual_resume {opt.actual_resume}: file not found")
        embedders.load()
    for i, subject in enumerate(todo):
        print(f"\n=== {subject.name} ({subject.class_word}): subject {i + 1} of {len(todo)} left ===", flush=True)
        samples = work / "samples" / subject.name
        if count_missing(subject, samples, opt.token, settings):
            ckpt, config = train_subject(opt, subject, overrides)
            generate_from_checkpoint(OmegaConf.load(config), ckpt, subject, samples, opt.token, settings, device)
        evaluate_subjects([subject], work / "samples", work / "eval", opt.token, embedders, settings.size)
        if not opt.keep_checkpoints:
            remove_checkpoints(opt, subject)
    results = evaluate_subjects(chosen, work / "samples", work / "eval", opt.token, embedders, settings.size)
    recipe = {"base": opt.base, "actual_resume": opt.actual_resume, "max_steps": opt.max_steps,
              "num_class_images": opt.num_class_images, "overrides": list(overrides), "token": opt.token}
    notes = [f"Recipe: {' + '.join(Path(b).name for b in opt.base)}"
             + (f", {' '.join(overrides)}" if overrides else "")
             + (f", max_steps {opt.max_steps}" if opt.max_steps is not None else "")
             + f"; {settings.images_per_prompt} images x {settings.prompts or 25} prompts per subject, DDIM "
             f"{settings.ddim_steps} steps, scale {settings.scale}, seeds {settings.seed}+prompt index."]
    write_results(results, work / "results.json", work / "results.md",
                  {"sampling": asdict(settings), "recipe": recipe}, notes=notes)
    draw_chart(summarize(results), work / "results.png")
    print("\n" + (work / "results.md").read_text(encoding="utf-8"))
    return results


def draw_chart(mean: dict[str, Any], path: Path, size: tuple[int, int] = (760, 440)) -> Path:
    """Grouped bars, ours against the paper's Stable Diffusion row and real images (Table 1), per metric,
    drawn with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw, ImageFont

    from ldm.eval.run import PAPER_ROWS

    series = [("ours", (46, 110, 200), mean), ("paper: DreamBooth SD", (235, 140, 40), PAPER_ROWS[0][1]),
              ("paper: real images", (150, 150, 150), PAPER_ROWS[1][1])]
    width, height = size
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=14)
    left, right, top, bottom = 60, width - 20, 80, height - 50
    draw.text((left, 15), "DreamBooth on Stable Diffusion: ours vs. Ruiz et al. 2023, Table 1", fill="black", font=font)
    for tick in range(6):  # y axis 0..1 with a grid line every 0.2
        y = bottom - (bottom - top) * tick / 5
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((left - 35, y - 8), f"{tick / 5:.1f}", fill="black", font=font)
    group = (right - left) / len(CHART_METRICS)
    bar = group / (len(series) + 1.5)
    for g, metric in enumerate(CHART_METRICS):
        x0 = left + g * group + bar * 0.75
        for s, (_, color, values) in enumerate(series):
            value = values.get(metric)
            if value is None:
                continue
            x, y = x0 + s * bar, bottom - (bottom - top) * max(0.0, min(1.0, float(value)))
            draw.rectangle([x, y, x + bar - 4, bottom], fill=color)
            draw.text((x, y - 17), f"{value:.3f}", fill="black", font=font)
        draw.text((left + g * group + group / 2 - 20, bottom + 8), metric, fill="black", font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    x = left
    for label, color, _ in series:  # legend, one row under the title
        draw.rectangle([x, 38, x + 12, 50], fill=color)
        draw.text((x + 17, 36), label, fill="black", font=font)
        x += 17 + draw.textlength(label, font=font) + 30
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the protocol; returns ``{subject: record}`` as in results.json."""
    import torch

    from ldm.data.image_loading import ImageError
    from ldm.eval.dataset import DatasetError
    from ldm.eval.embedders import ModelFilesError
    from ldm.eval.run import EvalError
    from ldm.weights.checkpoint import CheckpointError

    ev = _evaluate_script()
    parser = build_parser(ev)
    opt, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if opt.gpus is None and torch.cuda.is_available():
        opt.gpus = "0,"
    # main.py runs with the repository as its working directory: hand it absolute paths only.
    opt.workdir = str(Path(opt.workdir).resolve())
    opt.base = [str(Path(b).resolve()) for b in opt.base]
    opt.actual_resume = str(Path(opt.actual_resume).resolve())
    try:
        return reproduce(opt, ev.select_subjects(opt.dataset, opt.subjects), overrides, ev)
    except (ModelFilesError, CheckpointError, DatasetError, ImageError, EvalError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
