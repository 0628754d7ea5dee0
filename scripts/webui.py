#!/usr/bin/env python
"""The local web UI (Gradio): train, generate, inpaint, and prune/convert/merge models in a browser.

    python scripts/webui.py            # then open http://127.0.0.1:7860

``python scripts/webui.py --help`` lists the folders it uses and how to serve other machines (with a password).
The same command is installed as ``dreambooth-webui``; the code is ``ldm/webui/``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.webui.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
