"""Turning a trained model into the files other tools read: pruned sampling-only checkpoints (``prune``) and
diffusers pipeline folders (``diffusers``: the shared parts; each family's writer is ``ldm/families/<name>/
diffusers.py``, in this layer). Imports models, weights and below; never training or the web UI.
"""
