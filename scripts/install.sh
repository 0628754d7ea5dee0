#!/usr/bin/env bash
# Create .venv with everything this project needs, on a fresh machine, without pulling a CUDA build of torch
# where none is wanted: torch is installed first, so nothing later asks for another build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# Only package data is used from these two (the CLIP BPE vocabulary, the LPIPS linear weights); their own
# requirements would pull torchvision.
python -m pip install -q --no-deps open_clip_torch lpips
python -m pip install -q -e ".[test,webui,webui-test]"
# The web UI's browser test (tests/test_webui_browser.py) drives Debian's chromium through selenium; a browser is
# never downloaded at run time, so install the distribution's packages when they are missing.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if command -v apt-get >/dev/null; then
        as_root=""; [ "$(id -u)" = 0 ] || as_root="sudo"
        $as_root apt-get update -q && $as_root apt-get install -y -q chromium chromium-driver
    else
        echo "install chromium and chromedriver (the web UI's browser test needs them)" >&2
    fi
fi
# DeepSpeed's CPU AdamW (ZeRO-Offload, tests/test_lean.py) is a C++ op compiled on first use: compile it now, into
# the environment, so that no training run or test waits minutes for it.
python -c "from ldm.optim.build import build_cpu_adam; build_cpu_adam()" ||
    echo "DeepSpeed's CPU AdamW op did not compile (a C++ compiler is needed for ZeRO-Offload); continuing" >&2
python -c "import torch, pytorch_lightning; print(f'installed: torch {torch.__version__}, lightning {pytorch_lightning.__version__}')"
