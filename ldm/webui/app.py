"""The page: four tabs over the project's functions, served by Gradio on 127.0.0.1 unless told otherwise."""
from __future__ import annotations

from typing import Optional

import gradio as gr

from ldm.webui import generate_tab, models_tab, train_tab
from ldm.webui.context import WebUI
from ldm.webui.uploads import MAX_FILE_BYTES

#: System fonts: a local UI fetches nothing from font CDNs.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def build(ui: WebUI) -> gr.Blocks:
    roots = ui.roots
    with gr.Blocks(title="DreamBooth", analytics_enabled=False) as demo:
        gr.Markdown(f"## DreamBooth\nmodels: `{roots.model_dir}` · runs: `{roots.log_dir}` · "
                    f"photos and outputs: `{roots.data_dir}`" + (" · GPU" if ui.cuda else " · CPU only"))
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train"):
                train_tab.build(ui)
            generate_tab.build(ui, tabs)
            with gr.Tab("Models", id="models") as tab:
                models_tab.build(ui, tab)
    return demo


def launch(ui: WebUI, host: str, port: int, auth: Optional[list[tuple[str, str]]],
           block: bool = True) -> gr.Blocks:
    """Serve the page. Only the model, log and data folders are served as files (grids, results, uploads, the
    download links of models and adapters)."""
    demo = build(ui)
    demo.queue()
    served = [str(ui.roots.model_dir), str(ui.roots.log_dir), str(ui.roots.data_dir)]
    demo.launch(server_name=host, server_port=port, auth=auth, allowed_paths=served, max_file_size=MAX_FILE_BYTES,
                theme=THEME, ssr_mode=False, share=False, inbrowser=False, prevent_thread_lock=not block,
                show_error=False)
    return demo
