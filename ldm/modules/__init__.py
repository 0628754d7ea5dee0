"""The networks, with the original attribute names so the released checkpoints load by name: the UNet and its
attention, the VAE's blocks, the CLIP and OpenCLIP text encoders and sgm's conditioner, EMA, the LoRA layers, and
``speed`` (torch.compile and channels-last for a module). Plain ``torch.nn`` code: imports only the core helpers.
"""
