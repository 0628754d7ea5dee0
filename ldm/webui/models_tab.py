"""The Models tab: prune, convert to diffusers, merge a LoRA; each result is written into the model folder."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import gradio as gr

from ldm.util import fmt_bytes
from ldm.webui import tools
from ldm.webui.context import WebUI, refusal, user_errors
from ldm.webui.paths import safe_name


def _output(ui: WebUI, name: str, default: str) -> Path:
    """``<model-dir>/<name>``, the name made safe (a browser cannot name a folder here)."""
    return ui.roots.model_dir / safe_name(name.strip() if name and name.strip() else default, "model")


#: The page's word for the scripts' ``--overwrite``.
REPLACE = "replace a file of the same name"


def _done(ui: WebUI, work: Callable[[], Path]) -> tuple[str, Optional[str]]:
    """(the result line, the written file for the download link: none for a folder or a refusal)."""
    try:
        out = work()
    except user_errors() as e:
        return refusal(e).replace("(or pass --overwrite)", f"(or tick '{REPLACE}')"), None
    return (f"✓ wrote {ui.label(out)}: {fmt_bytes(tools.size_of(out), decimal=True)}",
            str(out) if out.is_file() else None)


def prune(ui: WebUI, ckpt: str, name: str, overwrite: bool = False) -> tuple[str, Optional[str]]:
    def work() -> Path:
        path = ui.readable_weights(ckpt, "checkpoint")
        return tools.prune(path, _output(ui, name, f"{_stem(path)}-pruned-fp16.safetensors"), overwrite)
    return _done(ui, work)


def convert(ui: WebUI, ckpt: str, name: str, config: str = "") -> tuple[str, Optional[str]]:
    def work() -> Path:
        path = ui.readable_weights(ckpt, "checkpoint")
        return tools.convert(path, _output(ui, name, f"{_stem(path)}-diffusers"), tools.model_config(config, path))
    return _done(ui, work)


def merge(ui: WebUI, ckpt: str, lora: str, strength: float, name: str,
          overwrite: bool = False) -> tuple[str, Optional[str]]:
    def work() -> Path:
        path = ui.readable_weights(ckpt, "checkpoint")
        adapter = ui.readable_weights(lora, "LoRA")
        return tools.merge(path, adapter, float(strength),
                           _output(ui, name, f"{_stem(path)}-{adapter.stem}-merged.safetensors"), overwrite)
    return _done(ui, work)


def download(ui: WebUI, path: str, what: str) -> tuple[str, Optional[str]]:
    """A checkpoint or LoRA file of the pickers, offered as a download link."""
    try:
        return "", str(ui.readable_weights(path, what))
    except user_errors() as e:
        return refusal(e), None


def _stem(path: Path) -> str:
    """``<run>-last`` for ``<run>/checkpoints/last.ckpt``, else the file's stem."""
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}-{path.stem}"
    return path.stem


def build(ui: WebUI, tab: gr.Tab) -> None:
    ckpts, loras = ui.weights()
    with gr.Row():
        with gr.Column():
            ckpt = gr.Dropdown(ckpts, value=ckpts[0][1] if ckpts else None, label="checkpoint", elem_id="models-ckpt")
            name = gr.Textbox(label="output name in the model folder (empty: derived from the checkpoint)",
                              elem_id="models-out")
            overwrite = gr.Checkbox(False, label=f"{REPLACE} (prune, merge)", elem_id="models-overwrite")
            config = gr.Dropdown(tools.config_choices(), value="", label="model config (for converting)",
                                 elem_id="models-config")
            refresh = gr.Button("Refresh model lists", size="sm", elem_id="models-refresh")
        with gr.Column():
            prune_button = gr.Button("Prune to fp16 safetensors", elem_id="prune")
            convert_button = gr.Button("Convert to diffusers", elem_id="convert")
            with gr.Row():
                lora = gr.Dropdown(loras, value=loras[0][1] if loras else None, label="LoRA", elem_id="models-lora")
                strength = gr.Slider(0, 2, 1.0, step=0.05, label="strength", elem_id="models-lora-strength")
            merge_button = gr.Button("Merge LoRA into the checkpoint", elem_id="merge")
            with gr.Row():
                get_ckpt = gr.Button("Download the checkpoint", size="sm", elem_id="download-ckpt")
                get_lora = gr.Button("Download the LoRA", size="sm", elem_id="download-lora")
    result = gr.Markdown(elem_id="models-result")
    link = gr.File(label="download", interactive=False, elem_id="models-download")

    def lists(current: str, current_lora: str) -> tuple:
        c, l_ = ui.weights()
        return (gr.Dropdown(choices=c, value=ui.keep_choice(current, c)),
                gr.Dropdown(choices=l_, value=ui.keep_choice(current_lora, l_)))

    for event in (refresh.click, tab.select):
        event(lists, [ckpt, lora], [ckpt, lora], show_progress="hidden")
    prune_button.click(lambda c, n, o: prune(ui, c, n, o), [ckpt, name, overwrite], [result, link])
    convert_button.click(lambda c, n, k: convert(ui, c, n, k), [ckpt, name, config], [result, link])
    merge_button.click(lambda c, lo, s, n, o: merge(ui, c, lo, s, n, o), [ckpt, lora, strength, name, overwrite],
                       [result, link])
    get_ckpt.click(lambda c: download(ui, c, "checkpoint"), ckpt, [result, link])
    get_lora.click(lambda lo: download(ui, lo, "LoRA"), lora, [result, link])
