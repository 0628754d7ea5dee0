"""The local web UI: a thin Gradio layer over the project's own training, sampling and model tools.

``paths`` bounds every path a browser can name to the model, log and data folders; ``uploads`` checks photos with
the training loader; ``recipes`` turns the Train tab's fields into a ``main.py`` command line; ``jobs`` runs it as a
child process and reads runs back from the log folder; ``runs`` reads a run's progress, losses and grids;
``tools`` calls the sampling and model scripts; ``app`` builds the page; ``cli`` is ``scripts/webui.py``.
Nothing here trains or samples by itself.
"""
