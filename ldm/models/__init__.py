"""The Lightning modules, as in the original code: ``autoencoder.AutoencoderKL`` and
``diffusion.ddpm.LatentDiffusion`` with its schedule, conditioning, training objective (``diffusion.dreambooth``,
the DreamBooth loss and Lightning's training hooks) and the original DDIM and PLMS samplers (``diffusion.ddim``,
``diffusion.plms``, where users of that code look for them). Imports the networks (``ldm.modules``), the data
caches, the optimizers (``ldm.optim``) and the checkpoint loader (``ldm.weights``); never sampling scripts,
exports, training runs or the web UI.
"""
