"""The web UI's guards, without a browser: --listen needs a login, no field reaches outside the three folders,
uploads get the training loader's own errors, one job on the device at a time, and the commands it builds pass
main.py's own checks."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from PIL import Image

from conftest import REPO
from helpers import make_folder
from ldm.data.image_loading import load_image
from ldm.webui import recipes as rc
from ldm.webui import runs
from ldm.webui.jobs import DeviceBusy, JobManager, JobRecord, outcome_from_output
from ldm.webui.paths import PathRefused, Roots, inside, safe_name
from ldm.webui.uploads import MAX_FILES, UploadError, sync_photos


def wait_until(done, seconds: float) -> None:
    """Poll ``done()`` every 0.1 s until it is true or ``seconds`` have passed (the caller asserts what it needs)."""
    deadline = time.time() + seconds
    while not done() and time.time() < deadline:
        time.sleep(0.1)


@pytest.fixture
def roots(tmp_path) -> Roots:
    return Roots.create(tmp_path / "models", tmp_path / "logs", tmp_path / "data")


@pytest.fixture
def ui(roots):
    from ldm.webui.context import WebUI
    return WebUI(roots, JobManager(roots.log_dir, REPO), cuda=False)


# ---- the command line ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, expected", [
    (["--listen"], "--listen serves the UI to other machines: refusing to start without --auth USER:PASSWORD or "
                   "--auth-file FILE"),
    (["--listen", "--auth", "admin"], "--auth: expected USER:PASSWORD with both parts non-empty"),
    (["--auth-file", "missing.txt"], "--auth-file missing.txt: cannot read it (No such file or directory)"),
])
def test_bad_command_lines_refuse_to_start_with_one_line(tmp_path, flags, expected):
    done = subprocess.run([sys.executable, str(REPO / "scripts/webui.py"), *flags, "--model-dir",
                           str(tmp_path / "m"), "--log-dir", str(tmp_path / "l"), "--data-dir", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"dreambooth-webui: error: {expected}"]
    assert not (tmp_path / "l").exists()  # refused before anything was created or served


def test_auth_file(tmp_path):
    from ldm.webui.cli import AuthError, read_auth
    good = tmp_path / "logins.txt"
    good.write_text("# who may log in\nann:s3cret:with:colons\n\nbob:pw\n")
    assert read_auth("me:x", good) == [("me", "x"), ("ann", "s3cret:with:colons"), ("bob", "pw")]
    (tmp_path / "empty.txt").write_text("# nobody\n")
    with pytest.raises(AuthError, match="holds no USER:PASSWORD line"):
        read_auth(None, tmp_path / "empty.txt")


# ---- paths ---------------------------------------------------------------------------------------------------

def test_paths_outside_the_folders_are_refused(roots, tmp_path):
    outside = tmp_path / "secret.ckpt"
    outside.write_bytes(b"x")
    (roots.model_dir / "escape.ckpt").symlink_to(outside)
    allowed = [roots.model_dir, roots.log_dir]
    for path in ["/etc/passwd", str(roots.model_dir / ".." / "secret.ckpt"), str(roots.model_dir / "escape.ckpt"),
                 "../secret.ckpt", "~/.ssh/id_rsa"]:
        with pytest.raises(PathRefused, match="outside the folders this UI may use"):
            inside(path, allowed, "checkpoint")
    (roots.model_dir / "ok.ckpt").write_bytes(b"x")
    assert inside(str(roots.model_dir / "sub" / ".." / "ok.ckpt"), allowed, "checkpoint") == roots.model_dir / "ok.ckpt"
    for empty, message in (("", "checkpoint: none chosen"), ("a\0b", "checkpoint: not a valid path")):
        with pytest.raises(PathRefused, match=message):
            inside(empty, allowed, "checkpoint")


@pytest.mark.parametrize("name, expected", [("../../.bashrc", "bashrc"), ("a b/c d.PNG", "c_d.PNG"),
                                            ("..", "file"), ("Füße é.jpg", "Fue_e.jpg"), ("x" * 300 + ".png",
                                                                                          "x" * 76 + ".png")])
def test_safe_names(name, expected):
    assert safe_name(name) == expected


def test_every_field_that_names_a_path_refuses_outside(ui, roots, tmp_path):
    from ldm.webui import generate_tab, models_tab, train_tab
    message = "outside the folders this UI may use"
    _, status = generate_tab.generate(ui, "/etc/passwd", "", 1.0, "a dog", "", 1, 10, 7.5, "ddim", "model default", 1)
    assert status.startswith("⚠ checkpoint /etc/passwd: " + message)
    (roots.model_dir / "m.ckpt").write_bytes(b"x")
    _, status = generate_tab.generate(ui, str(roots.model_dir / "m.ckpt"), "/etc/hostname", 1.0, "a dog", "", 1,
                                      10, 7.5, "ddim", "model default", 1)
    assert status.startswith("⚠ LoRA /etc/hostname: " + message)
    _, _, status = generate_tab.run_inpaint(ui, {"background": "/etc/hostname", "layers": []},
                                            str(roots.model_dir / "m.ckpt"), "a dog", "", 0.75, 4, False, 32, 1, 10,
                                            7.5, "ddim", 1)
    assert status.startswith("⚠ picture /etc/hostname: " + message)
    status, _ = train_tab.start(ui, list(rc.recipes())[-1], str(tmp_path), "dog", "sks", "", 10, 1e-4, False, 1,
                                0, 23)
    assert status.startswith(f"⚠ photo folder {tmp_path}: " + message)
    assert models_tab.prune(ui, "/etc/passwd", "")[0].startswith("⚠ checkpoint /etc/passwd: " + message)
    # A name for a new file cannot leave the model folder either.
    assert models_tab._output(ui, "../../evil.safetensors", "x") == roots.model_dir / "evil.safetensors"


# ---- uploads -------------------------------------------------------------------------------------------------

def test_a_bad_upload_shows_the_loaders_error(ui, tmp_path):
    from ldm.webui import train_tab
    browser = tmp_path / "gradio-tmp"
    make_folder(browser / "a", 5)
    bad = browser / "b" / "holiday.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a picture")
    small = browser / "c" / "thumb.png"
    small.parent.mkdir()
    Image.new("RGB", (8, 8)).save(small)
    files = sorted(str(p) for p in (browser / "a").iterdir()) + [str(bad), str(small)]
    recipe = list(rc.recipes())[-1]  # the tiny model trains at 64 px
    report, kept, folder, _ = train_tab.upload(ui, files, recipe, "dog")
    expected = []
    for path in (bad, small):  # the loader's own one-line messages, with the name the user gave the file
        with pytest.raises(ValueError) as e:
            load_image(path, 64)
        expected.append("⚠ " + str(e.value).replace(str(path), path.name))
    assert report.splitlines()[1:] == ["", expected[0], "", expected[1]]
    assert report.startswith("✓ 5 photos in data/uploads/")
    saved = Path(folder.value)
    assert sorted(p.name for p in saved.iterdir()) == [f"{i:02d}.png" for i in range(5)]
    assert saved.parent == ui.roots.uploads
    assert kept == [str(saved / f"{i:02d}.png") for i in range(5)]  # the list shows what was kept, and only that


def test_the_upload_folder_holds_exactly_the_photos_listed(ui, tmp_path, monkeypatch):
    """A broken file, one photo, then six (the one again among them) as the page's list grows: six photos, each
    once, the broken one's error said once; removing one from the list removes it from the folder; a folder a run
    trained from is left as it was (a new one takes the change)."""
    from ldm.webui import train_tab
    make_folder(tmp_path / "six", 6)
    six = sorted(str(p) for p in (tmp_path / "six").iterdir())
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"not a picture")
    recipe = list(rc.recipes())[-1]
    report, kept, picker, folder = train_tab.upload(ui, [str(bad)], recipe, "robot", None)
    assert report.startswith("⚠ holiday.png: ") and kept is None and folder is None
    report, kept, picker, folder = train_tab.upload(ui, [six[0]], recipe, "robot", folder)
    assert report.splitlines()[0] == f"✓ 1 photo in {ui.label(Path(folder))}" and "holiday" not in report
    report, kept, picker, folder2 = train_tab.upload(ui, kept + six, recipe, "robot", folder)
    assert folder2 == folder == picker.value
    assert sorted(p.name for p in Path(folder).iterdir()) == [f"{i:02d}.png" for i in range(6)]
    assert report.splitlines()[0] == f"✓ 6 photos in {ui.label(Path(folder))}"
    assert "00.png twice: kept once" in report and "holiday" not in report
    assert len(kept) == 6
    report, kept, _, folder = train_tab.upload(ui, kept[:2] + kept[3:], recipe, "robot", folder)
    assert sorted(p.name for p in Path(folder).iterdir()) == ["00.png", "01.png", "03.png", "04.png", "05.png"]
    monkeypatch.setattr(ui.jobs, "records", lambda: [SimpleNamespace(argv=["main.py", f"--data_root={folder}"])])
    _, kept2, _, folder3 = train_tab.upload(ui, kept[:4], recipe, "robot", folder)
    assert folder3 != folder and len(list(Path(folder).iterdir())) == 5 and len(list(Path(folder3).iterdir())) == 4
    _, kept, picker, gone = train_tab.upload(ui, [], recipe, "robot", folder3)
    assert gone is None and kept is None and picker.value is None and not list(Path(folder3).iterdir())


def test_each_photo_gets_its_caption_and_mask(ui, tmp_path):
    """A thumbnail's photo gets a caption (photo.txt, which the training loader reads instead of the template) and
    a mask (photo.mask.png at the photo's size, white = subject, which the loader takes for masked loss); removing
    the photo from the upload removes both."""
    from ldm.data.image_loading import load_caption, load_training_image
    from ldm.webui import train_tab
    make_folder(tmp_path / "in", 5)
    recipe = list(rc.recipes())[-1]
    _, kept, picker, folder = train_tab.upload(ui, sorted(str(p) for p in (tmp_path / "in").iterdir()), recipe,
                                               "robot", None)
    entries = train_tab.thumbnails(ui, folder)
    assert [Path(p).name for p, _ in entries] == [f"{i:02d}.png" for i in range(5)]
    assert {c for _, c in entries} == {"(template)"}
    photo, caption, mask, note = train_tab.choose_photo(ui, folder, SimpleNamespace(index=2))
    assert (Path(photo).name, caption, mask, note) == ("02.png", "", None, "editing 02.png")
    drawn = ui.roots.data_dir / "drawn.png"  # where the browser's upload lies (Gradio's folder is allowed too)
    strokes = Image.new("RGB", (16, 16))
    strokes.paste((255, 255, 255), (4, 4, 12, 12))
    strokes.save(drawn)
    status, thumbs = train_tab.save_photo(ui, folder, photo, "photo of a sks robot   waving", str(drawn))
    assert status == "✓ 02.png: caption, a mask" and thumbs[2][1] == "photo of a sks robot waving + mask"
    assert load_caption(photo) == "photo of a sks robot waving"
    loaded = load_training_image(photo, [(64, 64)], with_mask=True)
    assert loaded.mask.shape == (64, 64) and loaded.mask[32, 32] == 1.0 and loaded.mask[2, 2] == 0.0
    assert train_tab.choose_photo(ui, folder, SimpleNamespace(index=2))[1:3] == (
        "photo of a sks robot waving", str(Path(photo).with_name("02.mask.png")))
    black = ui.roots.data_dir / "black.png"
    Image.new("L", (8, 8)).save(black)
    assert train_tab.save_photo(ui, folder, photo, "x", str(black))[0] == \
        "⚠ mask for 02.png: no white (subject) pixel; white marks the subject"
    assert train_tab.save_photo(ui, folder, photo, "", None)[0] == "✓ 02.png: no caption (the template), no mask"
    assert load_caption(photo) is None and not Path(photo).with_name("02.mask.png").exists()
    train_tab.save_photo(ui, folder, photo, "photo of a sks robot", str(drawn))
    train_tab.upload(ui, kept[:2] + kept[3:], recipe, "robot", folder)
    assert sorted(p.name for p in Path(folder).iterdir()) == ["00.png", "01.png", "03.png", "04.png"]


def test_upload_names_and_limits(roots, tmp_path):
    make_folder(tmp_path / "x", 2)
    make_folder(tmp_path / "y", 1, offset=3)
    odd = tmp_path / "y" / "My Dog (1).PNG"
    (tmp_path / "y" / "00.png").rename(odd)
    make_folder(tmp_path / "z", 2, offset=7)
    (tmp_path / "z" / "01.png").rename(tmp_path / "z" / "00 copy.png")
    result = sync_photos([tmp_path / "x" / "00.png", tmp_path / "x" / "01.png", odd, tmp_path / "z" / "00.png",
                          tmp_path / "z" / "00 copy.png"], roots.uploads, "../../dog", 64)
    assert result.accepted == ["00.png", "01.png", "My_Dog_1.PNG", "00_2.png", "00_copy.png"]
    assert result.folder.parent == roots.uploads and result.folder.name.endswith("-dog")
    assert result.warnings == []
    result = sync_photos([odd], roots.uploads, "dog", 64)
    assert result.warnings == ["only 1 usable photo: DreamBooth works best with 5-30"]
    with pytest.raises(UploadError, match=f"31 files: at most {MAX_FILES} photos"):
        sync_photos([tmp_path / "x" / "00.png"] * 31, roots.uploads, "dog", 64)


def test_class_images_are_a_phase_with_its_own_progress(tiny_ckpt, tmp_path, capsys):
    """Before the run folder exists, the run's output says how many class images are made: the page shows them
    (12/50 style) with their time left, read from what generate_class_images prints."""
    from conftest import TINY_CONFIG, load_config
    from ldm.training.class_images import generate_class_images
    from ldm.weights.load import load_model_from_config
    model = load_model_from_config(load_config(TINY_CONFIG), tiny_ckpt, verbose=False).to("cpu")  # as main.py
    capsys.readouterr()
    generate_class_images(model, tmp_path / "class", "photo of a toy", 3, size=64, ddim_steps=2, batch_size=2)
    output = capsys.readouterr().out
    first = output[:output.index("\n", output.index("Class images 2/3")) + 1]
    progress = runs.output_progress(first)
    assert (progress.phase, progress.step, progress.max_steps) == ("class images", 2, 3)
    assert re.fullmatch(r"class images 2 / 3 · [\d.]+ (images/s|s/image) · .+ left, then training", progress.text())
    assert (runs.output_progress(output).step, runs.output_progress(output).max_steps) == (3, 3)
    assert runs.output_progress("Loading model ...\n").text() == "preparing: loading the model"
    assert runs.output_progress(output[:output.index("Class images 2/3")]).text() == "class images 0 / 3"
    progress.then_s = 75.0  # the training after them, from the measured rows (the page fills it in)
    assert re.fullmatch(r"class images 2 / 3 · .* left, then training \(about 1:15, estimated\)", progress.text())


RUN_OUTPUT = """Seed set to 0
Generating 4 class images for 'photo of a robot' into {repo}/data/class-images/robot (25 DDIM steps, scale 4.0)
class images:   0%|          | 0/1 [00:00<?, ?it/s]
Class images 4/4 for 'photo of a robot' (0.21 s/image)
Learning rate 2.00e-04 = 1 (devices) * 1 (batch) * 1 (accumulate) * 2.00e-04 (base)
GPU available: False, used: False
TPU available: False, using: 0 TPU cores
💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics and artifacts automatically to the Lightning Experiments platform.
Run folder: {repo}/logs/2026-12-03T19-54-15_sks_robot (config saved to {repo}/logs/2026-12-03T19-54-15_sks_robot/configs/2026-12-03T19-54-15-project.yaml)
┏━━━┳━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━┳━━━━━━━┓
┃   ┃ Name            ┃ Type             ┃ Params ┃ Mode  ┃ FLOPs ┃
│ 0 │ encoder         │ Encoder          │  371 K │ train │     0 │
└───┴─────────────────┴──────────────────┴────────┴───────┴───────┘
Trainable params: 961 K
Non-trainable params: 0
Total params: 961 K
Total estimated model params size (MB): 3.847
Modules in train mode: 133
Modules in eval mode: 0
Total FLOPs: 0
{repo}/.venv/lib/python3.11/site-packages/pytorch_lightning/utilities/_pytree.py:21: `isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead.
{repo}/ldm/models/diffusion/ddim.py:109: UserWarning: DDIM with 3 steps selects timestep 1000
  self.ddim_timesteps = make_ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps, ddim_discretize)

Epoch 0:   1%|          | 1/187 [00:00<02:29,  1.24it/s, v_num=_csv, train/loss=1.150]
Training: |          | 60/? [00:35<00:00,  1.70it/s, v_num=5-42, train/loss=0.592]
Saved validation grid images/train/step-000020.png
`Trainer.fit` stopped: `max_steps=40` reached.
Done: 40 steps in 61 s; checkpoints in {repo}/logs/2026-12-03T19-54-15_sks_robot/checkpoints
"""


def test_the_log_box_shows_the_projects_lines_and_the_raw_output_on_request(ui):
    """What main.py printed in a toy run (Lightning's banners, tip, model table and progress bars, a library's
    deprecation warning with the virtualenv's path, our warning with its source line): by default only the
    project's own lines, paths relative to the repository; the raw output behind the toggle."""
    from ldm.webui import train_tab
    output = RUN_OUTPUT.format(repo=REPO)
    shown = train_tab.log_text(ui, output, raw=False).splitlines()
    assert shown == [
        "Generating 4 class images for 'photo of a robot' into data/class-images/robot (25 DDIM steps, scale 4.0)",
        "Class images 4/4 for 'photo of a robot' (0.21 s/image)",
        "Learning rate 2.00e-04 = 1 (devices) * 1 (batch) * 1 (accumulate) * 2.00e-04 (base)",
        "Run folder: logs/2026-12-03T19-54-15_sks_robot (config saved to logs/2026-12-03T19-54-15_sks_robot/configs/"
        "2026-12-03T19-54-15-project.yaml)",
        "Saved validation grid images/train/step-000020.png",
        "Done: 40 steps in 61 s; checkpoints in logs/2026-12-03T19-54-15_sks_robot/checkpoints"]
    raw = train_tab.log_text(ui, output, raw=True)
    assert "site-packages" in raw and "Epoch 0:" in raw and len(raw.splitlines()) == train_tab.LOG_LINES
    failed = output + "Traceback (most recent call last):\n  File \"x.py\", line 1\n    boom()\nValueError: boom\n"
    assert train_tab.log_text(ui, failed, raw=False).splitlines()[-1] == "ValueError: boom"


def _field(update, name: str):
    """A value of a Gradio update, given as a dict (gr.update) or a component."""
    return update[name] if isinstance(update, dict) else getattr(update, name)


def test_queued_runs_start_one_after_the_other(roots):
    """Jobs added to the queue start when the device is free, in order, one at a time (the one-device rule holds);
    a Start while jobs wait is refused (they go first); a queued job can be taken out; a restarted UI carries on."""
    jobs = JobManager(roots.log_dir, REPO)
    marks = roots.data_dir / "marks.txt"
    def job(n: int, seconds: float) -> list[str]:  # noqa: E306
        return [sys.executable, "-c", f"import time; open({str(marks)!r}, 'a').write('start {n}\\n'); "
                                      f"time.sleep({seconds}); open({str(marks)!r}, 'a').write('end {n}\\n')"]
    first = jobs.enqueue(job(1, 3), "one")  # long enough to be running through the next lines under load
    assert jobs.state(first) == "running"  # nothing ran: it starts at once
    second, third = jobs.enqueue(job(2, 0.2), "two"), jobs.enqueue(job(3, 0.2), "three")
    assert (jobs.state(second), jobs.state(third)) == ("queued", "queued")
    assert jobs.dequeue(third) == "Removed three from the queue." and jobs.dequeue(third) == "three is not queued."
    fourth = jobs.enqueue(job(4, 0.2), "four")
    with pytest.raises(DeviceBusy, match="Not started: training run one is running"):
        jobs.start(job(5, 0), "five")
    wait_until(lambda: marks.is_file() and marks.read_text().count("end") == 3, 30)
    assert marks.read_text().split("\n")[:-1] == ["start 1", "end 1", "start 2", "end 2", "start 4", "end 4"]
    # "end 4" is written just before the process exits: wait for the exit, not only for the mark
    def states() -> list[str]:  # noqa: E306
        return [jobs.state(jobs.load(r.id)) for r in (first, second, fourth)]
    wait_until(lambda: states() == ["finished"] * 3, 30)
    assert states() == ["finished"] * 3
    held = JobManager(roots.log_dir, REPO)
    with held.device("image generation"):  # in-UI sampling holds the device: a queued job waits for it
        waiting = held.enqueue(job(6, 0.1), "six")
        assert held.state(waiting) == "queued"
    assert held.state(held.load(waiting.id)) in ("running", "finished")


def test_a_reloaded_page_shows_the_running_runs_settings_read_only(ui):
    """A fresh page (a reload) selecting a running run gets the settings that run was started with, read-only; the
    next refreshes leave the form alone (the user may type); when the run ends the form is the user's again and the
    stale messages go."""
    from ldm.webui import train_tab
    settings = {"recipe": list(rc.recipes())[-1], "photos": str(ui.roots.uploads / "x"), "class_word": "robot",
                "token": "zwx", "checkpoint": None, "steps": 123, "learning_rate": 2e-4, "prior": True,
                "num_class_images": 7, "grid_every": 20, "seed": 5, "prior_source": rc.PRIOR_SOURCES[0],
                "few_photos_ok": False, "validation_prompts": "a {token} {class_word}", "masked_loss": False}
    record = ui.jobs.start([sys.executable, "-c", "import time; time.sleep(60)"], "zwx_robot", settings=settings)
    try:
        out = train_tab.refresh(ui, None, None)
        shown, form, note = out[7], out[8:8 + len(train_tab.FORM_FIELDS)], out[-2]
        assert shown.locked == f"job:{record.id}" and "zwx_robot runs with (read-only" in note
        assert [_field(u, "value") for u in form] == [settings[k] if k != "checkpoint" else ""
                                                      for k in train_tab.FORM_FIELDS]
        assert not any(_field(u, "interactive") for u in form)
        again = train_tab.refresh(ui, None, shown)
        assert all(u == gr.skip() for u in again[8:])
        ui.jobs.stop(record)
        wait_until(lambda: ui.jobs.state(record) != "running", 20)
        after = train_tab.refresh(ui, None, again[7])
        assert after[7].locked == "" and after[-2] == "" and after[-1] == ""
        assert all(_field(u, "interactive") for u in after[8:8 + len(train_tab.FORM_FIELDS)])
    finally:
        if ui.jobs.is_running(record):
            os.kill(record.pid, 9)


def test_a_late_refresh_keeps_the_users_choice_of_run(ui):
    """A run started from the page keeps its picker value when main.py makes its folder: a refresh asked for it and
    answered after the user picked another run (one just queued) sends no value that would put it back, and Stop
    on the queued run takes it out of the queue, leaving the running one alone."""
    from ldm.webui import train_tab
    folder = ui.roots.log_dir / "2026-12-06T03-00-00_one"
    script = (f"import os, time; os.makedirs({str(folder / 'configs')!r}); "
              f"print('Run folder: {folder} (config saved to x)', flush=True); time.sleep(60)")
    first = ui.jobs.start([sys.executable, "-c", script], "one")
    try:
        wait_until(lambda: ui.jobs.run_folder(first) is not None, 30)
        assert ui.jobs.run_folder(first) == folder
        queued = ui.jobs.enqueue([sys.executable, "-c", "pass"], "two")
        late = train_tab.refresh(ui, f"job:{first.id}", None)[0]  # asked before the queue, answered after it
        sent = late.constructor_args  # what Gradio sends to the page: the arguments the update was built with
        assert sent.get("value", f"job:{first.id}") == f"job:{first.id}"
        assert (f"{folder.name} (running)", f"job:{first.id}") in sent["choices"]
        assert train_tab.stop(ui, f"job:{queued.id}") == "Removed two from the queue."
        assert ui.jobs.state(first) == "running"
    finally:
        if ui.jobs.is_running(first):
            os.kill(first.pid, 9)


def test_pickers_offer_the_shipped_model_and_tell_checkpoints_apart(ui):
    """Every checkpoint picker offers the shipped toy model (to compare before and after training), and names a
    run's files by run, file, step and size, so last.ckpt and best.ckpt differ at a glance."""
    from ldm.weights.checkpoint import save_checkpoint
    run = ui.roots.log_dir / "2026-12-03T10-14-54_sks_robot" / "checkpoints"
    save_checkpoint(run / "last.ckpt", {"w": torch.zeros(300_000)}, global_step=400)
    save_checkpoint(run / "best.ckpt", {"w": torch.zeros(10)}, global_step=300)
    ckpts, _ = ui.weights()
    labels = dict((v, k) for k, v in ckpts)
    assert labels[str(run / "last.ckpt")] == f"last.ckpt · step 400 · {(run / 'last.ckpt').stat().st_size / 1e6:.1f} " \
        "MB · 2026-12-03T10-14-54_sks_robot"
    assert re.fullmatch(r"best\.ckpt · step 300 · \d+ kB · 2026-12-03T10-14-54_sks_robot", labels[str(run / "best.ckpt")])
    toy = REPO / "assets" / "toy" / "toy-ldm.safetensors"
    assert ckpts[-1][1] == str(toy)
    assert re.fullmatch(rf"toy-ldm \(shipped\) · step \d+ · {toy.stat().st_size / 1e6:.1f} MB", ckpts[-1][0])
    assert ui.readable_weights(str(toy), "checkpoint") == toy
    from ldm.webui.tools import model_config
    assert model_config("", toy) == REPO / "configs" / "toy" / "inference.yaml"


# ---- jobs ----------------------------------------------------------------------------------------------------

def test_one_job_at_a_time_stop_and_a_restarted_ui(roots):
    jobs = JobManager(roots.log_dir, REPO)
    script = "import time; print('Run folder: /nowhere (config saved to x)', flush=True); time.sleep(60)"
    record = jobs.start([sys.executable, "-c", script], "first")
    assert jobs.state(record) == "running"
    with pytest.raises(DeviceBusy, match="Not started: training run first is running: stop it or wait"):
        jobs.start([sys.executable, "-c", "pass"], "second")
    with pytest.raises(DeviceBusy, match="The device is busy: training run first is running"):
        with jobs.device("image generation"):
            pass
    from ldm.webui import generate_tab
    busy_ui = SimpleNamespace(jobs=jobs)  # nothing chosen yet: the page says the device is busy, not "none chosen"
    assert generate_tab.generate(busy_ui, "", "", 1, "a dog", "", 1, 10, 7.5, "ddim", "64 x 64", 1)[1] == \
        "⚠ The device is busy: training run first is running: stop it or wait until it ends."
    deadline = time.time() + 30
    while "Run folder" not in jobs.output(record) and time.time() < deadline:
        time.sleep(0.1)
    assert jobs.stop(record) == "Stopping first: it saves last.ckpt, then exits."
    while jobs.state(record) == "running" and time.time() < deadline:
        time.sleep(0.1)
    assert jobs.state(record) == "stopped"
    time.sleep(0.5)  # the waiting thread writes the exit code
    saved = json.loads((jobs.folder / f"{record.id}.json").read_text())
    assert saved["returncode"] == -15 and saved["run_folder"] == "/nowhere"
    again = JobManager(roots.log_dir, REPO)  # the UI restarted: the run is read back from the log folder
    assert [(r.name, again.state(r)) for r in again.records()] == [("first", "stopped")]
    with again.device("image generation"):
        assert again.busy() == "image generation is running: wait until it ends"


def test_a_crash_is_failed_with_its_last_lines(roots):
    jobs = JobManager(roots.log_dir, REPO)
    record = jobs.start([sys.executable, "-c", "print('step 3'); raise MemoryError('CUDA out of memory')"], "oom")
    wait_until(lambda: jobs.state(record) != "running", 30)
    assert jobs.state(record) == "failed"
    assert jobs.output(record).strip().splitlines()[-1] == "MemoryError: CUDA out of memory"


@pytest.mark.parametrize("text, state", [("...\nDone: 40 steps. Checkpoints in x\n", "finished"),
                                         ("Stopped by SIGTERM at step 7; resume with ...", "stopped"),
                                         ("Traceback ...\nRuntimeError: boom\n", "failed")])
def test_runs_whose_end_the_ui_missed(roots, text, state):
    jobs = JobManager(roots.log_dir, REPO)
    record = JobRecord(id="old", name="old", argv=[sys.executable, "main.py"], pid=2 ** 22 + 7)  # long gone
    record.save(jobs.folder)
    (jobs.folder / "old.log").write_text(text)
    assert outcome_from_output(text) == state
    assert jobs.state(jobs.records()[0]) == state


# ---- the run folder ------------------------------------------------------------------------------------------

def test_progress_losses_and_external_runs(roots):
    run = roots.log_dir / "2026-01-01T00-00-00_cli"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "x-project.yaml").write_text("lightning:\n  trainer:\n    max_steps: 20\n")
    for folder, rows in (("csv", ["4,1.0,0.5", "9,0.9,0.4"]), ("csv-resumed-x", ["14,0.8,0.3", "19,0.7,0.2"])):
        (run / folder).mkdir()
        (run / folder / "metrics.csv").write_text("epoch,step,train/loss_prior,train/loss_subject\n" +
                                                  "".join(f"0,{r}\n" for r in rows))
    assert [r["step"] for r in runs.read_losses(run)] == [4, 9, 14, 19]
    assert runs.read_losses(run)[2] == {"step": 14, "loss_prior": 0.8, "loss_subject": 0.3}
    assert runs.read_progress(run) == runs.Progress(20, 20, None)
    assert runs.external_state(run) == "finished"
    (run / "progress.json").write_text(json.dumps({"step": 10, "max_steps": 40, "steps_per_s": 2.0}))
    assert runs.read_progress(run).text() == "step 10 / 40 · 2.00 steps/s · 15 s left"
    assert runs.read_progress(run).text(running=False) == "step 10 / 40 · 2.00 steps/s"  # stopped: no time left
    assert runs.external_state(run) == "running"  # a fresh progress file: someone trains it from a shell
    os.utime(run / "progress.json", (time.time() - 3600,) * 2)
    assert runs.external_state(run) == "failed"  # stale, no checkpoint
    views = runs.list_runs(JobManager(roots.log_dir, REPO))
    assert [(v.key, v.state, v.record) for v in views] == [(run.name, "failed", None)]


# ---- the commands the UI builds ------------------------------------------------------------------------------

def test_the_estimate_before_start_comes_from_the_measured_rows():
    """Steps x the measured s/step of the recipe's row on this kind of device, its peak, and the machine it was
    measured on; every row names a recipe of the page; a device without a row says so instead of guessing."""
    rows = json.loads((REPO / "benchmarks" / "measured.json").read_text())["rows"]
    assert {r["recipe"] for r in rows} <= set(rc.recipes())
    toy = next(r for r in rows if r["recipe"] == "Tiny demo model (toy, CPU)" and r["device"] == "cpu")
    seconds = round(400 * toy["s_per_step"])
    text = rc.estimate("Tiny demo model (toy, CPU)", 400, cuda=False)
    assert text.startswith(f"Estimate for 400 steps: about {seconds // 60}:{seconds % 60:02d} and "
                           f"{toy['peak_bytes'] / 2 ** 20:.0f} MiB of main memory at the peak")
    assert toy["machine"] in text
    assert rc.estimate("SDXL LoRA", 800, cuda=True) == \
        "No estimate: SDXL LoRA has not been measured on a GPU yet (scripts/benchmark.py measures it)."


def test_fewer_photos_than_the_recipe_wants_need_a_yes(roots):
    """One photo is refused in one line naming the folder and the minimum; ticking the confirmation trains."""
    recipe = list(rc.recipes())[-1]
    photos = make_folder(roots.data_dir / "uploads" / "robot", 1)
    request = rc.TrainRequest(recipe, str(photos), "robot", "sks", None, 30, 2e-4, False, 8, 10, 5)
    with pytest.raises(rc.RequestError, match="^photo folder robot: 1 photo; Tiny demo model .* wants at least 5 "
                                              r"\(DreamBooth works with 5-30\): add photos, or tick 'train with "
                                              "fewer photos anyway'$"):
        rc.training_argv(request, roots, cuda=False)
    argv, _, _ = rc.training_argv(replace(request, few_photos_ok=True), roots, cuda=False)
    assert f"--data_root={photos}" in argv


def test_presets_and_the_command_shown_before_start(ui):
    """The form's settings are saved as a preset (with the command they make) and loaded back into the form; the
    command shown before Start is what Start runs, and it passes main.py's checks with the edited validation
    prompts and masked loss."""
    import shlex

    import main as main_py
    from ldm.training.run import TrainOptions, prepare
    from ldm.webui import train_tab
    photos = make_folder(ui.roots.data_dir / "uploads" / "robot", 5)
    recipe = list(rc.recipes())[-1]
    values = [recipe, str(photos), "robot", "zwx", "", 30, 2e-4, True, 8, 10, 5, rc.PRIOR_SOURCES[0], False,
              "photo of a {token} {class_word} on the moon, at night\nphoto of a {class_word}", True]
    command = train_tab.preview(ui, *values)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "main.py"]
    plan = prepare(TrainOptions.from_namespace(*main_py.get_parser().parse_known_args(argv[2:])))
    assert list(plan.config.lightning.callbacks.image_logger.params.prompts) == [
        "photo of a {token} {class_word} on the moon, at night", "photo of a {class_word}"]
    assert plan.config.data.params.masked_loss is True and plan.config.data.params.token == "zwx"
    status, picker = train_tab.save_preset(ui, "../my robot", *values)
    assert status == "✓ preset saved to data/presets/my_robot.json" and picker.value == "my_robot"
    assert json.loads((ui.roots.data_dir / "presets" / "my_robot.json").read_text())["command"] == command
    loaded = train_tab.load_preset(ui, "my_robot")
    assert [_field(u, "value") if not isinstance(u, (str, int, float, bool)) else u for u in loaded[:-1]] == values
    assert loaded[-1] == "✓ loaded preset my_robot"
    bad = [*values[:13], 'say "hi"', True]
    assert train_tab.preview(ui, *bad) == "(not ready: validation prompt 'say \"hi\"': may not contain double " \
                                          "quotes or backslashes)"
    assert train_tab.preview(ui, *values[:13], "a {dog}", True).startswith("(not ready: validation prompt 'a {dog}'")
    (ui.roots.data_dir / "presets" / "odd.json").write_text('{"settings": {"steps": 3, "rm": "-rf"}}')
    assert train_tab.load_preset(ui, "odd")[-1] == "⚠ preset odd.json: unknown settings ['rm']"


@pytest.mark.parametrize("recipe", list(rc.recipes()))
def test_the_training_command_passes_main_py_checks(roots, recipe, t5_tokenizer):
    """Each recipe's command line goes through main.py's parser and the training module's checks of every
    config key and value (``prepare``: no model is loaded). FLUX.1's takes its other files from the model folder,
    and says which one is missing."""
    import shutil

    import main as main_py
    from ldm.training.run import TrainOptions, prepare
    photos = make_folder(roots.data_dir / "uploads" / "dog", 5)
    ckpt = roots.model_dir / "base.safetensors"
    ckpt.write_bytes(b"weights")
    request = rc.TrainRequest(recipe, str(photos), "stuffed animal", "sks", str(ckpt), 30, 2e-6, True, 8, 10, 5)
    if "FLUX" in recipe:
        with pytest.raises(rc.RequestError, match="FLUX.1 \\[dev\\] needs its ae file beside it: put ae.safetensors"):
            rc.training_argv(request, roots, cuda=False)
        for name in ("ae.safetensors", "t5xxl_fp16.safetensors", "clip_l.safetensors"):
            (roots.model_dir / name).write_bytes(b"weights")
        shutil.copy(t5_tokenizer, roots.model_dir / "spiece.model")
    argv, name, r = rc.training_argv(request, roots, cuda=False)
    assert argv[:2] == [sys.executable, str(REPO / "main.py")] and name == "sks_stuffed_animal"
    opt, overrides = main_py.get_parser().parse_known_args(argv[2:])
    plan = prepare(TrainOptions.from_namespace(opt, overrides))
    cfg = plan.config
    assert cfg.lightning.trainer.max_steps == 30 and cfg.model.base_learning_rate == 2e-6
    assert cfg.data.params.class_word == "stuffed animal" and cfg.class_images.num == 8
    assert cfg.lightning.callbacks.webui_progress.target == "ldm.webui.progress.LiveProgress"
    assert cfg.lightning.callbacks.image_logger.params.batch_frequency == 10
    assert (cfg.model.params.get("lora_config") or {}).get("rank") == (16 if "FLUX" in recipe else 4 if "LoRA" in recipe else None)
    assert Path(cfg.data.params.reg_data_root).parent == roots.class_images
    if "FLUX" in recipe:
        assert cfg.model.params.component_paths == {"ae": str(roots.model_dir / "ae.safetensors"),
                                                     "t5": str(roots.model_dir / "t5xxl_fp16.safetensors"),
                                                     "clip": str(roots.model_dir / "clip_l.safetensors")}
        t5 = cfg.model.params.conditioner_config.params.emb_models[1].params
        assert t5.tokenizer_path == str(roots.model_dir / "spiece.model")
    # Prior from the base model: every recipe trains with no class images (LoRA: adapters off; full: a frozen copy).
    base_prior = rc.TrainRequest(recipe, str(photos), "dog", "sks", str(ckpt), 30, 2e-6, True, 8,
                                 prior_source=rc.PRIOR_SOURCES[1])
    opt, overrides = main_py.get_parser().parse_known_args(rc.training_argv(base_prior, roots, False)[0][2:])
    cfg = prepare(TrainOptions.from_namespace(opt, overrides)).config
    assert cfg.model.params.prior_preservation == "base_model" and cfg.data.params.prior_captions
    assert not cfg.data.params.get("reg_data_root") and not cfg.class_images.get("num")
    with pytest.raises(PathRefused):
        rc.training_argv(rc.TrainRequest(recipe, "/tmp", "dog", "sks", str(ckpt), 30, 2e-6, False, 8), roots, False)
    with pytest.raises(rc.RequestError, match="may not contain"):
        rc.training_argv(rc.TrainRequest(recipe, str(photos), "dog", "a=b", str(ckpt), 30, 2e-6, False, 8), roots,
                         False)


def test_run_checkpoints_sample_with_their_inference_config(tmp_path):
    from ldm.webui.tools import error_line, inference_config_for
    run = tmp_path / "run"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "a-project.yaml").write_text((REPO / "configs/stable-diffusion/tiny-finetune.yaml").read_text())
    tiny = REPO / "configs/stable-diffusion/tiny-inference.yaml"
    assert inference_config_for(run / "checkpoints" / "last.ckpt") == tiny
    assert inference_config_for(tmp_path / "sd-v1-4.ckpt") is None  # recognised from its keys by the script
    assert error_line("warning\nprune_ckpt.py: error: out.safetensors: exists already\n", "prune_ckpt", 2) == \
        "out.safetensors: exists already"
    assert error_line("Killed\n", "merge_lora", -9) == "merge_lora.py failed (killed by signal 9): Killed"


# ---- sampling and the model tools on the tiny model ------------------------------------------------------------

def test_generate_with_a_lora_merge_and_convert(ui, roots, tiny_model, tiny_ckpt):
    import copy
    import shutil

    from ldm.util import fmt_bytes
    from ldm.webui import generate_tab, models_tab
    from ldm.webui.tools import size_of
    from ldm.weights.checkpoint import save_checkpoint
    from ldm.weights.lora import LoraSettings, add_lora, lora_state_dict
    base = roots.model_dir / "tiny.ckpt"
    shutil.copy(tiny_ckpt, base)
    with_lora = copy.deepcopy(tiny_model)
    add_lora(with_lora, LoraSettings(rank=2))
    lora = save_checkpoint(roots.model_dir / "adapter.safetensors", lora_state_dict(with_lora))
    ckpts, loras = ui.weights()
    assert [label.split(" · ")[0] for label, _ in loras] == ["models/adapter.safetensors"]
    assert [label.split(" · ")[0] for label, _ in ckpts] == ["models/tiny.ckpt", "toy-ldm (shipped)"]
    tiny = str(REPO / "configs/stable-diffusion/tiny-inference.yaml")
    args = (ui, str(base), str(lora), 0.5, "a toy", "", 3, 2, 3.0, "euler", "64 x 64", 1)
    _, status = generate_tab.generate(*args)  # taken for SD v1 by its keys: the loader's one line says what differs
    assert status.startswith(f"⚠ {base}: it is a Stable Diffusion v1 checkpoint") and "expected [49408, 768]" in status
    gallery, status = generate_tab.generate(*args, config=tiny)
    assert status.startswith("1 image in ") and status.endswith("saved in data/outputs/txt2img/samples")
    (picture, caption), = gallery
    meta = Image.open(picture).text
    assert (meta["sampler"], meta["size"], meta["seed"], meta["checkpoint"]) == ("euler", "64x64", "3", "tiny.ckpt")
    assert caption == "seed 3, image 1 · 2 steps · scale 3.0 · euler · 64x64 · tiny.ckpt"  # the settings under it
    table, settings = generate_tab.png_info(ui, picture)  # PNG info reads them back, and sends them to Generate
    assert "| prompt | a toy |" in table and "| seed | 3 |" in table and "| sampler | euler |" in table
    assert generate_tab.use_settings(settings)[:6] == ("a toy", "", 3, 2, 3.0, "euler")
    (roots.data_dir / "notes.png").write_bytes(b"no picture")
    assert generate_tab.png_info(ui, str(roots.data_dir / "notes.png"))[0].startswith("⚠ notes.png: not a readable")
    Image.new("RGB", (4, 4)).save(roots.data_dir / "plain.png")
    assert generate_tab.png_info(ui, str(roots.data_dir / "plain.png"))[0] == \
        "⚠ plain.png: carries no generation settings (only pictures saved by this project's scripts and web UI do)"

    merged = roots.model_dir / "tiny-adapter-merged.safetensors"
    assert models_tab.merge(ui, str(base), str(lora), 0.5, "") == \
        (f"✓ wrote models/{merged.name}: {fmt_bytes(merged.stat().st_size, decimal=True)}", str(merged))
    first = merged.stat().st_mtime_ns
    assert models_tab.merge(ui, str(base), str(lora), 0.5, "") == \
        (f"⚠ out {merged}: exists already; choose a new name (or tick 'replace a file of the same name')", None)
    assert models_tab.merge(ui, str(base), str(lora), 0.7, "", overwrite=True)[1] == str(merged)
    assert merged.stat().st_mtime_ns != first
    assert models_tab.download(ui, str(lora), "LoRA") == ("", str(lora))
    assert models_tab.convert(ui, str(base), "", "/etc/passwd") == \
        ("⚠ model config /etc/passwd: not one of the repository's inference configs", None)
    status = models_tab.convert(ui, str(base), "", tiny)
    folder = roots.model_dir / "tiny-diffusers"
    assert (folder / "model_index.json").is_file() and (folder / "unet").is_dir()
    assert status == (f"✓ wrote models/tiny-diffusers: {fmt_bytes(size_of(folder), decimal=True)}", None)


# ---- text fields are data, never flags -----------------------------------------------------------------------

SECRET = "the text of a file outside the UI's folders"


def test_a_prompt_that_looks_like_a_flag_is_a_prompt(ui, roots, tiny_ckpt, tmp_path):
    """A prompt ``--from-file=<file>`` once made txt2img read that file and write its text into the PNGs; ``--help``
    once ended the sampling in the server's process and wedged the page. Both are prompts now, in every tab that
    samples, and the next request is served."""
    import shutil

    from ldm.webui import generate_tab
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    base = roots.model_dir / "tiny.ckpt"
    shutil.copy(tiny_ckpt, base)
    tiny = str(REPO / "configs/stable-diffusion/tiny-inference.yaml")
    for prompt, negative in ((f"--from-file={secret}", "--help"), ("--help", f"--from-file={secret}"), ("-h", "-x")):
        gallery, status = generate_tab.generate(ui, str(base), "", 1.0, prompt, negative, 1, 2, 3.0, "ddim",
                                                "64 x 64", 1, config=tiny)
        assert status.startswith("1 image in "), status
        meta = Image.open(gallery[0][0]).text
        assert (meta["prompt"], meta["negative_prompt"]) == (prompt, negative)
        assert SECRET not in json.dumps(meta)
    assert ui.jobs.busy() is None
    picture = roots.data_dir / "picture.png"
    Image.new("RGB", (64, 64), (40, 90, 160)).save(picture)
    layer = roots.data_dir / "layer.png"
    strokes = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    strokes.paste((255, 255, 255, 255), (16, 16, 40, 40))
    strokes.save(layer)
    for layers in ([str(layer)], []):  # inpainting, then img2img (nothing painted): child processes
        original, results, status = generate_tab.run_inpaint(
            ui, {"background": str(picture), "layers": layers}, str(base), f"--from-file={secret}", "--help", 0.5, 2,
            False, 0, 1, 2, 3.0, "ddim", 1, config=tiny)
        assert "1 images in" in status, status
        meta = Image.open(results[0][0]).text
        assert (meta["prompt"], meta["negative_prompt"]) == (f"--from-file={secret}", "--help")
        assert SECRET not in json.dumps(meta)


def test_flag_like_training_fields_stay_values(roots):
    """Identifier and class word reach main.py as the values of --token and --class_word, whatever they look like."""
    import main as main_py
    photos = make_folder(roots.data_dir / "uploads" / "dog", 5)
    recipe = list(rc.recipes())[-1]
    argv, _, _ = rc.training_argv(rc.TrainRequest(recipe, str(photos), "--help -h", "--version", "", 30, 1e-4,
                                                  False, 8), roots, cuda=False)
    opt, overrides = main_py.get_parser().parse_known_args(argv[2:])
    assert (opt.token, " ".join(opt.class_word), overrides) == ("--version", "--help -h", [
        "model.base_learning_rate=0.0001", rc.PROGRESS_CALLBACK, "data.params.masked_loss=false"])


def test_a_script_that_wants_to_exit_or_hangs_never_holds_the_server(ui, tmp_path, monkeypatch):
    """argparse's help and exits inside the UI's process are one line, and a child script that never ends is
    stopped at its time limit; either way the device is free again for the next request."""
    import argparse

    from ldm.webui import tools
    parser = argparse.ArgumentParser(prog="x.py")
    parser.add_argument("--n", type=int)
    for argv, line in ((["--help"], "x.py wanted to exit (0)"), (["--n", "two"], "argument --n: invalid int value")):
        with pytest.raises(tools.ToolError, match=re.escape(line)):
            tools.parse_in_process(parser, argv)
    (tmp_path / "hang.py").write_text("import time\nprint('waiting', flush=True)\ntime.sleep(600)\n")
    monkeypatch.setenv(tools.EXTRA_SCRIPTS_ENV, str(tmp_path))
    tic = time.time()
    with pytest.raises(tools.ToolError, match=r"hang.py did not finish within 2 s and was stopped"):
        with ui.jobs.device("inpainting"):
            tools.run_script("hang", [], timeout_s=2)
    assert time.time() - tic < 30 and ui.jobs.busy() is None


def test_generate_with_flux_files_from_the_model_folder(ui, roots, tiny_flux_model, t5_tokenizer):
    """A FLUX.1 transformer file in the model folder samples from the Generate tab with its other files found
    beside it; the page's guidance scale becomes dev's distilled guidance (no classifier-free pass), and a missing
    part is named in one line."""
    import shutil

    from safetensors.torch import save_file

    from ldm.webui import generate_tab
    sd = tiny_flux_model.state_dict()

    def part(prefix: str, name: str) -> None:  # T5's tied embedding saved once, as some releases hold it
        save_file({k[len(prefix):]: v.contiguous() for k, v in sd.items() if k.startswith(prefix)
                   and not k.endswith("encoder.embed_tokens.weight")}, str(roots.model_dir / name))
    part("model.diffusion_model.", "flux1-tiny.safetensors")
    part("first_stage_model.", "ae.safetensors")
    part("conditioner.embedders.0.transformer.", "clip_l.safetensors")
    tiny = str(REPO / "configs/flux/tiny-flux-inference.yaml")
    args = (ui, str(roots.model_dir / "flux1-tiny.safetensors"), "", 1.0, "a sks toy", "", 4, 2, 3.5, "auto",
            "64 x 64", 1)
    _, status = generate_tab.generate(*args, config=tiny)
    assert status.startswith("⚠ FLUX.1 [dev] needs its t5 file beside it: put t5xxl*.safetensors in "), status
    part("conditioner.embedders.1.transformer.", "t5xxl_tiny.safetensors")
    shutil.copy(t5_tokenizer, roots.model_dir / "spiece.model")
    gallery, status = generate_tab.generate(*args, config=tiny)
    assert status.startswith("1 image in "), status
    meta = Image.open(gallery[0][0]).text
    assert (meta["sampler"], meta["guidance"], meta["scale"], meta["steps"]) == ("flow_euler", "3.5", "1.0", "2")
