"""DreamBooth's evaluation protocol (Ruiz et al., CVPR 2023, Sec. 4.1 and 4.3): generate, score, tabulate.

Samples folder (written by :func:`generate_for_subject`, read by :func:`evaluate_subject`)::

    SAMPLES/<subject>/<NN>/<k>.png         image k (00, 01, ...) of prompt NN (00..24, its index in
                                           ldm.eval.dataset.prompts_for(subject, token))
    SAMPLES/<subject>/class_prior/<k>.png  images of "a [class noun]" (class_prompt), compared with the real
                                           photos by PRES

Results folder: ``OUT/subjects/<subject>.json`` (one per subject; the resume cache: a subject whose file matches
the current samples, token and models is not scored again), ``OUT/metrics.json`` and ``OUT/metrics.md``.
Seeds: the K images of prompt NN come from one noise draw seeded ``seed + NN`` (so they equal
``scripts/stable_txt2img.py --seed <seed + NN> --n_samples K`` on the same device), the class-prior images from
``seed + PRIOR_SEED_OFFSET``; a resumed run redraws only the batches that lack an image, to the same pixels.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from PIL import Image

from ldm.eval.dataset import Subject, class_prompt, prompts_for, real_images
from ldm.eval.metrics import clip_i_score, clip_t_score, dino_score, div_score, pres_score, prompt_for_clip_t
from ldm.files import atomic_write

METRICS = ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV")
BETTER = {"DINO": "↑", "CLIP-I": "↑", "CLIP-T": "↑", "PRES": "↓", "DIV": "↑"}
PRIOR_DIR = "class_prior"
PRIOR_SEED_OFFSET = 1000  # past the 25 prompt seeds, so no class-prior image shares a starting noise with them
_PROMPT_DIR = re.compile(r"^\d{2}$")
# The paper's numbers (Ruiz et al., CVPR 2023). Table 1 is Stable Diffusion; the prior-preservation ablation
# (Table 3, PRES and DIV) was run on Imagen only, so those rows compare protocols, not models.
PAPER_ROWS: tuple[tuple[str, dict[str, float]], ...] = (
    ("paper: DreamBooth (Stable Diffusion), Table 1", {"DINO": 0.668, "CLIP-I": 0.803, "CLIP-T": 0.305}),
    ("paper: real images, Table 1", {"DINO": 0.774, "CLIP-I": 0.885}),
)
# The paper's PRES/DIV ablation (its Table 3) was run on Imagen, not Stable Diffusion, and its figures could not be
# checked against the paper here, so no paper row is printed for PRES and DIV.


class EvalError(ValueError):
    """A samples folder that cannot be scored; the message is one line naming the folder."""


@dataclass(frozen=True)
class SamplingSettings:
    """How the evaluation images are generated. Defaults are the paper's: 4 images for each of the 25 prompts,
    DDIM 50 steps, guidance 7.5. ``prompts`` keeps only the first N prompts (quick runs); ``prior_images`` is
    the number of "a [class noun]" images per subject for PRES (the paper does not say; 25 by default)."""

    images_per_prompt: int = 4
    prompts: Optional[int] = None
    ddim_steps: int = 50
    scale: float = 7.5
    seed: int = 0
    size: int = 512
    prior_images: int = 25
    batch_size: int = 4


# ---- generation ------------------------------------------------------------------------------------------------

def sample_jobs(subject: Subject, token: str, settings: SamplingSettings) -> list[tuple[str, str, int, int]]:
    """``(prompt, folder name, seed, count)`` for every prompt folder of the subject, class prior last."""
    prompts = prompts_for(subject, token)[: settings.prompts]
    jobs = [(p, f"{i:02d}", settings.seed + i, settings.images_per_prompt) for i, p in enumerate(prompts)]
    if settings.prior_images > 0:
        jobs.append((class_prompt(subject), PRIOR_DIR, settings.seed + PRIOR_SEED_OFFSET, settings.prior_images))
    return jobs


def count_missing(subject: Subject, subject_dir: str | Path, token: str, settings: SamplingSettings) -> int:
    """How many of the subject's evaluation images are not on disk yet."""
    return sum(1 for _, folder, _, count in sample_jobs(subject, token, settings)
               for k in range(count) if not (Path(subject_dir) / folder / f"{k:02d}.png").is_file())


@torch.no_grad()
def generate_for_subject(model: Any, subject: Subject, out_dir: str | Path, token: str,
                         settings: SamplingSettings = SamplingSettings()) -> list[Path]:
    """Write the subject's evaluation images into ``out_dir`` (= ``SAMPLES/<subject>``); returns the new files.

    Images already on disk are kept. The images of a prompt are drawn in fixed batches (``batch_size`` in index
    order) from one seeded noise draw, and a batch that lacks any image is redrawn whole with only the missing
    files written: an interrupted run resumes to exactly the images an uninterrupted one writes, bit for bit on
    the same device (a batch of another size may round differently).
    """
    from ldm.images import save_png, to_pil
    from ldm.sampling.samplers import default_sampler, make_sampler

    out_dir, device = Path(out_dir), model.betas.device
    shape = (model.channels, settings.size // model.vae_factor, settings.size // model.vae_factor)
    name = default_sampler(model)
    sampler, written = make_sampler(name, model), []
    model.eval()
    with model.ema_scope(), torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        for prompt, folder, seed, count in sample_jobs(subject, token, settings):
            paths = [out_dir / folder / f"{k:02d}.png" for k in range(count)]
            if all(p.is_file() for p in paths):
                continue
            # The whole draw, then its batches: each image keeps its noise whichever ones are missing.
            generator = torch.Generator(device).manual_seed(seed)
            noise = torch.randn((count, *shape), generator=generator, device=device)
            for start in range(0, count, settings.batch_size):
                batch = range(start, min(start + settings.batch_size, count))
                if all(paths[k].is_file() for k in batch):
                    continue
                n = len(batch)
                sizes = model.default_sizes(n, settings.size, settings.size)
                z, _ = sampler.sample(settings.ddim_steps, n, shape,
                                      conditioning=model.get_learned_conditioning(n * [prompt], sizes),
                                      unconditional_conditioning=model.get_unconditional_conditioning(n * [""], sizes),
                                      unconditional_guidance_scale=settings.scale, x_T=noise[start:start + n],
                                      generator=generator, verbose=False, disable_progress=True)
                for k, img in zip(batch, model.decode_first_stage(z).float()):
                    if paths[k].is_file():
                        continue
                    meta = {"prompt": prompt, "seed": seed, "index": k, "steps": settings.ddim_steps,
                            "scale": settings.scale, "sampler": name, "size": f"{settings.size}x{settings.size}"}
                    written.append(save_png(to_pil(img), paths[k], meta))
    return written


def generate_from_checkpoint(config: Mapping[str, Any], ckpt: str | Path, subject: Subject, subject_dir: str | Path,
                             token: str, settings: SamplingSettings, device: str | torch.device) -> int:
    """:func:`generate_for_subject` with the model of ``config`` loaded from ``ckpt`` (only if images are missing,
    and freed afterwards, so a GPU holds one model at a time). Returns the number of images written."""
    from ldm.weights.checkpoint import CheckpointError
    from ldm.weights.load import load_model_from_config

    missing = count_missing(subject, subject_dir, token, settings)
    if not missing:
        return 0
    if not Path(ckpt).is_file():
        raise CheckpointError(f"{ckpt}: checkpoint of subject {subject.name} not found")
    print(f"{subject.name}: generating {missing} images from {ckpt} into {subject_dir}")
    model = load_model_from_config(config, ckpt).to(device)
    written = generate_for_subject(model, subject, subject_dir, token, settings)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return len(written)


# ---- scoring ---------------------------------------------------------------------------------------------------

class Embedders:
    """CLIP, DINO and LPIPS from the user's folders, loaded on first use: a resumed run whose subjects are all
    scored loads none. Call :meth:`load` early to fail before hours of generation if a file is missing."""

    def __init__(self, clip: str | Path, dino: str | Path, lpips: str | Path,
                 device: str | torch.device = "cpu") -> None:
        self.paths = {"clip": str(clip), "dino": str(dino), "lpips": str(lpips)}
        self.device = device
        self._models: Optional[tuple[Any, Any, Any]] = None

    def load(self) -> "Embedders":
        """Load all three now; raises :class:`ldm.eval.embedders.ModelFilesError` (one line) if files lack."""
        if self._models is None:
            from ldm.eval.embedders import ClipEmbedder, DinoEmbedder, Lpips
            self._models = (ClipEmbedder(self.paths["clip"], self.device),
                            DinoEmbedder(self.paths["dino"], self.device),
                            Lpips(self.paths["lpips"], device=self.device))
        return self

    @property
    def clip(self) -> Any:
        return self.load()._models[0]

    @property
    def dino(self) -> Any:
        return self.load()._models[1]

    @property
    def lpips(self) -> Any:
        return self.load()._models[2]


def read_samples(subject_dir: str | Path) -> tuple[dict[int, list[Path]], list[Path]]:
    """``({prompt index: image files}, class-prior files)`` of one subject's samples folder, in index order."""
    subject_dir = Path(subject_dir)

    def pngs(folder: Path) -> list[Path]:
        files = [p for p in folder.glob("*.png") if p.stem.isdigit()] if folder.is_dir() else []
        return sorted(files, key=lambda p: int(p.stem))

    folders = sorted(d for d in subject_dir.iterdir() if _PROMPT_DIR.match(d.name)) if subject_dir.is_dir() else []
    groups = {int(d.name): pngs(d) for d in folders}
    return {i: files for i, files in groups.items() if files}, pngs(subject_dir / PRIOR_DIR)


def _open(paths: Iterable[Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def evaluate_subject(subject: Subject, subject_dir: str | Path, token: str, embedders: Embedders,
                     real_size: int = 512) -> dict[str, Optional[float]]:
    """DINO, CLIP-I, CLIP-T, PRES and DIV of one subject's samples (Sec. 4.1, 4.3); ``None`` where the samples
    cannot give one (no class-prior images: PRES; fewer than 2 images of a prompt: DIV).

    Real photos are the training loader's ``real_size`` centre crops, the framing the model was trained on.
    """
    groups, prior_files = read_samples(subject_dir)
    if not groups:
        raise EvalError(f"{subject_dir}: no generated images (expected <NN>/<k>.png folders, NN = prompt index)")
    prompts = prompts_for(subject, token)
    if max(groups) >= len(prompts):
        raise EvalError(f"{subject_dir}: prompt folder {max(groups):02d}, but {subject.name} has only "
                        f"{len(prompts)} prompts")
    per_prompt = {i: _open(files) for i, files in groups.items()}
    generated = [im for ims in per_prompt.values() for im in ims]
    # CLIP-T compares each image with its own prompt, the identifier removed (CLIP does not know it).
    texts = [prompt_for_clip_t(prompts[i], token) for i, ims in per_prompt.items() for _ in ims]
    real = real_images(subject, real_size)
    dino_real, clip_gen = embedders.dino.embed_images(real), embedders.clip.embed_images(generated)
    scores: dict[str, Optional[float]] = {
        "DINO": dino_score(embedders.dino.embed_images(generated), dino_real),
        "CLIP-I": clip_i_score(clip_gen, embedders.clip.embed_images(real)),
        "CLIP-T": clip_t_score(clip_gen, embedders.clip.embed_texts(texts)),
        "PRES": pres_score(dino_real, embedders.dino.embed_images(_open(prior_files))) if prior_files else None,
        "DIV": None,
    }
    if all(len(ims) >= 2 for ims in per_prompt.values()):
        scores["DIV"] = div_score(list(per_prompt.values()), embedders.lpips.distance)
    return scores


def cache_key(subject_dir: str | Path, token: str, embedders: Embedders, real_size: int) -> dict[str, Any]:
    """What a cached subject result depends on; a cache entry with another key is scored again."""
    groups, prior = read_samples(subject_dir)
    return {"token": token, "prompts": sorted(groups), "images": sum(map(len, groups.values())),
            "class_prior": len(prior), "real_size": real_size, "models": embedders.paths}


def cached_result(out_dir: str | Path, name: str, key: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The cached record of subject ``name`` if it was computed with ``key`` (see :func:`cache_key`)."""
    path = Path(out_dir) / "subjects" / f"{name}.json"
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    return record if record is not None and record.get("key") == key else None


def unscored(subjects: Sequence[Subject], samples_root: str | Path, out_dir: str | Path, token: str,
             embedders: Embedders, real_size: int = 512) -> list[Subject]:
    """The subjects :func:`evaluate_subjects` would score now (no matching cached record)."""
    return [s for s in subjects if cached_result(
        out_dir, s.name, cache_key(Path(samples_root) / s.name, token, embedders, real_size)) is None]


def _write_json(path: Path, obj: Any) -> Path:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))
    return path


def evaluate_subjects(subjects: Sequence[Subject], samples_root: str | Path, out_dir: str | Path, token: str,
                      embedders: Embedders, real_size: int = 512) -> dict[str, dict[str, Any]]:
    """Score each subject's ``samples_root/<name>`` and cache it in ``out_dir/subjects/<name>.json``; a subject
    whose cache matches :func:`cache_key` is read back, not scored again. Returns ``{name: record}``."""
    results = {}
    for subject in subjects:
        subject_dir = Path(samples_root) / subject.name
        path = Path(out_dir) / "subjects" / f"{subject.name}.json"
        key = cache_key(subject_dir, token, embedders, real_size)
        cached = cached_result(out_dir, subject.name, key)
        if cached is not None:
            print(f"{subject.name}: already scored ({path})")
            results[subject.name] = cached
            continue
        scores = evaluate_subject(subject, subject_dir, token, embedders, real_size)
        record = {"subject": subject.name, "class": subject.class_word, "live": subject.live, "metrics": scores,
                  "key": key}
        results[subject.name] = record
        _write_json(path, record)
        print(f"{subject.name}: " + ", ".join(f"{m} {_fmt(scores[m])}" for m in METRICS))
    return results


# ---- summary and tables ----------------------------------------------------------------------------------------

def summarize(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the subjects that have it: every subject weighs the same, whatever its number
    of photos (the paper does not say how it pools subjects; this is the usual reading)."""
    out: dict[str, Any] = {"subjects": len(results)}
    for metric in METRICS:
        values = [r["metrics"][metric] for r in results.values() if r["metrics"].get(metric) is not None]
        out[metric] = sum(values) / len(values) if values else None
    return out


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.3f}"


def write_table(results: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "ours",
                notes: Sequence[str] = ()) -> Path:
    """A Markdown report: the mean next to the paper's rows, then one row per subject."""
    summary = summarize(results)
    header = "| | " + " | ".join(f"{m} {BETTER[m]}" for m in METRICS) + " |\n|---|" + "---|" * len(METRICS)
    rows = [f"| **{title}** ({summary['subjects']} subjects) | "
            + " | ".join(f"**{_fmt(summary[m])}**" for m in METRICS) + " |"]
    rows += [f"| {label} | " + " | ".join(_fmt(vals.get(m)) for m in METRICS) + " |" for label, vals in PAPER_ROWS]
    per_subject = ["| subject | class | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    per_subject += [f"| {name} | {r['class']} | " + " | ".join(_fmt(r["metrics"].get(m)) for m in METRICS) + " |"
                    for name, r in results.items()]
    text = "\n".join([
        "# DreamBooth evaluation (protocol of Ruiz et al., CVPR 2023)", "", header, *rows, "",
        "Rows marked *paper* are copied from the paper's Table 1 (Stable Diffusion; real images = the subjects' "
        "photos scored against each other, a reference for subject fidelity). The paper reports PRES and DIV only "
        "for its prior-preservation ablation on Imagen, so there is no Stable Diffusion figure to compare. DINO, CLIP-I, CLIP-T, DIV: higher is better; PRES: lower is better (less of the "
        "subject leaks into plain class prompts).", *[f"\n{n}" for n in notes], "", "## Per subject", "",
        *per_subject, ""])
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def write_results(results: Mapping[str, Mapping[str, Any]], json_path: str | Path, md_path: str | Path,
                  settings: Optional[SamplingSettings | Mapping[str, Any]] = None, notes: Sequence[str] = ()) -> Path:
    """``json_path`` (mean, per subject, the paper's numbers, settings) and the Markdown table ``md_path``."""
    settings = asdict(settings) if isinstance(settings, SamplingSettings) else settings
    _write_json(Path(json_path), {"mean": summarize(results), "subjects": dict(results),
                                  "paper": {label: vals for label, vals in PAPER_ROWS}, "settings": settings})
    return write_table(results, md_path, notes=notes)
