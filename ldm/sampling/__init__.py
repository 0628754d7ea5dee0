"""Sampling: the samplers by name (``samplers``: DDIM, PLMS, Euler, DPM-Solver++ 2M, and the one guided
sample-and-decode), the k-diffusion-style samplers and their sigma schedules, image-to-image (``img2img``),
inpainting (``inpaint``, ``masks``), and the command-line pieces the sampling scripts share (``cli``: flags, their
checks, loading a model with its LoRA). Imports models, weights and below; never training, exports or the web UI.
"""
