"""``--peer diffusers``: the DreamBooth training step as diffusers' ``examples/dreambooth/train_dreambooth.py`` runs
it, written out here (not imported from the script, which is not a library), on the same weights as ours.

Its parts: diffusers' ``UNet2DConditionModel``, ``AutoencoderKL`` and ``DDPMScheduler``, transformers'
``CLIPTextModel`` and ``CLIPTokenizer``. The weights are our model's, converted by diffusers' own single-file
converters (UNet, VAE) and under transformers' names (text encoder), so both steps start from the same network.

One step, in the script's order (``--with_prior_preservation``, ``--train_text_encoder`` for ``full``,
``--gradient_checkpointing`` for ``+ckpt``, ``--use_8bit_adam`` for ``+8bit``, ``--mixed_precision`` for
``+mixed``, ``--set_grads_to_none``): subject and class images in one batch through the VAE (latent sample times
the scaling factor), noise and timesteps, ``add_noise``, the text encoder's last hidden state, the UNet, the
prediction split into subject and class halves, ``mse(subject) + prior_loss_weight * mse(class)`` in float32,
backward, ``clip_grad_norm_(max_grad_norm=1.0)`` (the script's default), optimizer step, LR-scheduler step,
``zero_grad(set_to_none=True)``. With mixed precision the script casts the frozen VAE (and a frozen text encoder)
to the half dtype and autocasts the trained models (accelerate's ``prepare``); the UNet's weights stay fp32.

The only departure: the latent sample, the timesteps and the noise come from a generator seeded per step and are
drawn in our order (latent sample, timesteps, noise), so that with the same weights both steps see the same
numbers and must compute the same loss (the tests check it). The script draws noise before timesteps from the
global generator, which changes the numbers, not the work.
"""
from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Optional

MAX_GRAD_NORM = 1.0  # train_dreambooth.py's --max_grad_norm default



def script_optimizer(name: str, params: list, lr: float, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    """What diffusers' DreamBooth scripts build: ``--use_8bit_adam`` (bitsandbytes' AdamW8bit) or torch's AdamW,
    and ``--lr_scheduler constant``."""
    import torch
    from diffusers.optimization import get_scheduler
    if name == "adamw8bit":
        import bitsandbytes as bnb
        optimizer = bnb.optim.AdamW8bit(params, lr=lr, **kwargs)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, **kwargs)
    return optimizer, get_scheduler("constant", optimizer=optimizer)

class PeerStep:
    """diffusers' DreamBooth step over our model's weights (see the module docstring)."""

    def __init__(self, model: Any, params: Mapping[str, Any], batch: Mapping[str, Any], text_encoder: bool,
                 checkpointing: bool, optimizer: str, lr: float, optimizer_kwargs: Mapping[str, Any],
                 mixed: Any) -> None:
        import torch
        from diffusers import DDPMScheduler
        from ldm.export.diffusers import scheduler_config
        device = model.device
        self.device, self.mixed, self.train_text_encoder = device, mixed, text_encoder
        self.unet, self.vae, self.text_encoder = convert_components(model, params)
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config(params))
        self.prior_loss_weight = float(params.get("reg_weight", 1.0))
        # train_dreambooth.py: weight_dtype for the frozen parts under mixed precision; the trained ones stay fp32.
        self.weight_dtype = mixed if mixed is not None else torch.float32
        self.vae.to(device, dtype=self.weight_dtype).requires_grad_(False)
        self.text_encoder.to(device, dtype=torch.float32 if text_encoder else self.weight_dtype)
        self.text_encoder.requires_grad_(text_encoder)
        self.unet.to(device).train()
        if checkpointing:
            self.unet.enable_gradient_checkpointing()
            if text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        self.text_encoder.train(text_encoder)
        self.params = list(self.unet.parameters()) + (list(self.text_encoder.parameters()) if text_encoder else [])
        self.optimizer, self.lr_scheduler = script_optimizer(optimizer, self.params, lr, optimizer_kwargs)
        self.scaler = torch.amp.GradScaler(device.type) if mixed == torch.float16 else None
        # The script's dataset: pixel values in [-1, 1], instance then class; token ids padded to 77.
        self.pixel_values = torch.cat([batch["image"], batch["reg_image"]]).to(device)
        self.pixel_values = self.pixel_values.to(memory_format=torch.contiguous_format).float()
        tokenizer = build_tokenizer(params)
        captions = list(batch["caption"]) + list(batch["reg_caption"])
        self.input_ids = tokenizer(captions, truncation=True, padding="max_length",
                                   max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        self.steps = 0
        self.first_loss: Optional[float] = None

    def autocast(self) -> Any:
        import torch
        return torch.autocast(self.device.type, dtype=self.mixed) if self.mixed is not None else nullcontext()

    def __call__(self) -> None:
        import torch
        import torch.nn.functional as F
        g = torch.Generator(self.device).manual_seed(self.steps)
        pixel_values = self.pixel_values.to(dtype=self.weight_dtype)
        model_input = self.vae.encode(pixel_values).latent_dist.sample(generator=g)
        model_input = model_input * self.vae.config.scaling_factor
        bsz = model_input.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=self.device,
                                  generator=g).long()
        noise = torch.randn(model_input.shape, generator=g, device=self.device, dtype=model_input.dtype)
        noisy_model_input = self.noise_scheduler.add_noise(model_input, noise, timesteps)
        with self.autocast() if self.train_text_encoder else nullcontext():
            encoder_hidden_states = self.text_encoder(self.input_ids)[0]
        with self.autocast():
            model_pred = self.unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]
        target = noise  # epsilon prediction
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
        loss = loss + self.prior_loss_weight * prior_loss
        if self.scaler is None:  # accelerator.backward, clip_grad_norm_, optimizer.step
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.first_loss is None:
            self.first_loss = float(loss.detach())
        self.steps += 1


def convert_components(model: Any, params: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """Our model's UNet, VAE and text encoder as diffusers' and transformers' modules holding its tensors
    (built on the meta device and filled by assignment: the weights exist once)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel
    from ldm.export.diffusers import _build, text_encoder_config, text_encoder_weights, unet_config, vae_config
    weights = model.state_dict()
    configs = {"unet": unet_config(params), "vae": vae_config(params)}
    unet = _build(UNet2DConditionModel, convert_ldm_unet_checkpoint(weights, configs["unet"]), torch.float32,
                  **configs["unet"])
    vae = _build(AutoencoderKL, convert_ldm_vae_checkpoint(weights, configs["vae"]), torch.float32, **configs["vae"])
    hf_config = CLIPTextConfig(**text_encoder_config(params))
    with torch.device("meta"):
        expected = CLIPTextModel(hf_config).state_dict().keys()
    text = _build(CLIPTextModel, text_encoder_weights(weights, expected), torch.float32, config=hf_config)
    return unet, vae, text


def build_tokenizer(params: Mapping[str, Any]) -> Any:
    """transformers' ``CLIPTokenizer`` from the vocabulary files our export writes (the same BPE merges as ours)."""
    from transformers import CLIPTokenizer
    from ldm.export.diffusers import _with_defaults, tokenizer_files
    clip = _with_defaults(params["cond_stage_config"])
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in tokenizer_files(clip["bpe_path"], clip["max_length"]).items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp)
