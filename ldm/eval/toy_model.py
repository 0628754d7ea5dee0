"""The toy latent diffusion model (assets/toy/) measured with the toy classifier (``ldm.eval.toy``): what it
learned in pretraining, and the DreamBooth effect of a fine-tune on the demo robot.

- :func:`world_scores`: images of every (kind, place) pair of the world, held-out pairs included; background and
  kind accuracy of the classifier on them (how well the pretrained model follows prompts). Sampled as a user
  samples: ``scripts/stable_txt2img.py``'s defaults, DDIM 50 steps at guidance 7.5 (:data:`WORLD_SAMPLING`).
- :func:`dreambooth_scores`: for a fine-tuned model (and, to compare, the model before), the three numbers the demo
  prints: subject fidelity on "photo of a sks robot" in the held-out places (robots never appear there in the
  world, so drawing the subject there is recontextualisation), prompt fidelity on those images, and prior drift
  on "photo of a robot" (how much the class itself turned into the subject).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ldm.data import toy_world as tw

REPO = Path(__file__).resolve().parents[2]
TOY_DIR = REPO / "assets" / "toy"
TOY_MODEL = TOY_DIR / "toy-ldm.safetensors"
TOY_CLASSIFIER = TOY_DIR / "classifier.safetensors"
TOY_CONFIG = REPO / "configs" / "toy" / "inference.yaml"
#: The places robots are held out of in the world: where the subject must appear after fine-tuning.
SUBJECT_PLACES = tuple(place for kind, place in tw.HELD_OUT_PAIRS if kind == "robot")
#: (DDIM steps, guidance scale) of :func:`sample` unless told otherwise: the demo's sampling (fast on a CPU; at
#: guidance 4 the demo's fine-tunes draw the subject saturated and partly garbled: README, "DreamBooth step by step").
DEMO_SAMPLING = (25, 3.0)
#: (steps, scale) of the world and colour scores: stable_txt2img.py's defaults. The shipped model draws the asked
#: kind in 87.1 % of 240 pictures at DDIM 25 / scale 3 (the demo's sampling), 95.8 % at 50 / 7.5 (the place: 95.8
#: and 100 %): at 25 steps and weak guidance a few starting noises end in the wrong place or kind.
WORLD_SAMPLING = (50, 7.5)


def load_toy_model(ckpt: str | Path = TOY_MODEL, config: str | Path = TOY_CONFIG) -> Any:
    from omegaconf import OmegaConf

    from ldm.weights.load import load_model_from_config
    return load_model_from_config(OmegaConf.load(config), ckpt, verbose=False)


@torch.no_grad()
def sample(model: Any, prompts: Sequence[str], seed: int, steps: int = DEMO_SAMPLING[0],
           scale: float = DEMO_SAMPLING[1], batch_size: int = 32, sampler: str = "ddim") -> torch.Tensor:
    """Decoded images ``[N, 3, H, W]`` in [-1, 1] for ``prompts`` (``sampler`` by name: DDIM with eta 0 unless
    said otherwise; guidance ``scale``), one generator seeded once for the whole list, so the same call gives the
    same pictures."""
    from ldm.sampling.samplers import guided_images, make_sampler
    chosen = make_sampler(sampler, model)
    generator = torch.Generator(model.betas.device).manual_seed(seed)
    shape = (model.channels, model.image_size, model.image_size)
    out = []
    with model.ema_scope():
        for start in range(0, len(prompts), batch_size):
            out.append(guided_images(model, chosen, prompts[start:start + batch_size], shape, steps, scale,
                                     generator))
    return torch.cat(out)


def world_scores(model: Any, classifier: Any, per_pair: int = 8, seed: int = 0,
                 sampling: tuple[int, float] = WORLD_SAMPLING) -> dict[str, float]:
    """Background and kind accuracy over ``per_pair`` images of every (kind, place) pair ("photo of a <kind>
    <place phrase>"), and separately over the held-out pairs; ``sampling``: (DDIM steps, guidance scale)."""
    from ldm.eval.toy import predict
    pairs = [(k, b) for k in tw.KINDS for b in tw.BACKGROUNDS]
    prompts = [f"photo of a {k} {tw.PLACES[b]}" for k, b in pairs for _ in range(per_pair)]
    p = predict(classifier, sample(model, prompts, seed, steps=sampling[0], scale=sampling[1]))
    bg_ok = (p["background"].argmax(1) == torch.tensor([tw.BACKGROUNDS.index(b) for _, b in pairs
                                                        for _ in range(per_pair)])).float()
    kind_ok = (p["kind"].argmax(1) == torch.tensor([tw.KINDS.index(k) for k, _ in pairs
                                                   for _ in range(per_pair)])).float()
    held = torch.tensor([(k, b) in tw.HELD_OUT_PAIRS for k, b in pairs for _ in range(per_pair)])
    return {"background_accuracy": round(float(bg_ok.mean()), 3), "kind_accuracy": round(float(kind_ok.mean()), 3),
            "held_out_background_accuracy": round(float(bg_ok[held].mean()), 3),
            "held_out_kind_accuracy": round(float(kind_ok[held].mean()), 3), "images": len(prompts),
            "ddim_steps": sampling[0], "scale": sampling[1]}


def colour_scores(model: Any, classifier: Any, per_pair: int = 2, seed: int = 0,
                  sampling: tuple[int, float] = WORLD_SAMPLING) -> dict[str, float]:
    """With a judge that reads colours (``ToyClassifier.full``): over ``per_pair`` images of every (colour, kind)
    pair of the world, each in a place the world shows that kind in ("photo of a red cat on the grass"), how often
    the object has the asked colour, and how often colour, kind and place are all as asked."""
    from ldm.eval.toy import COLOUR_LABELS, predict
    if not getattr(classifier, "full", False):
        raise ValueError("colour_scores needs a judge with a colour head (scripts/train_toy_classifier.py)")
    asked = []
    for i, (colour, kind) in enumerate((c, k) for c in COLOUR_LABELS for k in tw.KINDS):
        places = [b for b in tw.BACKGROUNDS if (kind, b) not in tw.HELD_OUT_PAIRS]
        asked += [(colour, kind, places[(i + j) % len(places)]) for j in range(per_pair)]
    p = predict(classifier, sample(model, [f"photo of a {c} {k} {tw.PLACES[b]}" for c, k, b in asked], seed,
                                   steps=sampling[0], scale=sampling[1]))
    colour_ok = p["colour"].argmax(1) == torch.tensor([COLOUR_LABELS.index(c) for c, _, _ in asked])
    kind_ok = p["kind"].argmax(1) == torch.tensor([tw.KINDS.index(k) for _, k, _ in asked])
    place_ok = p["background"].argmax(1) == torch.tensor([tw.BACKGROUNDS.index(b) for _, _, b in asked])
    return {"colour_accuracy": round(float(colour_ok.float().mean()), 3),
            "all_three_accuracy": round(float((colour_ok & kind_ok & place_ok).float().mean()), 3),
            "images": len(asked)}


def dreambooth_scores(model: Any, classifier: Any, token: str = "sks", class_word: str = "robot",
                      per_place: int = 8, seed: int = 0, base: Any = None,
                      sampling: tuple[int, float] = DEMO_SAMPLING, base_class_images: Optional[torch.Tensor] = None,
                      pictures: Optional[dict[str, torch.Tensor]] = None) -> dict[str, float]:
    """Subject fidelity and prompt fidelity on "photo of a <token> <class> <place>" for the held-out places, and
    prior drift on "photo of a <class>" (module docstring), on pictures sampled with ``sampling`` (DDIM steps,
    guidance scale). With ``base`` (the model before fine-tuning), also the colour drift of the class pictures
    from the base model's of the same seed (``ldm.eval.toy.colour_drift``) and, to read it against, the base
    model's own drift between two seeds.

    ``base_class_images``: the base model's class pictures of this seed where they were drawn already (its own
    scores' ``pictures["class"]``), so they are not drawn again. ``pictures``: a dict that receives the scored
    pictures, ``subject`` (``per_place`` per place, place by place) and ``class``."""
    from ldm.eval.toy import colour_drift, predict, prior_drift, scores
    places = [b for b in SUBJECT_PLACES for _ in range(per_place)]
    subject = sample(model, [f"photo of a {token} {class_word} {tw.PLACES[b]}" for b in places], seed, *sampling)
    result = scores(subject, places, classifier)
    class_prompts = per_place * len(SUBJECT_PLACES) * [f"photo of a {class_word}"]
    class_images = sample(model, class_prompts, seed + 1, *sampling)
    drift = prior_drift(class_images, classifier)
    p = predict(classifier, subject)
    out = {"subject_fidelity": round(result["subject_fidelity"], 3),
           "prompt_fidelity": round(result["prompt_fidelity"], 3),
           "prior_drift": round(drift, 3),
           "subject_detected": round(float((p["subject"] > 0.5).float().mean()), 3)}
    if pictures is not None:
        pictures["subject"], pictures["class"] = subject, class_images
    if base is not None:
        reference = sample(base, class_prompts, seed + 1, *sampling) if base_class_images is None \
            else base_class_images
        out["colour_drift"] = round(colour_drift(reference, class_images), 3)
        other_seed = sample(base, class_prompts, seed + 2, *sampling)
        out["colour_drift_base_seeds"] = round(colour_drift(reference, other_seed), 3)
    return out


def score_model(ckpt: str | Path, classifier_path: str | Path, config: Optional[str | Path] = None) -> dict:
    """What scripts/train_toy_model.py records in the manifest for a packed model."""
    from ldm.eval.toy import load_classifier
    model = load_toy_model(ckpt, config or TOY_CONFIG)
    classifier = load_classifier(classifier_path)
    out = {"world": world_scores(model, classifier),
           "world_at_the_demos_sampling": world_scores(model, classifier, sampling=DEMO_SAMPLING),
           "before_dreambooth": dreambooth_scores(model, classifier)}
    if getattr(classifier, "full", False):
        out["colours"] = colour_scores(model, classifier)
    return out
