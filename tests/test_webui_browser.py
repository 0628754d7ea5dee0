"""The web UI in a real browser, as a person uses it, on the tiny model (about two minutes on a 2-core CPU).

Starts ``scripts/webui.py`` on a free port and drives Debian's headless Chromium through selenium: upload the six
demo pictures, type the class and identifier, start a short training, stop it and resume it, see the progress
reach the end with the loss plot and a validation grid, generate two images, send one to inpaint, paint a mask,
inpaint, prune the checkpoint; then check the files on disk and their PNG metadata. A screenshot of each tab is
written to ``<pytest tmp>/webui/screenshots`` (and to ``$WEBUI_SCREENSHOTS`` when set; the README's copies are
in ``assets/webui/``). A browser that cannot start fails the test.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time

import pytest
from PIL import Image

from ldm.data.image_loading import load_image
from webui_browser import REPO, Page, free_port, start_app, start_browser

SUBJECT = REPO / "assets" / "demo" / "subject"
STEPS = 60
# Enough class images that their phase lasts over 10 s even on an idle machine (0.44 s an image on the 2-core CPU):
# the page, refreshed every 1.5 s, shows it, and the run is still in it or training when the queue is tried.
CLASS_IMAGES = 32


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    dirs = {name: root / name for name in ("models", "logs", "data")}
    env = dict(os.environ, OMP_NUM_THREADS="1", DREAMBOOTH_WEBUI_EXTRA_SCRIPTS=str(REPO / "tests/webui_standins"))
    port = free_port()
    app = start_app(port, dirs["models"], dirs["logs"], dirs["data"], root / "app.log", env)
    driver = None
    try:
        driver = start_browser(root / "chrome-profile")
        driver.get(f"http://127.0.0.1:{port}/")
        p = Page(driver, root / "screenshots")
        p.root, p.dirs = root, dirs
        p.wait(lambda: p.el("start"), "the page")
        yield p
    finally:
        if driver is not None:
            driver.quit()
        app.send_signal(signal.SIGINT)
        try:
            app.wait(20)
        except Exception:  # noqa: BLE001
            app.kill()
        for child in sorted((dirs["logs"] / ".webui-jobs").glob("*.json")):
            print(child.read_text())
        target = os.environ.get("WEBUI_SCREENSHOTS")
        if target:
            shutil.copytree(root / "screenshots", target, dirs_exist_ok=True)
        print(f"screenshots: {root / 'screenshots'}")


def progress(p: Page) -> dict:
    el = p.el("train-progress")
    return {k: el.get_attribute(f"data-{k}") for k in ("state", "step", "max", "phase")}


def test_train_generate_inpaint_in_a_browser(page: Page):
    p, tic = page, time.time()
    # 1. Photos, as a careless user adds them: a broken file (the training loader's own message, said once), one
    # photo, then all six (that one again among them). The folder holds exactly the six listed, each once;
    # removing one from the list removes it from the folder, adding it back brings it back.
    bad = p.root / "holiday.png"
    bad.write_bytes(b"not a picture")
    with pytest.raises(ValueError) as loader_error:
        load_image(bad, 64)
    photos = [q for q in sorted(SUBJECT.glob("*.png")) if not q.name.endswith(".mask.png")]
    upload_files(p, [bad])
    p.wait(lambda: str(loader_error.value).replace(str(bad), "holiday.png") in p.text("upload-report"),
           "the loader's error for the broken file")
    upload_files(p, photos[:1])
    p.wait(lambda: "✓ 1 photo in" in p.text("upload-report"), "the one photo")
    p.fill("class-word", "robot")
    p.click("start")  # one photo: below the recipe's minimum, refused until the user says so
    p.wait(lambda: "1 photo; Tiny demo model (toy, CPU) wants at least 5" in p.text("train-status"),
           "the one-photo refusal")
    upload_files(p, photos)
    p.wait(lambda: "✓ 6 photos in" in p.text("upload-report"), "the upload report")
    assert "holiday" not in p.text("upload-report") and "robot-00.png twice: kept once" in p.text("upload-report")
    (folder,) = (p.dirs["data"] / "uploads").iterdir()
    assert sorted(f.name for f in folder.iterdir()) == [f.name for f in photos] == listed_files(p)
    p.d.execute_script("arguments[0].click();", p.els("photos-upload", "td[aria-label='robot-03.png'] ~ td button")[0])
    p.wait(lambda: "✓ 5 photos in" in p.text("upload-report"), "the removal")
    assert sorted(f.name for f in folder.iterdir()) == [f.name for f in photos if f.name != "robot-03.png"]
    upload_files(p, [photos[3]])
    p.wait(lambda: "✓ 6 photos in" in p.text("upload-report"), "the photo back")
    assert sorted(f.name for f in folder.iterdir()) == [f.name for f in photos] == sorted(listed_files(p))
    assert p.el("photo-folder", "input").get_attribute("value").endswith(folder.name)
    # Each photo has a thumbnail; one gets its own caption (photo.txt, which training reads).
    p.wait(lambda: len(p.images("photo-thumbs")) == 6, "the thumbnails")
    p.images("photo-thumbs")[1].click()
    p.wait(lambda: "editing robot-01.png" in p.text("photo-note"), "the chosen photo")
    p.fill("photo-caption", "photo of a sks robot waving")
    p.click("save-photo")
    p.wait(lambda: "✓ robot-01.png: caption" in p.text("photo-note"), "the caption saved")
    assert (folder / "robot-01.txt").read_text().strip() == "photo of a sks robot waving"

    # 2. Subject: the identifier's warnings follow the typing.
    p.fill("class-word", "robot")
    p.fill("identifier", "dog")
    p.wait(lambda: "frequent word" in p.text("identifier-warnings"), "the frequent-word warning")
    p.fill("identifier", "sks")
    p.wait(lambda: "photo of a sks robot" in p.text("identifier-warnings")
           and "frequent" not in p.text("identifier-warnings"), "the warning to go")

    # 3. Before any training, Generate offers the shipped toy model (to compare before and after).
    p.tab("Generate")
    p.wait(lambda: "(shipped)" in p.el("gen-ckpt", "input").get_attribute("value"), "the shipped model offered")
    p.tab("Train")

    # A short run with prior preservation; a second Start while it runs is refused. The class images are a phase
    # of their own, with their count and time left.
    p.fill("steps", STEPS)
    p.fill("class-images", CLASS_IMAGES)
    p.fill("grid-every", 20)
    # What Start will run, and how long and how much memory it should take, before Start.
    p.wait(lambda: "python main.py" in field(p, "train-command").get_attribute("value")
           and f"--max_steps={STEPS}" in field(p, "train-command").get_attribute("value"), "the command line")
    p.wait(lambda: f"Estimate for {STEPS} steps: about" in p.text("train-estimate"), "the estimate")
    p.click("start")
    p.wait(lambda: "Started" in p.text("train-status"), "the start message")
    p.wait(lambda: progress(p)["phase"] == "class images" and re.search(rf"class images \d+ / {CLASS_IMAGES}",
                                                                           p.text("train-progress")),
           "the class-image phase", 90, poll=0.1)
    p.click("start")
    p.wait(lambda: "Not started" in p.text("train-status") and "is running" in p.text("train-status"),
           "the second start to be refused")
    # Another run waits in the queue while this one runs; it can be taken out before it starts.
    p.click("queue")
    p.wait(lambda: "Queued sks_robot" in p.text("train-status") and progress(p)["state"] == "queued", "the queue")
    p.wait(lambda: p.el("stop").text == "Remove from queue", "the remove button")
    p.click("stop")
    p.wait(lambda: "Removed sks_robot from the queue" in p.text("train-status"), "the run out of the queue")

    # 4. Stop once it trains, then resume: the run ends at its step limit.
    p.wait(lambda: progress(p)["state"] == "running" and progress(p)["phase"] == "training"
           and int(progress(p)["step"]) >= 1, "training steps", 120)
    p.click("stop")
    p.wait(lambda: progress(p)["state"] == "stopped", "the run to stop", 120)  # it saves a 0.12 GB last.ckpt
    assert "left" not in p.text("train-progress")  # a stopped run has no time left
    run = next(d for d in p.dirs["logs"].iterdir() if (d / "configs").is_dir())
    assert (run / "checkpoints" / "last.ckpt").is_file()
    p.wait(lambda: [json.loads(f.read_text())["returncode"] for f in (p.dirs["logs"] / ".webui-jobs").glob("*.json")]
           == [143], "main.py's exit code after SIGTERM")
    p.click("resume")
    p.wait(lambda: "Resuming" in p.text("train-status"), "the resume message")
    p.tab("Generate")  # while it trains, Generate says the device is busy (not "none chosen")
    p.click("generate")
    p.wait(lambda: "The device is busy: training run sks_robot is running" in p.text("gen-status"), "the busy device")
    p.tab("Train")
    # A reload while it runs: the form shows the run's own settings, read-only, and no stale message.
    p.d.refresh()
    p.wait(lambda: p.el("start"), "the page again")
    p.wait(lambda: field(p, "class-word").get_attribute("value") == "robot"
           and field(p, "steps").get_attribute("value") == str(STEPS) and not field(p, "steps").is_enabled(),
           "the run's settings, read-only", 30)
    assert "read-only while it runs" in p.text("form-note") and p.text("train-status") == ""
    p.wait(lambda: progress(p)["state"] == "finished", "the resumed run to finish", 120)
    assert progress(p)["step"] == progress(p)["max"] == str(STEPS)
    assert "steps/s" in p.text("train-progress") or "s/step" in p.text("train-progress")
    p.wait(lambda: plotted_lines(p) == 2, "the loss plot's subject and prior lines", 30)
    p.wait(lambda: len(p.images("grids")) >= 2, "the validation grids")
    assert "rows: photo of a sks robot" in p.text("grids")  # each grid says its prompts
    p.wait(lambda: p.el("steps", "input").is_enabled(), "the form to be the user's again", 10)
    log = p.el("run-log", "textarea").get_attribute("value")  # the project's lines, not Lightning's banners
    assert "Run folder:" in log and "Done:" in log
    assert not any(noise in log for noise in ("litlogger", "site-packages", "GPU available", "Epoch 0:"))
    p.screenshot("train")
    p.click("raw-log")
    p.wait(lambda: "`Trainer.fit` stopped" in p.el("run-log", "textarea").get_attribute("value"), "the raw output")

    # 5. Generate two images from the run's checkpoint; the picker names run, file, step and size, and each
    # result shows its settings.
    p.tab("Generate")
    p.click("gen-refresh")
    p.wait(lambda: re.search(r"^(last|best)\.ckpt · step \d+ · [\d.]+ [MG]B · .*_sks_robot$",
                             p.el("gen-ckpt", "input").get_attribute("value")), "the run's checkpoint in the picker")
    p.fill("gen-prompt", "photo of a sks robot")
    p.fill("gen-steps", 10)
    p.click("generate")
    p.wait(lambda: "2 images" in p.text("gen-status"), "generation", 120)
    p.wait(lambda: len(p.images("gen-gallery")) >= 2, "the results in the gallery")
    p.wait(lambda: "seed 42, image 1 · 10 steps" in p.text("gen-gallery"), "the settings under the results")
    p.wait(lambda: len(p.els("gen-download", "a")) >= 2, "the download links")
    p.screenshot("generate")

    # 6. Send the first to inpaint with the button under the results, paint a mask over its middle, inpaint.
    p.click("send-to-inpaint")
    p.wait(lambda: p.el("inp-editor").is_displayed() and "robot" in p.el("inp-prompt", "textarea").get_attribute(
        "value"), "the inpaint tab with the picture")
    paint_stroke(p)
    p.fill("inp-steps", 10)
    p.click("inpaint")
    p.wait(lambda: "inpainting:" in p.text("inp-status"), "inpainting", 120)
    p.wait(lambda: p.images("inp-gallery") and p.images("inp-original"), "the result beside the original")
    p.screenshot("inpaint")

    # PNG info reads a result's settings back.
    p.tab("PNG info")
    first = sorted((p.dirs["data"] / "outputs" / "txt2img" / "samples").glob("*.png"))[0]
    p.el("png-info-image", "input[type=file]").send_keys(str(first))
    p.wait(lambda: "photo of a sks robot" in p.text("png-info") and "seed" in p.text("png-info"), "PNG info")

    # 7. Prune the run's checkpoint; the size is shown.
    p.tab("Models")
    p.click("models-refresh")
    p.wait(lambda: p.el("models-ckpt", "input").get_attribute("value").endswith("_sks_robot"), "the run's checkpoint")
    p.click("prune")
    p.wait(lambda: "wrote" in p.text("models-result") and "MB" in p.text("models-result"), "pruning", 120)
    p.wait(lambda: p.els("models-download", "a"), "the pruned file's download link")
    p.click("prune")  # again: the page offers its own choice, not a command-line flag
    p.wait(lambda: "tick 'replace a file of the same name'" in p.text("models-result"), "the overwrite choice")
    assert "--overwrite" not in p.text("models-result")
    p.click("models-overwrite")
    p.click("prune")
    p.wait(lambda: "wrote" in p.text("models-result"), "pruning over the old file", 120)
    p.screenshot("models")

    # The files, as the scripts write them.
    samples = sorted((p.dirs["data"] / "outputs" / "txt2img" / "samples").glob("*.png"))
    assert len(samples) == 2 and (p.dirs["data"] / "outputs" / "txt2img" / "grid-0000.png").is_file()
    meta = Image.open(samples[0]).text
    assert meta["prompt"] == "photo of a sks robot" and meta["steps"] == "10" and meta["checkpoint"] == "last.ckpt"
    inpainted = sorted((p.dirs["data"] / "outputs" / "inpaint" / "samples").glob("*.png"))
    assert len(inpainted) == 2
    meta = Image.open(inpainted[0]).text
    assert meta["prompt"] == "photo of a sks robot" and meta["mask"] == "00000-mask.png"
    mask = Image.open(p.dirs["data"] / "outputs" / "inpaint-inputs" / "00000-mask.png")
    assert 0 < sum(v > 0 for v in mask.getdata()) < mask.width * mask.height  # the stroke, not all or nothing
    assert list(p.dirs["models"].glob(f"{run.name}-*-pruned-fp16.safetensors"))  # the run's, not the shipped model

    # A reload shows the run as it is on disk.
    p.d.refresh()
    p.wait(lambda: progress(p)["state"] == "finished" and run.name in p.text("train-progress"),
           "the run after a reload")
    print(f"browser test: {time.time() - tic:.0f} s")


def field(p: Page, elem_id: str):
    """The text or number field of a component."""
    return p.d.find_element(p.By.CSS_SELECTOR, f"#{elem_id} input:not([type=checkbox]), #{elem_id} textarea")


def upload_files(p: Page, files) -> None:
    p.el("photos-upload", "input[type=file]").send_keys("\n".join(str(f) for f in files))


def listed_files(p: Page) -> list[str]:
    """The file names the upload list shows."""
    return [td.get_attribute("aria-label") for td in p.els("photos-upload", "td.filename")]


def plotted_lines(p: Page) -> int:
    """How many series (subject, prior) the loss plot draws: Vega's SVG line marks with a path, by colour."""
    return p.d.execute_script("""
        const paths = document.querySelectorAll('#loss-plot g[class*=mark-line] path');
        return new Set(Array.from(paths).filter(e => (e.getAttribute('d') || '').length > 10)
                                       .map(e => e.getAttribute('stroke'))).size;""")


def paint_stroke(p: Page) -> None:
    """A brush stroke across the middle of the editor's canvas."""
    from selenium.webdriver.common.action_chains import ActionChains
    canvas = p.wait(lambda: [c for c in p.els("inp-editor", "canvas") if c.size["width"] > 50], "the canvas")[0]
    p.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", canvas)
    ActionChains(p.d).move_to_element(canvas).click_and_hold().move_by_offset(40, 0).move_by_offset(0, 30) \
        .move_by_offset(-40, 0).release().perform()
