"""The Models tab: prune, convert to diffusers, merge a LoRA; each result is written into the model folder."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import gradio as gr

from ldm.util import fmt_bytes
from ldm.webui import tools
from ldm.webui.context import WebUI, refusal, user_errors
from ldm.webui.paths import safe_name


def _output(ui: WebUI, name: str, default: str) -> Path:
    """``<model-dir>/<name>``, the name made safe (a browser cannot name a folder here)."""
    return ui.roots.model_dir / safe_name(name.strip() if name and name.strip() else default, "model")


def _done(ui: WebUI, work: Callable[[], Path]) -> str:
    try:
        out = work()
    except user_errors() as e:
        return refusal(e)
    return f"✓ wrote {ui.label(out)}: {fmt_bytes(tools.size_of(out), decimal=True)}"


def prune(ui: WebUI, ckpt: str, name: str) -> str:
    def work() -> Path:
        path = ui.readable_weights(ckpt, "checkpoint")
        return tools.prune(path, _output(ui, name, f"{_stem(path)}-pruned-fp16.safetensors"))
    return _done(ui, work)


def convert(ui: WebUI, ckpt: str, name: str, config: str = "") -> str:
    def work() -> Path:
        path = ui.readable_weights(ckpt, "checkpoint")
        return tools.convert(path, _output(ui, name, f"{_stem(path)}-diffusers"), tools.model_config(config, path))
    return _done(ui, work)


def merge(ui: WebUI, ckpt: str, lora: str, strength: float, name: str) -> str:
    def work() -> Path:
        path = ui.readable_weights(ckpt, "checkpoint")
        adapter = ui.readable_weights(lora, "LoRA")
        return tools.merge(path, adapter, float(strength),
                           _output(ui, name, f"{_stem(path)}-{adapter.stem}-merged.safetensors"))
    return _done(ui, work)


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
    result = gr.Markdown(elem_id="models-result")

    def lists(current: str, current_lora: str) -> tuple:
        c, l_ = ui.weights()
        pick = lambda value, choices: value if value in [v for _, v in choices] else (  # noqa: E731
            choices[0][1] if choices else None)
        return gr.Dropdown(choices=c, value=pick(current, c)), gr.Dropdown(choices=l_, value=pick(current_lora, l_))

    for event in (refresh.click, tab.select):
        event(lists, [ckpt, lora], [ckpt, lora], show_progress="hidden")
    prune_button.click(lambda c, n: prune(ui, c, n), [ckpt, name], result)
    convert_button.click(lambda c, n, k: convert(ui, c, n, k), [ckpt, name, config], result)
    merge_button.click(lambda c, lo, s, n: merge(ui, c, lo, s, n), [ckpt, lora, strength, name], result)
