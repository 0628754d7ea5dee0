"""The Train tab: photos, subject, recipe, Start / Stop / Resume, and a live view of the selected run."""
from __future__ import annotations

import html
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import gradio as gr

from ldm.data.image_loading import mask_path
from ldm.webui import presets
from ldm.webui import runs as run_files
from ldm.webui.context import WebUI, refusal, user_errors
from ldm.webui.generate_tab import gradio_upload_dir
from ldm.webui.paths import image_folders, inside
from ldm.webui.recipes import (FEW_PHOTOS, PRIOR_SOURCES, RequestError, TrainRequest, command_line, estimate,
                                measured_row, recipes, resume_argv, training_argv)
from ldm.webui.uploads import photo_entries, plural, save_caption, save_mask, sync_photos

REFRESH_S = 1.5
LOG_LINES = 14


@lru_cache(maxsize=1)
def _tokenizer():
    from ldm.modules.encoders.tokenizer import CLIPTokenizer
    return CLIPTokenizer()


def identifier_warnings(token: str, class_word: str) -> str:
    """``check_identifier``'s warnings with CLIP's tokenizer, and the prompt the subject will be trained with."""
    from ldm.data.dreambooth import check_identifier
    if not token or not token.strip():
        return "⚠ the identifier is empty: use a rare token such as sks"
    try:
        warnings = check_identifier(token.strip(), _tokenizer())
    except FileNotFoundError as e:
        return refusal(e)
    prompt = f"training prompt: *photo of a {token.strip()} {(class_word or '').strip() or '[class]'}*"
    return "\n\n".join([f"⚠ {w}" for w in warnings] + [prompt])


def folder_choices(ui: WebUI) -> list[tuple[str, str]]:
    """Photo folders of the data folder, newest first (not the class images, not the UI's outputs)."""
    skip = (ui.roots.class_images, ui.roots.outputs)
    folders = [p for p in image_folders(ui.roots.data_dir) if not any(s == p or s in p.parents for s in skip)]
    return [(ui.label(p), str(p)) for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]


def thumbnails(ui: WebUI, folder: Optional[str]) -> list[tuple[str, str]]:
    """The photo folder's pictures with their captions, for the thumbnails."""
    try:
        return photo_entries(inside(folder, [ui.roots.data_dir], "photo folder")) if folder else []
    except user_errors():
        return []


def choose_photo(ui: WebUI, folder: Optional[str], evt: gr.SelectData) -> tuple[Optional[str], str, Any, str]:
    """The clicked thumbnail's photo: (its path, its caption, its mask, what is being edited)."""
    entries = thumbnails(ui, folder)
    if not isinstance(evt.index, int) or not 0 <= evt.index < len(entries):
        return None, "", None, ""
    photo = Path(entries[evt.index][0])
    caption = photo.with_suffix(".txt")
    mask = mask_path(photo)
    return (str(photo), caption.read_text(encoding="utf-8", errors="replace").strip() if caption.is_file() else "",
            str(mask) if mask.is_file() else None, f"editing {photo.name}")


def save_photo(ui: WebUI, folder: Optional[str], photo: Optional[str], caption: str,
               mask: Optional[str]) -> tuple[str, Any]:
    """Write the chosen photo's caption (``photo.txt``) and mask (``photo.mask.png``); (status, thumbnails)."""
    try:
        if not photo:
            raise RequestError("no photo chosen: click a thumbnail first")
        path = inside(photo, [ui.roots.uploads, ui.roots.data_dir], "photo")
        save_caption(path, caption)
        current = mask_path(path)
        given = inside(mask, [gradio_upload_dir(), ui.roots.data_dir], "mask") if mask else None
        if given is None or given != current.resolve():
            save_mask(path, given)
    except user_errors() as e:
        return refusal(e), gr.skip()
    text = "caption" if caption and caption.strip() else "no caption (the template)"
    return f"✓ {path.name}: {text}, {'a mask' if mask_path(path).is_file() else 'no mask'}", thumbnails(ui, folder)


def trained_folders(ui: WebUI) -> list[Path]:
    """Photo folders a run of this page trained from (their photos stay as they were)."""
    return [Path(arg.split("=", 1)[1]) for record in ui.jobs.records() for arg in record.argv
            if arg.startswith("--data_root=")]


def upload(ui: WebUI, files: Optional[list[str]], recipe: str, class_word: str,
           folder: Optional[str] = None) -> tuple[str, Any, Any, Optional[str]]:
    """Bring the upload's folder to the photos the list shows (each picture once, refused files left out of the
    list); (report, the list as kept, photo folder picker, the upload's folder)."""
    try:
        size = recipes()[recipe].defaults()["size"]
        current = inside(folder, [ui.roots.uploads], "upload folder") if folder else None
        result = sync_photos(files or [], ui.roots.uploads, class_word or "photos", size, current,
                             frozen=trained_folders(ui))
    except user_errors() as e:
        return refusal(e), gr.skip(), gr.skip(), folder
    lines = ([f"✓ {plural(len(result.photos), 'photo')} in {ui.label(result.folder)}"] if result.folder else [])
    report = "\n\n".join(lines + [f"⚠ {line}" for line in result.errors + result.warnings])
    kept = [str(p) for p in result.photos] or None
    if result.folder is None:
        return report or "no photos", kept, gr.Dropdown(choices=folder_choices(ui), value=None), None
    return report, kept, gr.Dropdown(choices=folder_choices(ui), value=str(result.folder)), str(result.folder)


def recipe_defaults(ui: WebUI, recipe: str) -> tuple[Any, Any, Any, Any, Any]:
    r = recipes()[recipe]
    d = r.defaults()
    return (d["steps"], d["learning_rate"], d["grid_every"], gr.Dropdown(choices=checkpoint_choices(ui, recipe),
                                                                          value=None if r.needs_checkpoint else ""),
            d["validation_prompts"])


def preview(ui: WebUI, *values: Any) -> str:
    """The command Start would run for the form as it is (or why it would not start), shown before Start."""
    try:
        request = TrainRequest(*values)
        argv, _, _ = training_argv(replace(request, checkpoint=request.checkpoint or None), ui.roots, ui.cuda)
    except user_errors() as e:
        return f"(not ready: {refusal(e)[2:]})"
    return command_line(argv)


def save_preset(ui: WebUI, name: str, *values: Any) -> tuple[str, Any]:
    try:
        request = TrainRequest(*values)
        path = presets.save(ui.roots, name, request, preview(ui, *values))
    except user_errors() as e:
        return refusal(e), gr.skip()
    return f"✓ preset saved to {ui.label(path)}", gr.Dropdown(choices=presets.names(ui.roots), value=path.stem)


def load_preset(ui: WebUI, name: str) -> tuple:
    """The preset's settings into the form (the fields it has; the others keep their values)."""
    try:
        settings = presets.load(ui.roots, name)
    except user_errors() as e:
        return (gr.skip(),) * len(FORM_FIELDS) + (refusal(e),)
    updates = []
    for key in FORM_FIELDS:
        if key not in settings:
            updates.append(gr.skip())
        elif key == "photos":
            value = settings[key]
            updates.append(gr.Dropdown(choices=folder_choices(ui) + [(ui.label(Path(value)), value)] * (
                value not in [v for _, v in folder_choices(ui)]), value=value) if value else gr.skip())
        elif key == "checkpoint":
            updates.append(gr.Dropdown(choices=checkpoint_choices(ui, settings.get("recipe", "")),
                                       value=settings[key] or ""))
        else:
            updates.append(settings[key])
    return (*updates, f"✓ loaded preset {name}")


def checkpoint_choices(ui: WebUI, recipe: str) -> list[tuple[str, str]]:
    r = recipes()[recipe]
    start = []
    if r.start is not None:
        start = [(f"{r.start.name} (shipped)", "")]
    elif not r.needs_checkpoint:
        start = [("(none: random weights)", "")]
    return start + ui.weights()[0]


def start(ui: WebUI, recipe: str, photos: str, class_word: str, token: str, checkpoint: str, steps: float,
          lr: float, prior: bool, n_class: float, grid_every: float, seed: float,
          prior_source: str = PRIOR_SOURCES[0], few_photos_ok: bool = False, validation_prompts: str = "",
          masked_loss: bool = False, queue: bool = False) -> tuple[str, Any]:
    """Start the form's run now, or (``queue``) add it to the queue of runs that start one after the other."""
    try:
        request = TrainRequest(recipe, photos, class_word, token, checkpoint or None, steps, lr, prior, n_class,
                               grid_every, seed, prior_source, few_photos_ok, validation_prompts, masked_loss)
        argv, name, r = training_argv(request, ui.roots, ui.cuda)
        launch = ui.jobs.enqueue if queue else ui.jobs.start
        record = launch(argv, name, r.label, str(r.inference) if r.inference else None, settings=asdict(request))
    except user_errors() as e:
        return refusal(e), gr.skip()
    if record.queued:
        return f"Queued {name}: {len(ui.jobs.queue())} in the queue; it starts when the device is free.", \
            picker(ui, f"job:{record.id}")
    return f"Started {name} (pid {record.pid}).", picker(ui, f"job:{record.id}")


def _view(ui: WebUI, key: Optional[str]) -> tuple[list[run_files.RunView], Optional[run_files.RunView]]:
    """All runs and the selected one (the newest when none is). ``job:<id>`` names a run started from the page; an
    earlier start of a resumed run names the run's folder (its newest start)."""
    views = run_files.list_runs(ui.jobs)
    chosen = next((v for v in views if v.key == key), None)
    if chosen is None and key and key.startswith("job:"):
        record = next((r for r in ui.jobs.records() if r.id == key[4:]), None)
        folder = ui.jobs.run_folder(record) if record else None
        chosen = next((v for v in views if folder and v.folder and v.folder.resolve() == folder.resolve()), None)
    return views, chosen or (views[0] if views else None)


def picker(ui: WebUI, key: Optional[str]) -> Any:
    views, view = _view(ui, key)
    return gr.Dropdown(choices=[(v.label, v.key) for v in views], value=view.key if view else None)


def stop(ui: WebUI, key: str) -> str:
    """Stop the selected run, or take it out of the queue when it has not started."""
    _, view = _view(ui, key)
    if view is None or view.record is None:
        return "⚠ no run of this page selected (runs started elsewhere are stopped where they were started)"
    if view.state == "queued":
        return ui.jobs.dequeue(view.record)
    return ui.jobs.stop(view.record)


def resume(ui: WebUI, key: str) -> tuple[str, Any]:
    _, view = _view(ui, key)
    if view is None or view.folder is None:
        return "⚠ no run folder to resume", gr.skip()
    try:
        folder = inside(view.folder, [ui.roots.log_dir], "run folder")
        if view.state == "running":
            return f"⚠ {view.folder.name} is running already", gr.skip()
        if not run_files.checkpoints(folder):
            return f"⚠ {folder.name}: no checkpoint to resume from", gr.skip()
        previous = view.record
        record = ui.jobs.start(resume_argv(folder, ui.cuda), view.name, previous.recipe if previous else "",
                               previous.inference_config if previous else None, run_folder=folder,
                               settings=previous.settings if previous else None)
    except user_errors() as e:
        return refusal(e), gr.skip()
    return f"Resuming {folder.name} (pid {record.pid}).", picker(ui, f"job:{record.id}")


@dataclass
class Shown:
    """What the page shows already, so a refresh sends only what changed."""
    key: str = ""
    losses: int = -1
    grids: tuple = ()
    locked: str = ""  # the run whose settings the form shows, read-only ("" when the form is the user's)


#: The form's fields in TrainRequest's order: what a run started from the page is shown with again.
FORM_FIELDS = tuple(f.name for f in fields(TrainRequest))


def form_state(ui: WebUI, view: Optional[run_files.RunView], shown: Shown) -> tuple[list, str, str]:
    """``(updates of the FORM_FIELDS, message, locked run)``. While the selected run runs, the form shows the
    settings it was started with, read-only, and stale messages are cleared; once it ends (or another run is
    selected) the form is the user's again. Nothing changes between those moments (the user may be typing)."""
    running = view is not None and view.state == "running" and view.record is not None and bool(
        view.record.settings)
    key = view.key if running else ""
    if key == shown.locked:
        return [gr.skip()] * len(FORM_FIELDS), gr.skip(), shown.locked
    if not running:
        return [gr.update(interactive=True)] * len(FORM_FIELDS), "", ""
    settings = view.record.settings
    updates = []
    for name in FORM_FIELDS:
        value = settings.get(name)
        if name == "photos":
            updates.append(gr.Dropdown(choices=folder_choices(ui) + [(ui.label(Path(value)), value)] * (
                value not in [v for _, v in folder_choices(ui)]), value=value, interactive=False))
        elif name == "checkpoint":
            choices = checkpoint_choices(ui, settings.get("recipe", ""))
            value = value or ""
            updates.append(gr.Dropdown(choices=choices + [(value, value)] * (value not in [v for _, v in choices]),
                                       value=value, interactive=False))
        else:
            updates.append(gr.update(value=value, interactive=False))
    return updates, f"Showing the settings {view.name} runs with (read-only while it runs).", key


def progress_html(view: Optional[run_files.RunView], progress: run_files.Progress) -> str:
    if view is None:
        return "<div id='train-progress' data-state='none'>No runs yet.</div>"
    step, top = progress.step or 0, progress.max_steps or 0
    if view.state == "queued":
        return (f"<div id='train-progress' data-state='queued' data-phase='queued' data-step='0' data-max='0'>"
                f"<b>{html.escape(view.label)}</b><br>waiting in the queue: it starts when the device is free</div>")
    bar = "" if progress.phase == "preparing" else \
        f"<progress value='{step}' max='{top or 1}' style='width:100%'></progress>"
    phase = html.escape(progress.phase)
    return (f"<div id='train-progress' data-state='{view.state}' data-phase='{phase}' data-step='{step}' "
            f"data-max='{top}'><b>{html.escape(view.label)}</b><br>{bar}<br>"
            f"{html.escape(progress.text(view.state == 'running'))}</div>")


def loss_frame(losses: list[dict[str, float]]):
    """The plot's long table (step, loss, term); None while there is nothing to draw (an empty table would leave
    Gradio's chart without series for the data that follows)."""
    import pandas as pd
    rows = [(r["step"], r[term], term.replace("loss_", "")) for r in losses for term in ("loss_subject", "loss_prior")
            if term in r]
    if not rows:
        return None
    return pd.DataFrame({"step": pd.Series([r[0] for r in rows], dtype="int64"),
                         "loss": pd.Series([r[1] for r in rows], dtype="float64"),
                         "term": pd.Series([r[2] for r in rows], dtype="object")})


def grid_caption(path: Path) -> str:
    """"step 20 · rows: photo of a sks robot | photo of a robot": the prompt of each row, from the grid's PNG."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except OSError:
        return path.stem
    step = text.get("step", path.stem.removeprefix("step-").lstrip("0") or "0")
    return f"step {step}" + (f" · rows: {text['prompts']}" if text.get("prompts") else "")


def log_text(ui: WebUI, output: str, raw: bool) -> str:
    """The run's output as the log box shows it: the project's own lines (``runs.project_lines``), or the raw
    output's last lines."""
    from ldm.webui.recipes import REPO
    lines = [line for line in output.splitlines() if line.strip()] if raw else run_files.project_lines(output, REPO)
    return "\n".join(lines[-LOG_LINES:])


def refresh(ui: WebUI, key: Optional[str], shown: Optional[Shown], raw: bool = False) -> tuple:
    """Everything the run view shows, and the form's state (:func:`form_state`)."""
    return _refresh(ui, key, shown or Shown(), raw)


def _refresh(ui: WebUI, key: Optional[str], shown: Shown, raw: bool) -> tuple:
    views, view = _view(ui, key)
    choices = [(v.label, v.key) for v in views]
    selected = view.key if view else None
    if view is None or view.folder is None:
        progress, losses, grids = run_files.Progress(), [], []
        if view is not None and view.record is not None:  # class images, or the model loading
            progress = run_files.output_progress(ui.jobs.output(view.record))
            settings = view.record.settings or {}
            row = measured_row(settings.get("recipe", ""), ui.cuda)
            if row is not None and settings.get("steps"):  # the training after them, as the estimate says
                progress.then_s = float(settings["steps"]) * float(row["s_per_step"])
    else:
        progress, losses = run_files.read_progress(view.folder), run_files.read_losses(view.folder)
        grids = run_files.grids(view.folder)
    output = ui.jobs.output(view.record) if view and view.record else ""
    tail = log_text(ui, output, raw)
    same_run = shown.key == (selected or "")
    plot = gr.skip() if same_run and shown.losses == len(losses) else loss_frame(losses)
    gallery = gr.skip() if same_run and shown.grids == tuple(grids) else [(str(p), grid_caption(p)) for p in grids]
    running = view is not None and view.state == "running"
    resumable = view is not None and view.folder is not None and view.state in ("stopped", "failed") and bool(
        run_files.checkpoints(view.folder))
    form, message, locked = form_state(ui, view, shown)
    # When the run ends, what was said about it ("Stopping...", "Not started: ... is running") no longer applies.
    cleared = "" if shown.locked and not locked and shown.locked == (selected or "") else gr.skip()
    # The picker keeps what the page shows unless that run is gone or was resumed (a new start): a tick answered
    # after the user picked another run (a Start, a queue) must not put the old one back.
    keep = key is not None and key == selected
    picker_update = gr.Dropdown(choices=choices) if keep else gr.Dropdown(choices=choices, value=selected)
    return (picker_update, progress_html(view, progress), plot, gallery, tail,
            gr.Button(interactive=view is not None and (running or view.state == "queued") and view.record is not None,
                      value="Remove from queue" if view is not None and view.state == "queued" else "Stop"),
            gr.Button(interactive=resumable),
            Shown(selected or "", len(losses), tuple(grids), locked), *form, message, cleared)


def _form(ui: WebUI) -> SimpleNamespace:
    """Photos, subject and recipe, and the Start button."""
    names = list(recipes())
    first = names[-1]  # the tiny demo model: the one that runs anywhere
    d = recipes()[first].defaults()
    c = SimpleNamespace()
    with gr.Row():
        with gr.Column():
            gr.Markdown("### 1. Photos of the subject")
            c.files = gr.File(label="upload 5-30 photos", file_count="multiple", file_types=["image"],
                              type="filepath", elem_id="photos-upload")
            c.upload_report = gr.Markdown(elem_id="upload-report")
            c.upload_folder = gr.State(None)  # the folder this page's upload list is kept in
            c.few_ok = gr.Checkbox(False, label=FEW_PHOTOS, elem_id="few-photos-ok")
            c.folder = gr.Dropdown(choices=folder_choices(ui), label="photo folder (in the data folder)",
                                   elem_id="photo-folder")

        with gr.Column():
            gr.Markdown("### 2. Subject")
            c.class_word = gr.Textbox(label="class word", placeholder="dog", elem_id="class-word")
            c.token = gr.Textbox(label="identifier", value="sks", elem_id="identifier")
            c.token_info = gr.Markdown(identifier_warnings("sks", ""), elem_id="identifier-warnings")
        with gr.Column():
            gr.Markdown("### 3. Recipe")
            c.recipe = gr.Dropdown(choices=names, value=first, label="recipe", elem_id="recipe")
            c.checkpoint = gr.Dropdown(choices=checkpoint_choices(ui, first), value="", label="starting checkpoint",
                                       elem_id="start-checkpoint")
            with gr.Row():
                c.steps = gr.Number(d["steps"], label="steps", precision=0, minimum=1, elem_id="steps")
                c.lr = gr.Number(d["learning_rate"], label="learning rate", elem_id="learning-rate")
            with gr.Row():
                c.prior = gr.Checkbox(True, label="prior preservation", elem_id="prior")
                c.n_class = gr.Number(50, label="class images", precision=0, minimum=1, elem_id="class-images")
                c.prior_source = gr.Dropdown(choices=list(PRIOR_SOURCES), value=PRIOR_SOURCES[0], label="prior from",
                                             elem_id="prior-source")
            with gr.Row():
                c.grid_every = gr.Number(d["grid_every"], label="validation grid every (steps)", precision=0,
                                         elem_id="grid-every")
                c.seed = gr.Number(23, label="seed", precision=0, elem_id="train-seed")
            c.prompts = gr.Textbox(d["validation_prompts"], lines=4, elem_id="validation-prompts",
                                   label="validation prompts, one per line ({token}, {class_word} filled in)")
            c.masked = gr.Checkbox(False, label="masked loss (each photo's mask: white = subject)",
                                   elem_id="masked-loss")
    with gr.Row():
        c.thumbs = gr.Gallery(label="the photos: click one to give it a caption or a mask", columns=10, rows=1,
                              height=190, object_fit="contain", allow_preview=False, interactive=False,
                              elem_id="photo-thumbs", scale=3)
        with gr.Column(scale=1):
            c.photo = gr.State(None)
            c.photo_note = gr.Markdown(elem_id="photo-note")
            c.caption = gr.Textbox(label="its caption (empty: the prompt template; name the identifier in it)",
                                   elem_id="photo-caption")
            c.mask = gr.Image(label="its mask, optional (white = subject; used with masked loss)", type="filepath",
                              image_mode="L", height=150, elem_id="photo-mask")
            c.save_photo = gr.Button("Save caption and mask", size="sm", elem_id="save-photo")
    with gr.Row():
        c.preset = gr.Dropdown(choices=presets.names(ui.roots), value=None, label="preset", elem_id="preset",
                               scale=2)
        c.load_preset = gr.Button("Load", elem_id="load-preset", scale=1)
        c.preset_name = gr.Textbox(label="save the settings as", placeholder="my-dog-recipe", elem_id="preset-name",
                                   scale=2)
        c.save_preset = gr.Button("Save preset", elem_id="save-preset", scale=1)
    c.command = gr.Textbox(label="the command Start runs (paste it in a terminal to run it there)", lines=2,
                           interactive=False, elem_id="train-command")
    c.estimate = gr.Markdown(estimate(first, d["steps"], ui.cuda), elem_id="train-estimate")
    c.form_note = gr.Markdown(elem_id="form-note")
    with gr.Row():
        c.start = gr.Button("Start training", variant="primary", elem_id="start", scale=3)
        c.queue = gr.Button("Add to queue", elem_id="queue", scale=1)
    c.status = gr.Markdown(elem_id="train-status")
    return c


def _run_view() -> SimpleNamespace:
    """The selected run: picker, Stop / Resume, progress, loss plot, grids, output."""
    c = SimpleNamespace()
    with gr.Row():
        c.picker = gr.Dropdown(label="run", elem_id="run-picker", scale=3)
        c.stop = gr.Button("Stop", interactive=False, elem_id="stop", scale=1)
        c.resume = gr.Button("Resume", interactive=False, elem_id="resume", scale=1)
    c.progress = gr.HTML(progress_html(None, run_files.Progress()), elem_id="progress")
    with gr.Row():
        c.plot = gr.LinePlot(x="step", y="loss", color="term", label="loss", elem_id="loss-plot", y_title="MSE")
        c.grids = gr.Gallery(label="validation grids", columns=2, elem_id="grids", height=350, interactive=False)
    c.log = gr.Textbox(label="the run's messages", lines=LOG_LINES, max_lines=LOG_LINES, elem_id="run-log",
                       autoscroll=True)
    c.raw = gr.Checkbox(False, label="raw output (everything the process printed)", elem_id="raw-log")
    c.shown = gr.State(Shown())
    return c


def build(ui: WebUI) -> None:
    """The tab's components and events (call inside ``gr.Tab``)."""
    f, v = _form(ui), _run_view()
    timer = gr.Timer(REFRESH_S)
    for event in (f.files.upload, f.files.delete, f.files.clear):  # the user's changes, not the page's own
        event(lambda fs, r, c, u: upload(ui, fs, r, c, u), [f.files, f.recipe, f.class_word, f.upload_folder],
              [f.upload_report, f.files, f.folder, f.upload_folder]) \
            .then(lambda d: thumbnails(ui, d), f.folder, f.thumbs, show_progress="hidden")  # the same folder too
    f.folder.change(lambda d: thumbnails(ui, d), f.folder, f.thumbs, show_progress="hidden")
    def chosen(folder: Optional[str], evt: gr.SelectData) -> tuple:  # Gradio passes evt by this annotation
        return choose_photo(ui, folder, evt)

    f.thumbs.select(chosen, f.folder, [f.photo, f.caption, f.mask, f.photo_note])
    f.save_photo.click(lambda d, p, c, m: save_photo(ui, d, p, c, m), [f.folder, f.photo, f.caption, f.mask],
                       [f.photo_note, f.thumbs])
    for box in (f.token, f.class_word):
        box.change(identifier_warnings, [f.token, f.class_word], f.token_info, show_progress="hidden")
    f.recipe.input(lambda r: recipe_defaults(ui, r), f.recipe, [f.steps, f.lr, f.grid_every, f.checkpoint,
                                                                  f.prompts])
    form = [f.recipe, f.folder, f.class_word, f.token, f.checkpoint, f.steps, f.lr, f.prior, f.n_class, f.grid_every,
            f.seed, f.prior_source, f.few_ok, f.prompts, f.masked]  # FORM_FIELDS' order
    f.start.click(lambda *a: start(ui, *a), form, [f.status, v.picker])
    f.queue.click(lambda *a: start(ui, *a, queue=True), form, [f.status, v.picker])
    gr.on([c.change for c in form], lambda *a: preview(ui, *a), form, f.command, show_progress="hidden")
    gr.on([f.recipe.change, f.steps.change], lambda r, n: estimate(r, n, ui.cuda), [f.recipe, f.steps], f.estimate,
          show_progress="hidden")
    f.save_preset.click(lambda n, *a: save_preset(ui, n, *a), [f.preset_name, *form], [f.status, f.preset])
    f.load_preset.click(lambda n: load_preset(ui, n), f.preset, [*form, f.status])
    v.stop.click(lambda k: stop(ui, k), v.picker, f.status)
    v.resume.click(lambda k: resume(ui, k), v.picker, [f.status, v.picker])
    outputs = [v.picker, v.progress, v.plot, v.grids, v.log, v.stop, v.resume, v.shown, *form, f.form_note,
               f.status]
    timer.tick(lambda k, s, r: refresh(ui, k, s, r), [v.picker, v.shown, v.raw], outputs, show_progress="hidden")
    for event in (v.picker.select, v.raw.change):
        event(lambda k, s, r: refresh(ui, k, replace(s, losses=-1, grids=()), r), [v.picker, v.shown, v.raw],
              outputs, show_progress="hidden")
