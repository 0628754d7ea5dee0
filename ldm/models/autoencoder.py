"""AutoencoderKL: the first stage of Stable Diffusion (v1 and XL).

Reproduces the KL-regularised autoencoder of Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models" (CVPR 2022, Sec. 3.1): an image x is encoded to a diagonal Gaussian q(z|x) over 4-channel
latents at 1/8 resolution and decoded back. The keys of ``state_dict()`` equal the ``first_stage_model.*``
keys of the released checkpoints. DreamBooth keeps it frozen; it trains through ``main.py`` as in the original
codebase (``configs/toy/autoencoder.yaml``) with a loss that has no weights of its own (``lossconfig``), so the
key layout never changes.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


class AutoencoderKL(pl.LightningModule):
    """Encoder -> ``quant_conv`` -> q(z|x); z -> ``post_quant_conv`` -> Decoder.

    Args:
        ddconfig: keyword arguments shared by :class:`Encoder` and :class:`Decoder`; ``double_z`` must be true.
        lossconfig: ``target``/``params`` of the training loss. Only parameter-free losses
            (``torch.nn.Identity`` in the SD configs) are accepted, so the state dict stays the checkpoint's.
        embed_dim: latent channels after ``quant_conv`` (4 for SD v1).
        ckpt_path: not supported here; weights load through the LatentDiffusion checkpoint loader.
        ignore_keys: only meaningful with ``ckpt_path``.
        image_key: the batch entry :meth:`get_input` reads.
        colorize_nlabels: segmentation-map first stages only; not supported.
        monitor: the metric name the original logged for checkpointing; accepted (original configs carry it)
            and ignored.
        use_quant_conv: False for autoencoders without the two 1x1 convolutions (FLUX.1's ``ae.safetensors``:
            16 latent channels straight from the encoder); ``embed_dim`` must then equal ``z_channels``.
    """

    UNREAD_PARAMS = ("monitor",)  # accepted for the original configs (see ldm.training.config.unread_keys)

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        use_quant_conv: bool = True,
    ) -> None:
        super().__init__()
        if ckpt_path is not None:
            raise ValueError(
                f"AutoencoderKL(ckpt_path={ckpt_path!r}) is not supported: load the whole Stable Diffusion "
                "checkpoint through the LatentDiffusion loader (ldm/weights/checkpoint.py), which fills "
                "first_stage_model.* and reports every missing or unexpected key."
            )
        if colorize_nlabels is not None:
            raise ValueError("colorize_nlabels is for segmentation-map autoencoders, which this codebase does not have.")
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z = true: the encoder must output mean and logvar.")
        self.image_key = image_key
        del monitor  # accepted because the original configs carry it; nothing here reads it
        self.embed_dim = embed_dim

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        if len(self.loss.state_dict()) > 0:
            # A loss with weights (e.g. LPIPS + discriminator) would add loss.* keys that no SD checkpoint has.
            raise ValueError(
                f"lossconfig {lossconfig['target']} has parameters or buffers; the frozen first stage only "
                "accepts a parameter-free loss such as torch.nn.Identity."
            )
        self.learning_rate = 4.5e-6  # training: main.py sets model.base_learning_rate (scaled) here
        z_channels = ddconfig["z_channels"]
        if not use_quant_conv and embed_dim != z_channels:
            raise ValueError(f"AutoencoderKL(use_quant_conv=False) needs embed_dim == ddconfig.z_channels "
                             f"({embed_dim} != {z_channels}): nothing maps one onto the other")
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1) if use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1) if use_quant_conv else nn.Identity()

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image in [-1, 1], (B, 3, H, W) -> q(z|x) over (B, embed_dim, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``input`` through a sampled (or, with ``sample_posterior=False``, the mean) latent."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch: Mapping[str, torch.Tensor], k: str | None = None) -> torch.Tensor:
        """Batch images as ``(B, C, H, W)`` float from ``image_key``; channels-last ``(B, H, W, C)`` batches (the
        original's datasets) are permuted."""
        x = batch[self.image_key if k is None else k]
        if x.ndim == 3:
            x = x[..., None]
        if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
            x = x.permute(0, 3, 1, 2)
        return x.contiguous().float()

    # ---- training (configs/toy/autoencoder.yaml) ---------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        x = self.get_input(batch)
        reconstruction, posterior = self(x)
        loss, logs = self.loss(x, reconstruction, posterior)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=True, on_step=True, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with the original first stage's betas (0.5, 0.9)."""
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate, betas=(0.5, 0.9))
