"""Helpers of the web UI's browser test: start the app on a free port, start Debian's headless Chromium through
selenium (never a downloaded browser), and act on Gradio's components by their ``elem_id`` as a person would."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional, TypeVar

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1100"]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, model_dir: Path, log_dir: Path, data_dir: Path, out: Path,
              env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    """``scripts/webui.py`` on ``port``; returns once the page answers (its output goes to ``out``)."""
    log = open(out, "wb")
    app = subprocess.Popen([sys.executable, str(REPO / "scripts/webui.py"), "--model-dir", str(model_dir),
                            "--log-dir", str(log_dir), "--data-dir", str(data_dir), "--port", str(port)],
                           cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if app.poll() is not None:
            raise RuntimeError(f"the web UI exited with {app.returncode}: {out.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return app
        except OSError:
            time.sleep(0.5)
    app.terminate()
    raise RuntimeError(f"the web UI did not answer within 120 s: {out.read_text()[-2000:]}")


def start_browser(profile: Path):
    """Debian's chromium + chromedriver; a missing or broken browser is an error, not a skip."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() or shutil.which(path)):
            raise RuntimeError(f"{path} not found: install Debian's chromium and chromium-driver "
                               f"(scripts/install.sh does, with apt-get)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


class Page:
    """A Gradio page driven by element ids."""

    def __init__(self, driver, shots: Path):
        from selenium.webdriver.common.by import By
        self.d, self.By, self.shots = driver, By, shots

    def wait(self, check: Callable[[], T], what: str, timeout: float = 60.0, poll: float = 0.3) -> T:
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            try:
                value = check()
            except Exception as e:  # noqa: BLE001 - the page is still changing; try again
                value, last = None, e
            if value:
                return value
            time.sleep(poll)
        self.screenshot(f"failed-{what.replace(' ', '-')[:40]}")
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})"
                                                                                          if last else ""))

    def el(self, elem_id: str, css: str = ""):
        return self.d.find_element(self.By.CSS_SELECTOR, f"#{elem_id} {css}".strip())

    def els(self, elem_id: str, css: str):
        return self.d.find_elements(self.By.CSS_SELECTOR, f"#{elem_id} {css}")

    def text(self, elem_id: str) -> str:
        return self.el(elem_id).text

    def click(self, elem_id: str) -> None:
        element = self.wait(lambda: (e := self.el(elem_id)).is_enabled() and e, f"#{elem_id} enabled")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        element.click()

    def fill(self, elem_id: str, value: object) -> None:
        """Type into the text or number field of a component, then leave it (Gradio updates on input/blur)."""
        from selenium.webdriver.common.keys import Keys
        field = self.d.find_element(self.By.CSS_SELECTOR, f"#{elem_id} input:not([type=checkbox]):not([type=range]),"
                                                          f" #{elem_id} textarea")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", field)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        field.send_keys(str(value))
        field.send_keys(Keys.TAB)

    def tab(self, label: str) -> None:
        buttons = self.d.find_elements(self.By.CSS_SELECTOR, "button[role=tab]")
        next(b for b in buttons if b.text.strip() == label).click()

    def images(self, elem_id: str) -> list:
        return [i for i in self.els(elem_id, "img") if i.get_attribute("src")]

    def screenshot(self, name: str) -> Path:
        """The whole page: the window is made as tall as the page first."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.d.set_window_size(1400, 1000)
        self.d.execute_script("window.scrollTo(0, 0);")
        height = self.d.execute_script("return document.documentElement.scrollHeight;")
        self.d.set_window_size(1400, min(int(height) + 140, 4000))
        time.sleep(1.0)  # plots redraw at the new size
        self.d.save_screenshot(str(path))
        return path
