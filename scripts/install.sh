#!/usr/bin/env bash
# Create .venv with everything this project needs, on a fresh machine, without pulling a CUDA build of torch
# where none is wanted: torch is installed first, so nothing later asks for another build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>/dev/null || true
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# Only the packaged CLIP BPE vocabulary is used; open_clip's own requirements would pull torchvision.
python -m pip install -q --no-deps open_clip_torch
python -m pip install -q -e ".[test]"
python -c "import torch, pytorch_lightning; print(f'installed: torch {torch.__version__}, lightning {pytorch_lightning.__version__}')"
