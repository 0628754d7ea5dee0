#!/usr/bin/env python
"""DreamBooth you can see on any laptop: the shipped toy model learns the demo robot and draws it where robots
never were, on a CPU, in under three minutes (2 cores, two threads: 149-164 s per run on 2026-12-07: README), with
nothing to download.

    python scripts/demo.py                         # six photos of the subject, the base model's prediction as prior
    python scripts/demo.py --prior class_images    # prior preservation with class images (the paper's recipe)
    python scripts/demo.py --no-prior              # without any: watch "photo of a robot" turn into the subject
    python scripts/demo.py --data_root assets/demo/subject --prior class_images   # studio drawings instead

1. the subject's photos (``assets/demo/in-world``): a robot design the toy world does not contain, photographed in
   six places where the world has robots (beach, grass, city at night), each with its loss mask and a caption naming
   the place (``python scripts/make_demo_assets.py`` draws them);
2. fine-tune the toy model (``configs/toy/dreambooth.yaml``, through main.py: 350 steps, the loss masked to the
   robot, EMA) with prior preservation from a frozen copy of the toy model, which answers "photo of a robot" at
   every step (``--prior class_images``: the toy model first draws 64 class images, the paper's prior set);
3. measure with the toy classifier (``ldm/eval/toy_model.py``, DDIM 25 at guidance 3): subject fidelity and prompt
   fidelity on "photo of a sks robot" on the moon, in the snow and on mars (no robot is ever there in the world), and
   prior drift on "photo of a robot", before and after, and the colour drift of "photo of a robot" from the base
   model;
4. one figure, ``OUTDIR/dreambooth.png``: the training photos, the subject in the three held-out places, and the
   class prompt before and after fine-tuning; the numbers also in ``OUTDIR/scores.json``.

``--validate_every 100 --max_steps 1000``: the measured checkpoint choice on the toy world. The fine-tune validates
with the toy judge every 100 steps (``configs/toy/validation.yaml``: the subject on the moon, in the snow and on
mars, and the bare class), writes ``metrics.md`` / ``metrics.png`` and ``best.ckpt`` in its run folder, and the demo
then scores best.ckpt and last.ckpt on the same held-out places with pictures the choice never saw (another seed,
16 per place): the ``best_vs_last`` entry of ``scores.json``.

``--family v1`` / ``--family sdxl`` run the same pipeline on the randomly initialised SD-v1- and SDXL-shaped toy
configs instead (plumbing only: their pictures are noise).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SUBJECT = REPO / "assets" / "demo" / "in-world"
#: --family -> (fine-tuning config, inference config) of the random-weight plumbing demos.
PLUMBING = {"v1": ("tiny-finetune.yaml", "tiny-inference.yaml"),
            "sdxl": ("tiny-sdxl-finetune.yaml", "tiny-sdxl-inference.yaml")}
CELL = 128  # figure cell: the 64 px pictures at twice their size
#: --prior: where the prior-preservation target comes from (model.params.prior_preservation), or no prior term.
PRIORS = ("class_images", "base_model", "none")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", default="outputs/demo", help="where the run, class images, samples and figure go")
    p.add_argument("--max_steps", type=int, default=None, help="fine-tuning steps (default: the config's)")
    p.add_argument("--num_class_images", type=int, default=64, help="class images the toy model draws first")
    p.add_argument("--prior", choices=PRIORS, default="base_model",
                   help="what keeps the class: the base model's own prediction for 'photo of a robot' at every step "
                        "(default; no class images), class images the toy model draws first, or nothing")
    p.add_argument("--no-prior", dest="prior", action="store_const", const="none", help="the same as --prior none")
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tune and of the pictures")
    p.add_argument("--scale", type=float, default=None,
                   help="guidance scale of the pictures and the scores (default: the demo's 3.0, DDIM 25 steps)")
    p.add_argument("--data_root", type=Path, default=SUBJECT, metavar="DIR",
                   help="the subject's photos (default: the six shipped photos in world places; assets/demo/subject: "
                        "the same design drawn on studio backdrops)")
    p.add_argument("--validate_every", type=int, default=None, metavar="N",
                   help="validate with the toy judge every N steps, keep best.ckpt, and score it against last.ckpt "
                        "on places the choice never saw")
    p.add_argument("--family", choices=["toy", *PLUMBING], default="toy",
                   help="toy: the shipped pretrained toy model (default); v1 / sdxl: random-weight plumbing demos")
    opt = p.parse_args(argv)
    out = Path(opt.outdir).resolve()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads()))
    tic = time.time()
    if opt.family != "toy":
        return plumbing(opt, out, env, tic)
    from ldm.eval.toy_model import TOY_MODEL
    if not TOY_MODEL.is_file():
        p.exit(2, f"{p.prog}: error: {TOY_MODEL}: the toy model is missing; rebuild it with "
                  f"python scripts/train_toy_model.py\n")
    last = finetune(opt, out, env)
    scores = evaluate_and_draw(last, out, opt.seed, opt.data_root, opt.scale)
    if opt.validate_every:
        scores["best_vs_last"] = best_vs_last(last, opt.seed)
    scores["seconds"] = round(time.time() - tic)
    print(json.dumps(scores, indent=2))
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    print(f"\nDemo done in {time.time() - tic:.0f} s: figure {out / 'dreambooth.png'}, checkpoint {last}")
    return 0


def threads() -> int:
    """OMP_NUM_THREADS if set, else 2 where there are two cores: the toy model's steps are small, and on the
    2-core development machine two threads took the demo from 218 s to 138 s where more would wait on each other
    (OpenMP threads that wait on a busy core are very slow)."""
    return int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1))


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def finetune(opt: argparse.Namespace, out: Path, env: dict[str, str]) -> Path:
    """main.py on configs/toy/dreambooth.yaml from the shipped model; returns the run's last.ckpt."""
    from ldm.eval.toy_model import TOY_MODEL
    name = {"class_images": "demo", "base_model": "demo_base_prior", "none": "demo_no_prior"}[opt.prior]
    from ldm.eval.toy_model import TOY_CLASSIFIER
    configs = [str(REPO / "configs/toy/dreambooth.yaml")]
    if opt.validate_every:
        configs.append(str(REPO / "configs/toy/validation.yaml"))
    cmd = ["--base", *configs, "-t",
           "--actual_resume", str(TOY_MODEL), "-n", name, "--logdir", str(out / "logs"), "--seed", str(opt.seed),
           "--data_root", str(opt.data_root), "--class_word", "robot"]
    if opt.validate_every:
        cmd += [f"lightning.validation.every_n_steps={opt.validate_every}",
                f"lightning.validation.judge={TOY_CLASSIFIER}"]
    if opt.prior == "class_images":
        cmd += ["--reg_data_root", str(out / "class-images"), "--num_class_images", str(opt.num_class_images)]
    elif opt.prior == "base_model":
        cmd += ["model.params.prior_preservation=base_model"]
    if opt.max_steps:
        cmd += ["--max_steps", str(opt.max_steps)]
    # main.py in this process: the scoring after it then finds torch and Lightning imported (~8 s of a
    # 3-minute demo on the 2-core CPU are these imports).
    print("$ " + " ".join([sys.executable, str(REPO / "main.py"), *cmd]), flush=True)
    import torch

    import main as main_module
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if main_module.main(cmd) != 0:
        raise SystemExit(f"main.py {' '.join(cmd)}: the fine-tune failed")
    return max((out / "logs").glob(f"*_{name}/checkpoints/last.ckpt"), key=lambda q: q.stat().st_mtime)


def evaluate_and_draw(last: Path, out: Path, seed: int, photos: Path = SUBJECT, scale: Optional[float] = None
                      ) -> dict:
    """The three numbers before and after, and the figure, sampled at guidance ``scale`` (None: the demo's)."""
    import torch

    from ldm.data import toy_world as tw
    from ldm.eval.toy import load_classifier
    from ldm.eval.toy_model import DEMO_SAMPLING, SUBJECT_PLACES, TOY_CLASSIFIER, dreambooth_scores, load_toy_model
    torch.set_num_threads(threads())
    sampling = DEMO_SAMPLING if scale is None else (DEMO_SAMPLING[0], scale)
    classifier = load_classifier(TOY_CLASSIFIER)
    before, after = load_toy_model(), load_toy_model(last)
    drawn: dict[str, dict] = {"before": {}, "after": {}}  # the scored pictures, which the figure shows
    scores = {"before": dreambooth_scores(before, classifier, seed=seed, sampling=sampling,
                                          pictures=drawn["before"])}
    scores["after"] = dreambooth_scores(after, classifier, seed=seed, base=before, sampling=sampling,
                                        base_class_images=drawn["before"]["class"], pictures=drawn["after"])
    per_place = len(drawn["after"]["subject"]) // len(SUBJECT_PLACES)
    rows = {"training photos": None,
            **{f"sks robot {tw.PLACES[b]}": drawn["after"]["subject"][i * per_place:i * per_place + 6]
               for i, b in enumerate(SUBJECT_PLACES)},  # the scored places: no robot is ever there in the world
            "\"a robot\" before": drawn["before"]["class"][:6],
            "\"a robot\" after": drawn["after"]["class"][:6]}
    if sampling != DEMO_SAMPLING:
        scores["guidance_scale"] = sampling[1]
    draw_figure(rows, out / "dreambooth.png", scores, photos)
    return scores


def best_vs_last(last: Path, seed: int, per_place: int = 16) -> dict:
    """Subject fidelity and prompt fidelity on the held-out places (the moon, the snow, mars: no training photo was
    taken there) and prior drift, of best.ckpt (the step the validation chose, from validation.json) and of
    last.ckpt, on pictures the choice never saw: another seed than the validation's, twice as many per place."""
    import torch

    from ldm.data import toy_world as tw
    from ldm.eval.toy import load_classifier, prior_drift
    from ldm.eval.toy import scores as judge_scores
    from ldm.eval.toy_model import SUBJECT_PLACES, TOY_CLASSIFIER, load_toy_model, sample
    from ldm.weights.checkpoint import read_checkpoint
    torch.set_num_threads(threads())
    best = last.parent / "best.ckpt"
    history = json.loads((last.parent.parent / "validation.json").read_text())
    result: dict = {"validated_steps": [h["step"] for h in history], "check_places": list(SUBJECT_PLACES),
                    "check_seed": seed + 100}
    if not best.is_file():
        result["best_step"] = None
        return result
    classifier = load_classifier(TOY_CLASSIFIER)
    result["best_step"] = read_checkpoint(best)[1].get("global_step")
    places = [b for b in SUBJECT_PLACES for _ in range(per_place)]
    for name, ckpt in (("best", best), ("last", last)):
        model = load_toy_model(ckpt)
        s = judge_scores(sample(model, [f"photo of a sks robot {tw.PLACES[b]}" for b in places], seed + 100), places,
                         classifier)
        drift = prior_drift(sample(model, len(SUBJECT_PLACES) * 8 * ["photo of a robot"], seed + 101), classifier)
        result[name] = {"subject_fidelity": round(s["subject_fidelity"], 3),
                        "prompt_fidelity": round(s["prompt_fidelity"], 3), "prior_drift": round(drift, 3)}
    return result


def draw_figure(rows: dict, path: Path, scores: dict, photo_dir: Path = SUBJECT) -> Path:
    """A labelled grid: one row per entry (None = the training photos), six pictures each, scores at the bottom."""
    from PIL import Image, ImageDraw

    from ldm.data.image_loading import find_images
    from ldm.images import save_png, to_pil
    label_w, pad = 190, 4
    photos = [Image.open(p).convert("RGB") for p in find_images(photo_dir, "demo subject")][:6]
    width = label_w + 6 * (CELL + pad)
    height = len(rows) * (CELL + pad) + 40
    fig = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(fig)
    for r, (label, images) in enumerate(rows.items()):
        y = r * (CELL + pad)
        d.text((8, y + CELL // 2 - 6), label, fill=(20, 20, 20))
        pictures = photos if images is None else [to_pil(x) for x in images]
        for c, im in enumerate(pictures):
            fig.paste(im.resize((CELL, CELL), Image.NEAREST if im.width < CELL else Image.LANCZOS),
                      (label_w + c * (CELL + pad), y))
    b, a = scores["before"], scores["after"]
    d.text((8, height - 32), f"subject fidelity {b['subject_fidelity']:.2f} -> {a['subject_fidelity']:.2f}   "
                             f"prompt fidelity {a['prompt_fidelity']:.2f}   prior drift {b['prior_drift']:.2f} -> "
                             f"{a['prior_drift']:.2f}" + (f"   colour drift of 'a robot' {a['colour_drift']:.2f} "
                                                           f"(base vs itself: {a['colour_drift_base_seeds']:.2f})"
                                                           if "colour_drift" in a else ""), fill=(20, 20, 20))
    return save_png(fig, path, {"scores": json.dumps(scores)})


def plumbing(opt: argparse.Namespace, out: Path, env: dict[str, str], tic: float) -> int:
    """The random-weight SD v1- / SDXL-shaped toy configs: class images, fine-tune, sample (noise pictures)."""
    finetune_cfg, inference = (REPO / "configs/stable-diffusion" / name for name in PLUMBING[opt.family])
    run([sys.executable, str(REPO / "main.py"), "--base", str(finetune_cfg), "-t", "-n", "demo", "--logdir",
         str(out / "logs"), "--data_root", str(opt.data_root), "--reg_data_root", str(out / "class-images"),
         "--num_class_images", "12", "--class_word", "robot", "--max_steps", str(opt.max_steps or 60)], env)
    last = max((out / "logs").glob("*_demo/checkpoints/last.ckpt"), key=lambda q: q.stat().st_mtime)
    run([sys.executable, str(REPO / "scripts/stable_txt2img.py"), "--config", str(inference), "--ckpt", str(last),
         "--outdir", str(out / "samples"), "--ddim_steps", "20", "--scale", "3", "--n_samples", "4", "--n_iter", "1",
         "--seed", "1", "--prompt", "photo of a sks robot"], env)
    print(f"\nDemo done in {time.time() - tic:.0f} s: checkpoint {last}, samples in {out / 'samples'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
