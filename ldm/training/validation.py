"""Validation during training with the paper's metrics, and the checkpoint chosen by measurement.

``lightning.validation: {every_n_steps, prompts, num_images, seed, clip, dino, ...}`` turns it on. Every
``every_n_steps`` steps (and once before the first, for the baseline) the run, on rank 0:

1. samples, with fixed seeds, ``num_images`` pictures of every recontextualisation prompt of every subject
   ("a sks dog on the beach") and of the bare class prompt ("a dog"), into ``images/val/step-XXXXXX.png``;
2. scores them with the paper's metrics (Ruiz et al. 2023, sec. 4.1; ``ldm.eval.metrics``): DINO and CLIP-I of
   the subject pictures against the subject's training photos, CLIP-T of each picture against its prompt without
   the identifier, and PRES (DINO of the class pictures against the subject's photos: how much the class itself
   turned into the subject), averaged over the subjects; without the CLIP/DINO model folders it says so once and
   only the loss is validated. On the toy world, ``judge: assets/toy/classifier.safetensors`` scores with the toy
   judge instead (``ldm.eval.toy``): subject fidelity, prompt fidelity (the place drawn as asked) and prior drift
   (the class pictures taken for the subject) play CLIP-I, CLIP-T and PRES;
3. computes the loss on a fixed grid of timesteps and noise over the training photos and class images
   (``val/loss_subject_fixed``, ``val/loss_prior_fixed``): the same numbers for the same weights, step to step;
4. logs everything to TensorBoard and the CSV, and keeps the best step's weights as ``checkpoints/best.ckpt``
   (and ``lora-best.safetensors`` for a LoRA run).

The rule that picks the step (:func:`choose_step`): the highest CLIP-I + CLIP-T among the validated steps whose
PRES is at most the baseline's (step 0) plus ``pres_margin``, if it beats the baseline's own CLIP-I + CLIP-T: the
subject and the prompt both count, a step where the class has started to look like the subject is not taken, and
when no trained step improves on the starting model none is called best (no ``best.ckpt``; ``metrics.md`` says
so). At the end ``metrics.md`` holds the table, the rule and the step it picked, and ``metrics.png`` the metrics
against the steps.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch

from ldm.files import atomic_write
from ldm.images import make_grid, save_png, to_pil
from ldm.training.callbacks import expand_prompts

METRIC_NAMES = ("DINO", "CLIP-I", "CLIP-T", "PRES")


@dataclass(frozen=True)
class Metrics:
    """What a judge reports, and what the rule reads: the two scores summed for fidelity (higher is better) and
    the one that says how far the class itself moved (lower is better)."""
    names: tuple[str, ...]
    fidelity: tuple[str, str]
    preservation: str


#: The paper's metrics (CLIP and DINO folders) and the toy world's (its judge; ``lightning.validation.judge``).
PAPER = Metrics(METRIC_NAMES, ("CLIP-I", "CLIP-T"), "PRES")
TOY = Metrics(("subject fidelity", "prompt fidelity", "prior drift"), ("subject fidelity", "prompt fidelity"),
              "prior drift")
DEFAULT_PROMPTS = ("a {token} {class_word} on the beach", "a {token} {class_word} in the snow",
                   "a {token} {class_word} on top of a wooden table", "a red {token} {class_word}")


def metrics_of(history: Sequence[dict[str, Any]]) -> Metrics:
    """The metric set a validation history was scored with (the toy judge's names, else the paper's)."""
    return TOY if history and TOY.preservation in history[0] else PAPER


def _fidelity(record: dict[str, Any], metrics: Metrics = PAPER) -> Optional[float]:
    """CLIP-I + CLIP-T of a validation record (the toy judge's: subject + prompt fidelity), None without them."""
    a, b = metrics.fidelity
    if record.get(a) is None or record.get(b) is None:
        return None
    return record[a] + record[b]


def choose_step(history: Sequence[dict[str, Any]], pres_margin: float) -> Optional[int]:
    """The step the documented rule picks from validation records ``{"step", "CLIP-I", "CLIP-T", "PRES"}`` (the
    first is the baseline, the starting model): the highest CLIP-I + CLIP-T whose PRES <= baseline PRES +
    ``pres_margin``, and higher than the baseline's own, since a trained step that scores no better than the
    model it started from is no better choice; ties go to the earlier step. None without CLIP scores, without
    trained steps, or when the baseline scored best (:func:`baseline_scored_best`). A toy-judge history is read
    the same way with its own names (:data:`TOY`)."""
    m = metrics_of(history)
    pres = m.preservation
    if not history or history[0].get(pres) is None:
        limit = math.inf
    else:
        limit = history[0][pres] + pres_margin
    floor = _fidelity(history[0], m) if history else None
    candidates = [h for h in history[1:] if _fidelity(h, m) is not None and (h.get(pres) is None or h[pres] <= limit)
                  and (floor is None or _fidelity(h, m) > floor)]
    if not candidates:
        return None
    best = max(candidates, key=lambda h: (_fidelity(h, m), -h["step"]))
    return int(best["step"])


def baseline_scored_best(history: Sequence[dict[str, Any]], pres_margin: float) -> bool:
    """True when the starting model (step 0) has CLIP scores and no trained step within the PRES margin beats them:
    the run did not improve on the model it started from."""
    m = metrics_of(history)
    return len(history) > 1 and _fidelity(history[0], m) is not None and choose_step(history, pres_margin) is None \
        and any(_fidelity(h, m) is not None for h in history[1:])


class ValidationMetrics(pl.Callback):
    """See the module docstring. ``clip`` / ``dino``: local folders of openai/clip-vit-base-patch32 and
    facebook/dino-vits16 (as ``scripts/evaluate.py`` takes them); ``judge``: the toy world's classifier file, which
    scores instead of them."""

    def __init__(self, every_n_steps: int, prompts: Sequence[str] = DEFAULT_PROMPTS, num_images: int = 4,
                 seed: int = 0, clip: Optional[str] = None, dino: Optional[str] = None, ddim_steps: int = 50,
                 scale: float = 7.5, pres_margin: float = 0.05, loss_timesteps: int = 4, max_class_images: int = 8,
                 judge: Optional[str] = None, class_prompt: str = "a {class_word}"):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError("lightning.validation.every_n_steps must be at least 1")
        self.judge_path, self.class_prompt = judge, class_prompt
        self._judge: Any = None
        self.every, self.templates, self.num_images, self.seed = every_n_steps, list(prompts), num_images, seed
        self.clip_path, self.dino_path, self.ddim_steps, self.scale = clip, dino, ddim_steps, scale
        self.pres_margin, self.loss_timesteps, self.max_class_images = pres_margin, loss_timesteps, max_class_images
        self.history: list[dict[str, Any]] = []
        self.best_step: Optional[int] = None
        self._embedders: Optional[tuple[Any, Any]] = None
        self._done: set[int] = set()

    # ---- Lightning hooks ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.best_step = list(state.get("history", [])), state.get("best_step")
        self._done = {int(h["step"]) for h in self.history}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            write_report(self.history, choose_step(self.history, self.pres_margin), self.pres_margin,
                         Path(trainer.default_root_dir))
            if baseline_scored_best(self.history, self.pres_margin):
                print("Validation: the starting model (step 0) scored best; no trained step improved on it, so no "
                      "best.ckpt was written (see metrics.md)")

    # ---- one validation ----------------------------------------------------------------------------------
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step in self._done:
            return
        self._done.add(step)
        data = trainer.datamodule.train_dataset
        was_training = pl_module.training
        pl_module.eval()
        from ldm.sampling.samplers import NonFiniteSample
        try:
            record = {"step": step, **self.fixed_loss(pl_module, data)}
            images, groups = self.sample(pl_module, data)
            record.update(self.score(images, groups, data))
        except NonFiniteSample as e:  # said, never saved as black pictures nor scored; the training goes on
            print(f"Validation at step {step}: {e}")
            return
        finally:
            pl_module.train(was_training)
        self.history.append(record)
        root = Path(trainer.default_root_dir)
        grid = make_grid(torch.cat([images[k] for k in sorted(images)]), nrow=self.num_images, pad_value=-1.0)
        save_png(to_pil(grid), root / "images" / "val" / f"step-{step:06d}.png",
                 {"step": step, "rows": " | ".join(sorted(images))})
        for logger in trainer.loggers:
            logger.log_metrics({f"val/{k}": v for k, v in record.items() if k != "step" and v is not None}, step)
        atomic_write(root / "validation.json", lambda tmp: Path(tmp).write_text(json.dumps(self.history, indent=2)))
        best = choose_step(self.history, self.pres_margin)
        if best == step and best != self.best_step:
            self.best_step = best
            save_best(trainer, pl_module)

    def prompts_for(self, data: Any) -> dict[str, list[str]]:
        """Row label -> prompts: every subject's recontextualisation prompts, and each class's bare prompt."""
        rows: dict[str, list[str]] = {}
        for c in data.concepts:
            for p in expand_prompts(self.templates, [c]):
                rows[p] = [p]
        for c in data.concepts:
            rows[self.class_row(c)] = [self.class_row(c)]
        return rows

    def class_row(self, concept: Any) -> str:
        """The bare class prompt of ``concept`` ("a dog"; the toy world's captions say "photo of a robot")."""
        return self.class_prompt.format(class_word=concept.class_word)

    @torch.no_grad()
    def sample(self, model: Any, data: Any) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        """Decoded pictures per row, ``num_images`` each, every row from its own fixed seed."""
        from ldm.sampling.samplers import default_sampler, guided_images, make_sampler
        sampler = make_sampler(default_sampler(model), model)
        h, w = data.targets[len(data.targets) // 2][::-1]  # the square bucket (or the fixed size)
        shape = (model.channels, h // model.vae_factor, w // model.vae_factor)
        rows, images = self.prompts_for(data), {}
        with model.ema_scope():
            for k, (label, prompts) in enumerate(rows.items()):
                n = self.num_images
                generator = torch.Generator(model.device).manual_seed(self.seed + k)
                images[label] = guided_images(model, sampler, n * prompts, shape, self.ddim_steps, self.scale,
                                              generator, model.default_sizes(n, h, w))
        return images, rows

    @torch.no_grad()
    def fixed_loss(self, model: Any, data: Any) -> dict[str, float]:
        """The denoising loss of the training photos and (up to ``max_class_images``) class images on a fixed grid
        of timesteps and noise: comparable from step to step."""
        from ldm.data.image_loading import uint8_to_tensor
        from ldm.models.diffusion.losses import per_example_loss
        out = {}
        sets = {"subject": (data.images, data.captions), "prior": (data.reg_images, data.reg_captions)}
        for name, (images, captions) in sets.items():
            if images is None or not len(captions):
                continue
            count = len(captions) if name == "subject" else min(len(captions), self.max_class_images)
            losses = []
            for k in range(count):
                x = uint8_to_tensor(images[k])[None].to(model.device)
                z = model.get_first_stage_encoding(model.encode_first_stage(x).mode())
                c = model.conditioning.condition(model.encode_text([captions[k]]), model.default_sizes(1, *x.shape[-2:]))
                c = model.with_guidance(c, model.train_guidance)
                g = torch.Generator(model.device).manual_seed(self.seed + 1000 + k)
                objective = model.objective
                for t in objective.fixed_timesteps(model, self.loss_timesteps, model.device).split(1):
                    noise = torch.randn(z.shape, generator=g, device=z.device, dtype=z.dtype)
                    pred = model.apply_model(objective.noised(model, z, t, noise), t, c)
                    losses.append(float(per_example_loss(pred, objective.target(z, noise))))
            out[f"loss_{name}_fixed"] = sum(losses) / len(losses)
        return out

    def score(self, images: dict[str, torch.Tensor], rows: dict[str, list[str]], data: Any) -> dict[str, Any]:
        """DINO, CLIP-I, CLIP-T and PRES averaged over the subjects (None each without the model folders), or the
        toy judge's three."""
        if self.judge_path:
            return self.judge_scores(images, data)
        embedders = self.embedders()
        if embedders is None:
            return {name: None for name in METRIC_NAMES}
        from ldm.eval.metrics import clip_i_score, clip_t_score, dino_score, pres_score, prompt_for_clip_t
        clip, dino = embedders
        per_subject = []
        for k, concept in enumerate(data.concepts):
            real = [to_pil(torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1)
                    for im, owner in zip(data.images, data.concept_of) if owner == k]
            mine = [p for p in expand_prompts(self.templates, [concept])]
            generated = [to_pil(x) for p in mine for x in images[p]]
            texts = [prompt_for_clip_t(p, concept.token) for p in mine for _ in images[p]]
            prior = [to_pil(x) for x in images[self.class_row(concept)]]
            real_dino, real_clip = dino.embed_images(real), clip.embed_images(real)
            gen_clip = clip.embed_images(generated)
            per_subject.append({
                "DINO": dino_score(dino.embed_images(generated), real_dino),
                "CLIP-I": clip_i_score(gen_clip, real_clip),
                "CLIP-T": clip_t_score(gen_clip, clip.embed_texts(texts)),
                "PRES": pres_score(real_dino, dino.embed_images(prior))})
        return {name: sum(s[name] for s in per_subject) / len(per_subject) for name in METRIC_NAMES}

    def judge_scores(self, images: dict[str, torch.Tensor], data: Any) -> dict[str, Any]:
        """The toy judge's subject fidelity and prompt fidelity over every subject prompt (the place each prompt
        names, ``toy_world.background_of_prompt``) and its prior drift over the class pictures."""
        from ldm.data.toy_world import background_of_prompt
        from ldm.eval.toy import load_classifier, prior_drift, scores
        if self._judge is None:
            self._judge = load_classifier(self.judge_path)
        mine = [p for c in data.concepts for p in expand_prompts(self.templates, [c])]
        subject = torch.cat([images[p] for p in mine])
        places = [background_of_prompt(p) for p in mine for _ in images[p]]
        result = scores(subject, places, self._judge)
        prior = torch.cat([images[self.class_row(c)] for c in data.concepts])
        return {"subject fidelity": result["subject_fidelity"], "prompt fidelity": result["prompt_fidelity"],
                "prior drift": prior_drift(prior, self._judge)}

    def embedders(self) -> Optional[tuple[Any, Any]]:
        if self._embedders is None:
            if not self.clip_path or not self.dino_path:
                print("Validation: no CLIP/DINO model folders (lightning.validation.clip / .dino): only the loss "
                      "is validated, and no best step is chosen")
                self._embedders = ()
            else:
                from ldm.eval.embedders import ClipEmbedder, DinoEmbedder
                self._embedders = (ClipEmbedder(self.clip_path), DinoEmbedder(self.dino_path))
        return self._embedders or None


def save_best(trainer: pl.Trainer, model: Any) -> list[Path]:
    """The current weights as ``checkpoints/best.ckpt`` (the original layout, as the sampling scripts read it)
    and, for a LoRA run, ``lora-best.safetensors``."""
    from ldm.weights.checkpoint import save_checkpoint
    from ldm.weights.lora import plain_keys
    folder = Path(trainer.default_root_dir) / "checkpoints"
    written = [save_checkpoint(folder / "best.ckpt", plain_keys(model.state_dict()), global_step=trainer.global_step)]
    if getattr(model, "lora_settings", None):
        from ldm.weights.lora import lora_state_dict
        written.append(save_checkpoint(folder / "lora-best.safetensors", lora_state_dict(model),
                                       global_step=trainer.global_step))
    print(f"Validation: step {trainer.global_step} is the best so far -> {written[0]}")
    return written


def write_report(history: Sequence[dict[str, Any]], best: Optional[int], margin: float, root: Path) -> Path:
    """``metrics.md`` (the table, the rule, the step it picked) and ``metrics.png`` (the metrics against steps)."""
    m = metrics_of(history)
    columns = ["step", *m.names, "loss_subject_fixed", "loss_prior_fixed"]
    fmt = lambda v: "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# Validation", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    base_best = baseline_scored_best(history, margin)
    for h in history:
        mark = " **best**" if h["step"] == best else " **best (the starting model)**" if base_best and h is \
            history[0] else ""
        lines.append("| " + " | ".join(fmt(h.get(c)) for c in columns) + mark + " |")
    (a, b), pres = m.fidelity, m.preservation
    rule = (f"Rule: the highest {a} + {b} among the validated steps whose {pres} is at most the baseline's "
            f"(step 0) + {margin}, if it is higher than the baseline's own.")
    if best is not None:
        verdict = f"Recommended step: {best} (checkpoints/best.ckpt)"
    elif base_best:
        verdict = (f"Recommended step: none. The starting model (step 0) scored best ({a} + {b} "
                   f"{_fidelity(history[0], m):.4f}): no trained step within the {pres} margin improved on it, so no "
                   f"best.ckpt was written. Try a lower learning rate or fewer steps, or check the photos and "
                   f"the identifier.")
    else:
        verdict = f"Recommended step: none (no judge's scores, or no trained step within the {pres} margin)"
    lines += ["", rule, "", verdict, "", "![metrics](metrics.png)", ""]
    path = root / "metrics.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines), encoding="utf-8"))
    plot_metrics(history, best, root / "metrics.png")
    return path


def plot_metrics(history: Sequence[dict[str, Any]], best: Optional[int], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [h["step"] for h in history]
    for name in metrics_of(history).names:
        values = [h.get(name) for h in history]
        if any(v is not None for v in values):
            ax.plot(steps, [math.nan if v is None else v for v in values], marker="o", label=name)
    if best is not None:
        ax.axvline(best, color="grey", linestyle="--", label=f"best step {best}")
    ax.set_xlabel("training step")
    ax.set_ylabel("score")
    ax.set_title("Validation metrics")
    ax.legend(loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
