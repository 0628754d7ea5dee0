"""``dreambooth-webui`` / ``python scripts/webui.py``: the command line of the web UI.

    python scripts/webui.py                                   # http://127.0.0.1:7860, this machine only
    python scripts/webui.py --listen --auth me:secret         # other machines too, behind a password

The UI reads checkpoints from ``--model-dir`` (and the runs in ``--log-dir``), writes runs to ``--log-dir``, and
keeps uploaded photos, class images and generated pictures in ``--data-dir``; no field of the page can name a
path outside these three. ``--listen`` serves every network interface and refuses to start without a password.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

LOCAL_HOST = "127.0.0.1"
ALL_HOSTS = "0.0.0.0"


class AuthError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreambooth-webui", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="models", help="starting checkpoints and LoRA files (read; the Models "
                   "tab writes its results here)")
    p.add_argument("--log-dir", default="logs", help="training runs (main.py's --logdir)")
    p.add_argument("--data-dir", default="webui-data",
                   help="uploaded photos, class images, generated and inpainted pictures")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--listen", action="store_true",
                   help=f"serve other machines too ({ALL_HOSTS}); needs --auth or --auth-file")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login")
    p.add_argument("--auth-file", default=None, type=Path,
                   help="file with one USER:PASSWORD per line (blank lines and # comments ignored)")
    return p


def parse_login(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise AuthError(f"{where}: expected USER:PASSWORD with both parts non-empty")
    return user, password


def read_auth(auth: Optional[str], auth_file: Optional[Path]) -> Optional[list[tuple[str, str]]]:
    logins = []
    if auth is not None:
        logins.append(parse_login(auth, "--auth"))
    if auth_file is not None:
        try:
            lines = auth_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise AuthError(f"--auth-file {auth_file}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        for k, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                logins.append(parse_login(line, f"--auth-file {auth_file} line {k}"))
        if not logins:
            raise AuthError(f"--auth-file {auth_file}: holds no USER:PASSWORD line")
    return logins or None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    opt = parser.parse_args(argv)
    try:
        auth = read_auth(opt.auth, opt.auth_file)
    except AuthError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if opt.listen and not auth:
        parser.exit(2, f"{parser.prog}: error: --listen serves the UI to other machines: refusing to start without "
                       f"--auth USER:PASSWORD or --auth-file FILE\n")
    if not 1 <= opt.port <= 65535:
        parser.exit(2, f"{parser.prog}: error: --port {opt.port}: must be between 1 and 65535\n")
    from ldm.webui.recipes import REPO
    if not (REPO / "main.py").is_file():
        parser.exit(2, f"{parser.prog}: error: {REPO / 'main.py'} not found: run the UI from a checkout of the "
                       f"project (pip install -e .)\n")
    from ldm.webui.paths import Roots
    try:
        roots = Roots.create(opt.model_dir, opt.log_dir, opt.data_dir)
    except OSError as e:
        parser.exit(2, f"{parser.prog}: error: cannot create the folders: {e}\n")
    # Before Gradio is imported: its uploads go into the data folder, and it reports nothing anywhere.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(roots.data_dir / ".gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ldm.webui.app import launch
    from ldm.webui.context import WebUI
    ui = WebUI.create(roots)
    try:
        launch(ui, ALL_HOSTS if opt.listen else LOCAL_HOST, opt.port, auth)
    except OSError as e:
        parser.exit(2, f"{parser.prog}: error: cannot serve on port {opt.port}: {' '.join(str(e).split())}\n")
    running = ui.jobs.running()
    if running is not None:
        print(f"Training run {running.name} continues (pid {running.pid}); the UI shows it again when restarted.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
