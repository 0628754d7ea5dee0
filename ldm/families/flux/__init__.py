"""FLUX.1 [dev] and [schnell] (Black Forest Labs 2024): a 12 B rectified-flow transformer over 16-channel latents,
conditioned on T5 v1.1 XXL's tokens and CLIP ViT-L's pooled vector (and, for dev, the distilled guidance strength).

Released as separate files, each in its own layout (``ldm/reference``): ``flux1-dev.safetensors`` /
``flux1-schnell.safetensors`` (the transformer alone, Black Forest Labs' names; ComfyUI's saves carry the
``model.diffusion_model.`` prefix), ``ae.safetensors`` (the SD autoencoder's names, 16 channels, no quant convs),
the T5 encoder in transformers' layout and CLIP-L's text model. Inside the model they sit at
``model.diffusion_model.``, ``first_stage_model.``, ``conditioner.embedders.1.transformer.`` and
``conditioner.embedders.0.transformer.``; ``--ae``, ``--t5`` and ``--clip`` name the files (``components``).

Its parts: the configs ``configs/flux/``; the networks ``modules/`` (``transformer.py``, ``t5.py``); the flow
objective and sampler, shared with any rectified-flow family (``ldm/models/diffusion/objectives.py``,
``ldm/sampling/flow.py``); LoRA files under sd-scripts' FLUX names (``lora_unet_double_blocks_0_img_attn_qkv``,
``lora_te1_`` for CLIP, ``lora_te3_`` for T5).
"""
from __future__ import annotations

from ldm.families.base import UNET, Family, Shapes, strip_prefix

T5 = "conditioner.embedders.1.transformer."
CLIP = "conditioner.embedders.0.transformer."
MARK = "double_blocks.0.img_attn.qkv.weight"
GUIDANCE = "guidance_in.in_layer.weight"


def _keys(guidance: bool):
    def matches(shapes: Shapes) -> bool:
        bare = strip_prefix(shapes, UNET)
        return MARK in bare and (GUIDANCE in bare) == guidance
    return matches


def _config(guidance: bool):
    def matches(params) -> bool:
        unet = params["unet_config"]
        return str(unet["target"]).endswith("flux_transformer") and \
            bool(unet.get("params", {}).get("guidance_embed", True)) == guidance
    return matches


COMMON = dict(package="flux", lora_prefixes={UNET: "lora_unet_", CLIP: "lora_te1_", T5: "lora_te3_"},
              lora_unet_names="original", inference_prefixes=(UNET, "first_stage_model.", "conditioner."),
              schedule_in_file=False, components={"ae": "first_stage_model.", "t5": T5, "clip": CLIP},
              bare_prefix=UNET, tied_keys={T5 + "shared.weight": T5 + "encoder.embed_tokens.weight"},
              config_flags={"t5_tokenizer": "model.params.conditioner_config.params.emb_models.1.params."
                                            "tokenizer_path"})
FAMILIES = (
    Family("flux-dev", "FLUX.1 [dev]", "flux/flux1-dev-inference.yaml", "flux-1-dev",
           matches_keys=_keys(True), matches_config=_config(True),
           sampling_defaults={"ddim_steps": 28, "scale": 1.0, "guidance": 3.5}, **COMMON),
    Family("flux-schnell", "FLUX.1 [schnell]", "flux/flux1-schnell-inference.yaml", "flux-1-schnell",
           matches_keys=_keys(False), matches_config=_config(False),
           sampling_defaults={"ddim_steps": 4, "scale": 1.0}, **COMMON),
)
