#!/usr/bin/env bash
# GPU figures for the README ("Training on small GPUs", "FLUX.1"): it/s and max_memory_allocated of one DreamBooth
# step for
#   sd:   SD v1 full fine-tune with the text encoder, SD v1 LoRA, SDXL LoRA at 1024 px, SDXL full UNet fine-tune,
#         each as the reference recipe and with the lean switches (fused backward, bf16 weights, 8-bit AdamW,
#         gradient checkpointing, cached latents; bf16 autocast as precision auto chooses on such a GPU);
#   flux: FLUX.1 [dev] at 1024 px: the LoRA recipe (rank 16, frozen weights bf16, latents and T5/CLIP cached), then
#         with fp8 weights, with block swap, with maximum swap and fp8 T5 (the 12 GB and 8 GB targets), and the
#         full fine-tune of the transformer with the lean switches (block swap moves frozen weights only, so it
#         has nothing to move there: 12 B trained bf16 weights are 24 GB before any optimizer state).
#
#   bash scripts/gpu_benchmark.sh            # both; sd under 8 minutes, flux under 9 on an H100/H200-class GPU
#   bash scripts/gpu_benchmark.sh flux       # one part (sd | flux | all)
#   OUT=somewhere PYTHON=.venv/bin/python bash scripts/gpu_benchmark.sh
#
# Random full-size weights (built from the configs), one subject and one class image of random pixels: nothing is
# downloaded. Each row runs in a fresh process (benchmarks/harness.py); the tables, the JSON files and a summary
# go to $OUT (default gpu-benchmark/). Without a CUDA GPU it stops at once with one line.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-gpu-benchmark}
PART=${1:-all}
case $PART in sd|flux|all) ;; *) echo "gpu_benchmark.sh: part '$PART' is none of sd, flux, all" >&2; exit 2 ;; esac

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_benchmark.sh: needs a CUDA GPU and a CUDA build of torch (torch.cuda.is_available() is False here); nothing was run" >&2
    exit 2
fi
mkdir -p "$OUT"
start=$SECONDS

# name, time limit (s; the four add up to 470), then the benchmark's flags. Most of an SDXL row is building its
# 3.5 B random parameters on the CPU (tens of seconds) before the timed steps.
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$PYTHON" scripts/benchmark.py --suite dreambooth --device cuda --markdown \
        --json "$OUT/$name.json" "$@" | tee "$OUT/$name.md" || echo "== $name: failed or over $limit s"
}

if [ "$PART" != flux ]; then
    LEAN=ckpt+8bit+mixed+cached+fused+bf16w
    run v1-full 90 --config v1 --size 512 --warmup 2 --repeat 5 --variants "full+ckpt+mixed,full+$LEAN"
    run v1-lora 70 --config v1 --size 512 --warmup 2 --repeat 5 --variants "lora4+ckpt+mixed,lora4+$LEAN"
    run sdxl-lora 180 --config sdxl --size 1024 --warmup 1 --repeat 3 \
        --variants "lora4+ckpt+8bit+mixed+cached,lora4+$LEAN"
    run sdxl-unet 130 --config sdxl --size 1024 --warmup 1 --repeat 3 --variants "unet+$LEAN"
fi
if [ "$PART" != sd ]; then
    # FLUX.1 [dev] has 19 + 38 blocks: swap56 keeps one on the GPU. Each row builds 17 B random parameters on the
    # host (quick_random_init) before its steps; the LoRA rows run one after another (--jobs 1: host memory).
    RECIPE=lora16+ckpt+8bit+bf16+cached
    run flux-lora 330 --config flux-dev --size 1024 --warmup 1 --repeat 3 --jobs 1 --variants \
        "$RECIPE,lora16+ckpt+8bit+fp8+cached,$RECIPE+swap20,lora16+ckpt+8bit+fp8+fp8t5+cached+swap56"
    run flux-full 200 --config flux-dev --size 1024 --warmup 1 --repeat 2 --jobs 1 \
        --variants "unet+ckpt+8bit+bf16+cached+fused+bf16w"
fi

"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
print("\nSummary (one DreamBooth step, batch 1 subject + 1 class image; memory = torch.cuda.max_memory_allocated):")
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    data = json.loads(path.read_text())
    for r in data["results"]:
        if "median_s" in r:
            print(f"  {path.stem:10} {r['variant']:42} {1 / r['median_s']:7.2f} it/s  "
                  f"{r['peak_bytes'] / 2**30:7.2f} GiB  ({r['device_name']}, {r['size']} px)")
        else:
            print(f"  {path.stem:10} {r['variant']:42} failed: {r.get('error', '?')}")
EOF
echo "gpu_benchmark.sh: $((SECONDS - start)) s; tables and JSON in $OUT/"
