#!/usr/bin/env python
"""Bake LoRA adapters into a full Stable Diffusion checkpoint (v1 or SDXL) or a FLUX.1 transformer file:
W += strength * alpha / rank * up @ down.

    python scripts/merge_lora.py sd-v1-4.ckpt lora-last.safetensors[:0.8] merged.safetensors [--fp16]
    python scripts/merge_lora.py sd_xl_base_1.0.safetensors sdxl-lora.safetensors merged-xl.safetensors
    python scripts/merge_lora.py flux1-dev.safetensors flux-lora.safetensors flux1-dev-sks.safetensors

The result loads anywhere the base checkpoint does, with no adapter support needed. Several adapters may be
given; they are added one after the other. SDXL's second text encoder keeps q, k and v in one packed
``in_proj_weight``: a kohya ``lora_te2_..._self_attn_q_proj`` (``k_proj``, ``v_proj``) adapter goes into its
first (second, third) third of the rows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from ldm.files import DiskFullError, OutputError, check_output  # noqa: E402
from ldm.weights.checkpoint import CheckpointError, bake_adapters, read_checkpoint, refuse_nonfinite, save_checkpoint  # noqa: E402,E501
from ldm.weights.lora import merge_lora, parse_lora_spec, read_lora  # noqa: E402


def released_network(sd: dict) -> str:
    """The prefix to put before ``sd``'s keys when it is a network file as a family releases it alone (FLUX.1's
    transformer: ``model.diffusion_model.``), else ""."""
    from ldm.families import FAMILIES, detect_family
    family = FAMILIES.get(detect_family({k: tuple(v.shape) for k, v in sd.items()}))
    bare = family.bare_prefix if family else ""
    return bare if bare and not any(k.startswith(bare) for k in sd) else ""


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="full SD v1 or SDXL checkpoint, or a FLUX.1 transformer (.ckpt or .safetensors)")
    p.add_argument("lora", nargs="+", help="adapter file(s), each FILE[:STRENGTH]")
    p.add_argument("out", help="output checkpoint (.ckpt or .safetensors)")
    p.add_argument("--fp16", action="store_true", help="write half-precision weights")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")
    args = p.parse_args(argv)
    try:
        inputs = [args.base] + [parse_lora_spec(spec)[0] for spec in args.lora]
        check_output(args.out, inputs, "out", overwrite=args.overwrite)
        sd, meta = read_checkpoint(args.base)
        sd, _ = bake_adapters(sd, meta, args.base)  # a LoRA run's last.ckpt: its own adapters first
        bare = released_network(sd)  # FLUX.1's transformer file: its keys without the model's prefix
        sd = {bare + k: v for k, v in sd.items()} if bare else sd
        if not any(k.startswith("model.diffusion_model.") for k in sd):
            raise CheckpointError(f"{args.base}: not a full Stable Diffusion checkpoint (no model.diffusion_model.* "
                                  f"keys), nor a FLUX.1 transformer")
        for spec in args.lora:
            path, strength, lora = read_lora(spec)
            try:
                sd = merge_lora(sd, lora, strength)
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from None
            print(f"merged {path} at strength {strength}")
        sd = {k[len(bare):]: v for k, v in sd.items()} if bare else sd  # written back in the base's layout
        if args.fp16:
            sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
        refuse_nonfinite(sd, f"{args.base} merged with {', '.join(args.lora)}" + " in float16" * args.fp16)
        out = save_checkpoint(args.out, sd, global_step=meta.get("global_step"))
    except (CheckpointError, OutputError, DiskFullError, ValueError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
