"""The Generate and Inpaint / img2img tabs, and "send to inpaint" between them."""
from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import gradio as gr
import numpy as np
from PIL import Image

from ldm.config import MAX_SEED
from ldm.sampling.cli import SAMPLER_NAMES
from ldm.webui import tools
from ldm.webui.context import WebUI, refusal, user_errors
from ldm.webui.paths import inside
from ldm.webui.recipes import RequestError

SIZES = ["model default", "64 x 64", "512 x 512", "768 x 512", "512 x 768", "768 x 768", "1024 x 1024"]
MAX_IMAGES = 8


def parse_size(text: str) -> Optional[tuple[int, int]]:
    """``"W x H"`` -> (W, H); "model default" -> None (the script uses the model's native size)."""
    if not text or text == SIZES[0]:
        return None
    try:
        w, h = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise RequestError(f"size {text!r}: expected width x height, e.g. 512 x 512") from None
    return w, h


def options(ui: WebUI, prompt: str, negative: str, seed: float, steps: float, scale: float, sampler: str,
            n: float, lora: Optional[str] = None, strength: float = 1.0) -> tools.SampleOptions:
    if not prompt or not prompt.strip():
        raise RequestError("prompt: empty")
    if sampler not in ("auto", *SAMPLER_NAMES):
        raise RequestError(f"sampler {sampler!r}: auto or one of {', '.join(SAMPLER_NAMES)}")
    if seed is None or not 0 <= seed <= MAX_SEED or int(seed) != seed:
        raise RequestError(f"seed {seed}: a whole number between 0 and {MAX_SEED}")
    if not 1 <= int(n) <= MAX_IMAGES:
        raise RequestError(f"number of images {n}: between 1 and {MAX_IMAGES}")
    lora_path = ui.readable_weights(lora, "LoRA") if lora else None
    return tools.SampleOptions(prompt.strip(), negative or "", int(seed), int(steps), float(scale), sampler, int(n),
                               lora=lora_path, lora_strength=float(strength))


def generate(ui: WebUI, ckpt: str, lora: str, strength: float, prompt: str, negative: str, seed: float,
             steps: float, scale: float, sampler: str, size: str, n: float, config: str = "") -> tuple[Any, str]:
    """txt2img into ``<data-dir>/outputs/txt2img``; (gallery, status)."""
    try:
        ui.jobs.check_free()  # a busy device first: "none chosen" would send the user looking for a model
        path = ui.readable_weights(ckpt, "checkpoint")
        opts = options(ui, prompt, negative, seed, steps, scale, sampler, n, lora, strength)
        opts.config = tools.model_config(config, path)
        opts = tools.for_checkpoint(opts, path, ui.roots.model_dir, opts.config)
        tic = time.time()
        with ui.jobs.device("image generation"):
            written = tools.txt2img(path, opts, ui.roots.outputs / "txt2img", parse_size(size))
    except user_errors() as e:
        return gr.skip(), refusal(e)
    folder = written[0].parent if written else ui.roots.outputs / "txt2img"
    done = f"{len(written)} image{'s' * (len(written) != 1)} in {time.time() - tic:.1f} s"
    return [(str(p), tools.settings_caption(p)) for p in written], f"{done}, saved in {ui.label(folder)}"


def selected_index(evt: gr.SelectData) -> int:
    return evt.index


def send_to_inpaint(ui: WebUI, selected: Optional[int], gallery: Optional[list], ckpt: str, prompt: str,
                    mode: str = "inpaint") -> tuple:
    """The selected result (the first when none is) into the Inpaint / img2img editor, and that tab opened; for
    img2img nothing is painted, so the whole picture is repainted at the tab's strength."""
    paths = [item[0] if isinstance(item, (list, tuple)) else item for item in gallery or []]
    chosen = paths[selected] if isinstance(selected, int) and 0 <= selected < len(paths) else (
        paths[0] if paths else None)
    if chosen is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), "⚠ generate an image first"
    editor = {"background": chosen, "layers": [], "composite": chosen}
    note = ("paint the part to repaint, then Inpaint" if mode == "inpaint" else
            "nothing painted: Inpaint repaints the whole picture (img2img) at this strength")
    return (editor, gr.Tabs(selected="inpaint"), ckpt, prompt, note, f"Sent {Path(chosen).name} to {mode}.")


def mask_from_layers(layers: list, size: tuple[int, int], allowed: list[Path]) -> Optional[Image.Image]:
    """White where the brush painted (any layer's alpha), black elsewhere, at the image's size; None if empty."""
    mask = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers or []:
        if layer is None:
            continue
        layer = inside(layer, allowed, "mask layer")
        alpha = np.asarray(Image.open(layer).convert("RGBA").resize(size, Image.NEAREST))[..., 3]
        mask |= alpha > 0
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L") if mask.any() else None


def open_picture(path: Path) -> Image.Image:
    """The editor's picture in RGB, refused (one line) when it is no image or a decompression bomb."""
    from ldm.data.image_loading import ImageError, check_pixel_count
    try:
        with Image.open(path) as im:
            check_pixel_count(path, *im.size)
            return im.convert("RGB")
    except ImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"picture {path.name}: cannot read it ({' '.join(str(e).split())})") from None


def save_inputs(ui: WebUI, image: Image.Image, mask: Optional[Image.Image]) -> tuple[Path, Optional[Path]]:
    """The picture and mask the script reads, numbered in ``<data-dir>/outputs/inpaint-inputs``."""
    from ldm.images import save_numbered_png, save_png
    image_path = save_numbered_png(image, ui.roots.outputs / "inpaint-inputs", "{:05}-image.png")
    if mask is None:
        return image_path, None
    return image_path, save_png(mask, image_path.with_name(image_path.name.replace("-image", "-mask")))


def run_inpaint(ui: WebUI, editor: Optional[dict], ckpt: str, prompt: str, negative: str, strength: float,
                mask_blur: float, only_masked: bool, padding: float, seed: float, steps: float, scale: float,
                sampler: str, n: float, config: str = "") -> tuple[Any, Any, str]:
    """Inpaint what the brush covered (img2img of the whole picture when nothing is painted); (original, results,
    status)."""
    try:
        ui.jobs.check_free()
        if not editor or not editor.get("background"):
            raise RequestError("no picture: upload one or send one from Generate")
        allowed = [ui.roots.data_dir, ui.roots.log_dir, gradio_upload_dir()]
        image = open_picture(inside(editor["background"], allowed, "picture"))
        mask = mask_from_layers(editor.get("layers") or [], image.size, allowed)
        path = ui.readable_weights(ckpt, "checkpoint")
        opts = options(ui, prompt, negative, seed, steps, scale, sampler, n)
        opts.config = tools.model_config(config, path)
        opts = tools.for_checkpoint(opts, path, ui.roots.model_dir, opts.config)
        image_path, mask_path = save_inputs(ui, image, mask)
        tic = time.time()
        with ui.jobs.device("inpainting"):
            if mask_path is None:
                written = tools.img2img(path, image_path, opts, ui.roots.outputs / "img2img", float(strength))
            else:
                written = tools.inpaint(path, image_path, mask_path, opts, ui.roots.outputs / "inpaint",
                                        float(strength), int(mask_blur), bool(only_masked), int(padding))
    except user_errors() as e:
        return gr.skip(), gr.skip(), refusal(e)
    what = "img2img (nothing painted)" if mask_path is None else "inpainting"
    return (str(image_path), [(str(p), tools.settings_caption(p)) for p in written],
            f"{what}: {len(written)} images in {time.time() - tic:.1f} s, saved in {ui.label(written[0].parent)}"
            if written else f"⚠ {what} wrote no images")


def gradio_upload_dir() -> Path:
    """Where Gradio keeps files the browser uploaded (editor backgrounds)."""
    from gradio.utils import get_upload_folder
    return Path(get_upload_folder()).resolve()


def _sampling_fields(prefix: str) -> tuple:
    with gr.Row():
        seed = gr.Number(42, label="seed", precision=0, elem_id=f"{prefix}-seed", scale=3)
        dice = gr.Button("⚄ random", elem_id=f"{prefix}-dice", scale=1, min_width=40)
    with gr.Row():
        steps = gr.Slider(1, 150, 30, step=1, label="steps", elem_id=f"{prefix}-steps")
        scale = gr.Slider(1, 20, 7.5, step=0.5, label="guidance scale (FLUX.1 [dev]: its distilled guidance, "
                          "e.g. 3.5)", elem_id=f"{prefix}-scale")
    with gr.Row():
        sampler = gr.Dropdown(["auto", *SAMPLER_NAMES], value="auto", label="sampler (auto: the model's own)",
                              elem_id=f"{prefix}-sampler")
        n = gr.Slider(1, MAX_IMAGES, 2, step=1, label="images", elem_id=f"{prefix}-n")
    dice.click(lambda: random.randint(0, MAX_SEED), None, seed)
    return seed, steps, scale, sampler, n


def _generate_form(ckpts: list, loras: list) -> SimpleNamespace:
    """The Generate tab's components (inside its ``gr.Tab``)."""
    c = SimpleNamespace()
    with gr.Row():
        with gr.Column(scale=1):
            c.ckpt = gr.Dropdown(ckpts, value=ckpts[0][1] if ckpts else None, label="checkpoint", elem_id="gen-ckpt")
            with gr.Row():
                c.lora = gr.Dropdown([("(none)", "")] + loras, value="", label="LoRA", elem_id="gen-lora", scale=3)
                c.strength = gr.Slider(0, 2, 1.0, step=0.05, label="strength", elem_id="gen-lora-strength", scale=2)
            c.refresh = gr.Button("Refresh model lists", size="sm", elem_id="gen-refresh")
            c.prompt = gr.Textbox(label="prompt", lines=2, elem_id="gen-prompt")
            c.negative = gr.Textbox(label="negative prompt", elem_id="gen-negative")
            c.seed, c.steps, c.scale, c.sampler, c.n = _sampling_fields("gen")
            c.size = gr.Dropdown(SIZES, value=SIZES[0], label="size (width x height)", allow_custom_value=True,
                                 elem_id="gen-size")
            c.config = gr.Dropdown(tools.config_choices(), value="", label="model config", elem_id="gen-config")
            c.go = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            c.gallery = gr.Gallery(label="results (click one to choose it for sending)", columns=4, height=420,
                                   elem_id="gen-gallery", buttons=["download", "fullscreen"], interactive=False)
            with gr.Row():
                c.send = gr.Button("Send to inpaint", elem_id="send-to-inpaint", size="sm")
                c.send_img2img = gr.Button("Send to img2img", elem_id="send-to-img2img", size="sm")
            c.status = gr.Markdown(elem_id="gen-status")
            c.download = gr.File(label="download the results", file_count="multiple", interactive=False,
                                 elem_id="gen-download")
    c.selected = gr.State(None)
    return c


def _inpaint_form(ckpts: list) -> SimpleNamespace:
    """The Inpaint / img2img tab's components (inside its ``gr.Tab``)."""
    c = SimpleNamespace()
    with gr.Row():
        with gr.Column(scale=1):
            c.ckpt = gr.Dropdown(ckpts, value=ckpts[0][1] if ckpts else None, label="checkpoint", elem_id="inp-ckpt")
            c.prompt = gr.Textbox(label="prompt", lines=2, elem_id="inp-prompt")
            c.negative = gr.Textbox(label="negative prompt", elem_id="inp-negative")
            c.strength = gr.Slider(0, 1, 0.75, step=0.05, label="strength", elem_id="inp-strength")
            with gr.Row():
                c.blur = gr.Slider(0, 64, 4, step=1, label="mask blur (px)", elem_id="inp-blur")
                c.padding = gr.Slider(0, 256, 32, step=8, label="padding (px)", elem_id="inp-padding")
            c.only_masked = gr.Checkbox(False, label="only masked (work on the mask's box at full resolution)",
                                        elem_id="inp-only-masked")
            c.seed, c.steps, c.scale, c.sampler, c.n = _sampling_fields("inp")
            c.config = gr.Dropdown(tools.config_choices(), value="", label="model config", elem_id="inp-config")
            c.go = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
        with gr.Column(scale=2):
            c.editor = gr.ImageEditor(label="paint the part to repaint (nothing painted: img2img)", type="filepath",
                                      brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), layers=False,
                                      transforms=(), elem_id="inp-editor", height=420)
            with gr.Row():
                c.original = gr.Image(label="original", type="filepath", interactive=False, elem_id="inp-original",
                                      height=300)
                c.results = gr.Gallery(label="results", columns=2, elem_id="inp-gallery", interactive=False,
                                       height=300)
            c.status = gr.Markdown(elem_id="inp-status")
    return c


def png_info(ui: WebUI, path: Optional[str]) -> tuple[str, Optional[dict]]:
    """The generation settings of a picture the browser sent, as a table, and as values for Generate."""
    if not path:
        return "", None
    try:
        settings = tools.png_settings(inside(path, [gradio_upload_dir(), ui.roots.data_dir, ui.roots.log_dir],
                                             "picture"))
    except user_errors() as e:
        return refusal(e), None
    rows = "\n".join(f"| {k} | {' '.join(str(v).split()).replace('|', '/')} |" for k, v in settings.items())
    return f"| setting | value |\n|---|---|\n{rows}", settings


def use_settings(settings: Optional[dict]) -> tuple:
    """PNG info's settings into the Generate form (prompt, negative prompt, seed, steps, scale, sampler)."""
    if not settings:
        return (gr.skip(),) * 7
    number = lambda key, kind: kind(settings[key]) if key in settings else gr.skip()  # noqa: E731
    sampler = settings.get("sampler")
    return (settings.get("prompt", gr.skip()), settings.get("negative_prompt", gr.skip()), number("seed", int),
            number("steps", int), number("scale", float),
            sampler if sampler in ("auto", *SAMPLER_NAMES) else gr.skip(), gr.Tabs(selected="generate"))


def build(ui: WebUI, tabs: gr.Tabs) -> None:
    """The Generate, Inpaint / img2img and PNG info tabs and what passes between them (call inside
    ``gr.Tabs``)."""
    ckpts, loras = ui.weights()
    with gr.Tab("Generate", id="generate") as generate_tab:
        g = _generate_form(ckpts, loras)
    with gr.Tab("Inpaint / img2img", id="inpaint") as inpaint_tab:
        i = _inpaint_form(ckpts)
    with gr.Tab("PNG info", id="png-info"):
        with gr.Row():
            picture = gr.Image(label="a picture made by this project", type="filepath", elem_id="png-info-image",
                               height=300)
            with gr.Column():
                table = gr.Markdown(elem_id="png-info")
                use = gr.Button("Send the settings to Generate", elem_id="png-info-use")
        settings = gr.State(None)
    picture.change(lambda p: png_info(ui, p), picture, [table, settings])
    use.click(use_settings, settings, [g.prompt, g.negative, g.seed, g.steps, g.scale, g.sampler, tabs])

    def lists(current: Optional[str]) -> tuple:
        """Fresh choices; with nothing chosen yet, or only the shipped model (the default before any training),
        the newest checkpoint (a run that just finished)."""
        c, l_ = ui.weights()
        value = ui.keep_choice(current, c)
        return (gr.Dropdown(choices=c, value=value), gr.Dropdown(choices=[("(none)", "")] + l_),
                gr.Dropdown(choices=c, value=value))

    for event in (g.refresh.click, generate_tab.select, inpaint_tab.select):  # runs that finished meanwhile
        event(lists, g.ckpt, [g.ckpt, g.lora, i.ckpt], show_progress="hidden")
    g.go.click(lambda *a: generate(ui, *a), [g.ckpt, g.lora, g.strength, g.prompt, g.negative, g.seed, g.steps,
                                             g.scale, g.sampler, g.size, g.n, g.config], [g.gallery, g.status]) \
        .then(lambda gallery: (None, [item[0] if isinstance(item, (list, tuple)) else item for item in gallery or []]
                               or None), g.gallery, [g.selected, g.download])
    g.gallery.select(selected_index, None, g.selected)
    for button, mode in ((g.send, "inpaint"), (g.send_img2img, "img2img")):
        button.click(lambda *a, mode=mode: send_to_inpaint(ui, *a, mode=mode), [g.selected, g.gallery, g.ckpt,
                                                                                 g.prompt],
                     [i.editor, tabs, i.ckpt, i.prompt, i.status, g.status])
    i.go.click(lambda *a: run_inpaint(ui, *a), [i.editor, i.ckpt, i.prompt, i.negative, i.strength, i.blur,
                                                i.only_masked, i.padding, i.seed, i.steps, i.scale, i.sampler, i.n,
                                                i.config],
               [i.original, i.results, i.status])
