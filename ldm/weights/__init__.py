"""Weight files: the one checkpoint loader and saver (``checkpoint``: weights-only pickles or safetensors, the key
audit, EMA selection, NaN/Inf refusal, atomic writes), building a model and filling it from files (``load``), a
separate VAE file (``vae``), and LoRA adapters in sd-scripts' layout (``lora``). Below the models, so a model can
load weights and adapters; imports only the networks, the family records and the core helpers.
"""
