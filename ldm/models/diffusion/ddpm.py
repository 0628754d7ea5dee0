"""LatentDiffusion (Rombach et al. 2022): the frozen VAE, the text encoder and the denoising UNet, wired together.

This file keeps the original public names (``apply_model``, ``get_learned_conditioning``,
``encode_first_stage``, ``get_first_stage_encoding``, ``decode_first_stage``, ``q_sample``, ``ema_scope``)
and the original attribute names, which fix the checkpoint keys: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.*`` (CLIP text encoder), ``model_ema.*`` and the schedule
buffers at the top level. The schedule maths lives in ``schedule.py``, samplers in ``ddim.py``/``plms.py``, the
training step, optimizer and checkpoint hooks in ``training.py``.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.data.cache import LatentCache, TextCache
from ldm.models.diffusion.conditioning import MicroConditioning, TextConditioning
from ldm.models.diffusion.dreambooth import DreamBoothTraining
from ldm.models.diffusion.objectives import EpsObjective, FlowObjective, TimestepSampling
from ldm.models.diffusion.schedule import BetaSchedule, extract_into_tensor, predict_x0, q_sample, register_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config
from ldm.weights.lora import LoraSettings


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for ``nn.Module.train`` on frozen parts, so Lightning's ``model.train()`` cannot flip them."""
    return self


def freeze(module: nn.Module) -> None:
    module.eval()
    module.train = disabled_train.__get__(module)
    for p in module.parameters():
        p.requires_grad = False


@contextmanager
def borrowed(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Run ``module`` on ``device`` for the body, then put it back: frozen parts offloaded to the CPU during
    training (cached latents) come back to the GPU only when validation images are sampled."""
    home = next(module.parameters()).device
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model``: this thin layer is what pins the ``model.diffusion_model.`` prefix.

    ``conditioning_key``: ``crossattn`` (SD v1, SDXL) cross-attends to ``c_crossattn``; ``hybrid`` (inpainting
    models) also concatenates ``c_concat`` (mask and masked-image latent) to the input channels. A vector ``y``
    (SDXL's pooled text and size embeddings) goes to the UNet's label embedding whenever it is given. ``flux``:
    the network is FLUX.1's transformer, which takes the text tokens, the pooled vector and (dev) the guidance
    strength, and returns the flow's velocity (``Flux.velocity``)."""

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: Optional[str]):
        super().__init__()
        if conditioning_key not in ("crossattn", "hybrid", "flux", None):
            raise NotImplementedError(f"conditioning_key {conditioning_key!r}: expected crossattn, hybrid or flux")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_crossattn: Optional[Sequence[torch.Tensor]] = None,
                c_concat: Optional[Sequence[torch.Tensor]] = None, y: Optional[torch.Tensor] = None,
                guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.conditioning_key == "flux":
            return self.diffusion_model.velocity(x, t, torch.cat(list(c_crossattn), 1), y, guidance)
        if self.conditioning_key is None:
            return self.diffusion_model(x, t, y=y)
        if self.conditioning_key == "hybrid":
            if not c_concat:
                raise ValueError("an inpainting (hybrid) model needs c_concat: the mask and the masked image's latent")
            x = torch.cat([x, *c_concat], dim=1)
        return self.diffusion_model(x, t, context=torch.cat(list(c_crossattn), 1), y=y)


def _batch_size(cond: Any) -> int:
    """The batch size of a conditioning (a context tensor, a list of them, or the keyword dict)."""
    if isinstance(cond, Mapping):
        cond = cond["c_crossattn"]
    return (cond[0] if isinstance(cond, (list, tuple)) else cond).shape[0]


class LatentDiffusion(DreamBoothTraining, pl.LightningModule):
    """Stable Diffusion (v1 and XL): eps-prediction diffusion in the latent space of a KL autoencoder, conditioned on
    text through ``cond_stage_config`` (SD v1: one CLIP encoder at ``cond_stage_model``) or ``conditioner_config``
    (SDXL: sgm's ``GeneralConditioner`` at ``conditioner``, two text encoders plus size/crop embeddings)."""

    #: Parameters accepted only because the original configs carry them (see ``ldm.training.config.unread_keys``).
    UNREAD_PARAMS = ("log_every_t", "monitor")

    def __init__(self,
                 first_stage_config: Mapping[str, Any],
                 unet_config: Mapping[str, Any],
                 cond_stage_config: Optional[Mapping[str, Any]] = None,
                 conditioner_config: Optional[Mapping[str, Any]] = None,
                 num_timesteps_cond: int = 1,
                 cond_stage_key: str = "caption",
                 cond_stage_trainable: bool = False,
                 conditioning_key: Optional[str] = "crossattn",
                 scale_factor: float = 1.0,
                 scale_by_std: bool = False,
                 timesteps: int = 1000,
                 beta_schedule: BetaSchedule = "linear",
                 linear_start: float = 1e-4,
                 linear_end: float = 2e-2,
                 cosine_s: float = 8e-3,
                 first_stage_key: str = "image",
                 image_size: int = 64,
                 channels: int = 4,
                 use_ema: bool = True,
                 ema_decay: float = 0.9999,
                 parameterization: Literal["eps", "flow"] = "eps",
                 loss_type: Literal["l2", "l1"] = "l2",
                 scheduler_config: Optional[Mapping[str, Any]] = None,
                 reg_weight: float = 1.0,
                 optimizer_config: Optional[Mapping[str, Any]] = None,
                 lr_warmup_steps: int = 0,
                 lr_schedule: Literal["constant", "cosine"] = "constant",
                 lora_config: Optional[Mapping[str, Any]] = None,
                 text_encoder_lr: Optional[float] = None,
                 offset_noise: float = 0.0,
                 min_snr_gamma: Optional[float] = None,
                 cache_latents: bool = False,
                 caption_dropout: float = 0.0,
                 mask_floor: float = 0.1,
                 prior_preservation: Literal["class_images", "base_model"] = "class_images",
                 set_grads_to_none: bool = True,
                 weights_dtype: Literal["fp32", "bf16"] = "fp32",
                 frozen_dtype: Literal["fp32", "bf16", "fp8"] = "fp32",
                 text_encoder_fp8: bool = False,
                 blocks_to_swap: int = 0,
                 compile: bool = False,
                 channels_last: bool = False,
                 ckpt_path: Optional[str] = None,
                 vae_path: Optional[str] = None,
                 component_paths: Optional[Mapping[str, str]] = None,
                 persist_schedule: bool = True,
                 shift_factor: float = 0.0,
                 timestep_sampling: TimestepSampling = "flux_shift",
                 sigmoid_scale: float = 1.0,
                 discrete_flow_shift: float = 3.0,
                 time_shift: bool = True,
                 base_shift: float = 0.5,
                 max_shift: float = 1.15,
                 train_guidance: float = 1.0,
                 log_every_t: Optional[int] = None,
                 monitor: Optional[str] = None):
        """``parameterization``: ``eps`` (SD v1/XL) or ``flow`` (FLUX.1's rectified flow; ``objectives.py``), whose
        training draws t by ``timestep_sampling`` (``sigmoid_scale``, ``discrete_flow_shift``, ``base_shift`` and
        ``max_shift``), whose samplers shift their schedule by resolution when ``time_shift`` (FLUX.1-dev; schnell
        does not), and whose guidance-distilled network (dev) trains at guidance ``train_guidance``. ``shift_factor``
        moves the latents before scaling (FLUX's autoencoder: 0.1159; 0 for SD).

        ``log_every_t`` and ``monitor`` are accepted, and ignored, only because the original configs (and
        users' copies of them) carry them: the first sized the original's progressive-denoising plots, the
        second named a validation metric of the original trainer; nothing here reads either."""
        super().__init__()
        del log_every_t, monitor
        if parameterization == "eps":
            self.objective = EpsObjective(min_snr_gamma)
        elif parameterization == "flow":
            if min_snr_gamma:
                raise ValueError("min_snr_gamma weights eps-prediction's timesteps; a flow model has none")
            self.objective = FlowObjective(timestep_sampling, sigmoid_scale, discrete_flow_shift, base_shift,
                                           max_shift)
        else:
            raise NotImplementedError(f"parameterization {parameterization!r}: expected eps or flow")
        self.parameterization = parameterization
        self.time_shift, self.base_shift, self.max_shift = time_shift, base_shift, max_shift
        self.train_guidance, self.shift_factor = train_guidance, shift_factor
        if num_timesteps_cond != 1:
            raise NotImplementedError("num_timesteps_cond other than 1 is not used by SD v1")
        self.loss_type = loss_type
        self.cond_stage_key, self.first_stage_key = cond_stage_key, first_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.image_size, self.channels = image_size, channels
        # SD v1/XL fix the latent scale (0.18215 / 0.13025). A model trained from scratch (the toy model) measures
        # it as the original did with scale_by_std: 1 / std of the first batch's latents, kept as the buffer
        # ``scale_factor`` in its checkpoints (loading one marks the scale as measured).
        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor), device="cpu"))
            self._scale_measured = False
        else:
            self.scale_factor = scale_factor
        self.scheduler_config = scheduler_config
        self.reg_weight = reg_weight
        self.optimizer_config = dict(optimizer_config or {})
        self.lr_warmup_steps, self.lr_schedule = lr_warmup_steps, lr_schedule
        self.learning_rate = 1.0e-4  # main.py sets base_learning_rate (times the batch scaling) here
        # The text encoder's own rate when it trains (cond_stage_trainable, or LoRA adapters on it), as kohya's and
        # diffusers' text_encoder_lr; None: the network's. main.py scales it as it scales base_learning_rate.
        if text_encoder_lr is not None and not text_encoder_lr > 0:
            raise ValueError(f"model.params.text_encoder_lr must be > 0, got {text_encoder_lr}")
        self.text_encoder_lr = text_encoder_lr
        self.text_learning_rate: Optional[float] = text_encoder_lr
        self.lora_settings = LoraSettings(**lora_config) if lora_config else None
        # Where the prior term's target comes from: class images (the paper's), or, without class images, the base
        # model's own prediction for the class prompt on the subject's noisy latents (LoRA: adapters off; a full
        # fine-tune: a frozen copy of the trained weights as they were at the start, taken in configure_model).
        if prior_preservation not in ("class_images", "base_model"):
            raise ValueError(f"model.params.prior_preservation {prior_preservation!r}: expected class_images or "
                             f"base_model")
        self.prior_preservation = prior_preservation
        if self.lora_settings and use_ema:
            raise NotImplementedError("use_ema with LoRA: the EMA would track the frozen base weights")
        self.offset_noise, self.min_snr_gamma = offset_noise, min_snr_gamma
        self.cache_latents, self.set_grads_to_none = cache_latents, set_grads_to_none
        # The lean-training switches (README: "Training on small GPUs"): trainable weights stored in bf16 (stochastic
        # rounding in the optimizer), the UNet compiled (torch.compile) and/or in channels-last memory format,
        # and with optimizer_config.fused_backward each update inside backward (manual optimization, below).
        if weights_dtype not in ("fp32", "bf16"):
            raise ValueError(f"weights_dtype {weights_dtype!r}: expected fp32 or bf16")
        self.weights_dtype = weights_dtype
        # The big-transformer switches (ldm/modules/lowmem.py): frozen weights in bf16 (or, for the network's
        # linear layers, float8 with a per-tensor scale), the text encoders' in float8, and the first
        # ``blocks_to_swap`` blocks kept in host memory until they run.
        if frozen_dtype not in ("fp32", "bf16", "fp8"):
            raise ValueError(f"frozen_dtype {frozen_dtype!r}: expected fp32, bf16 or fp8")
        self.frozen_dtype, self.text_encoder_fp8, self.blocks_to_swap = frozen_dtype, text_encoder_fp8, blocks_to_swap
        self.compile_unet, self.channels_last = compile, channels_last
        self.automatic_optimization = not self.optimizer_config.get("fused_backward", False)
        # Pretraining from scratch: the probability that a caption is replaced by "" (Ho & Salimans 2022), so the
        # model also learns the unconditional prediction that classifier-free guidance needs.
        self.caption_dropout = caption_dropout
        # Masked loss (data.params.masked_loss): the weight of background latent pixels in the subject's loss.
        self.mask_floor = mask_floor
        # Set by the CacheFrozenInputs callback when cache_latents is on; None means "run the frozen parts".
        self.latent_cache: Optional[LatentCache] = None
        self.text_cache: Optional[TextCache] = None
        # Set by the training module to --seed: every step then draws its t, noise and latent sample from a
        # generator seeded by (seed, epoch, batch, rank), so a resumed run repeats an uninterrupted one exactly.
        self.noise_seed: Optional[int] = None
        self.batches_trained = 0  # counts training batches across epochs and resumes (saved in checkpoints)

        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)
        # SD v1 files hold the twelve schedule buffers; SDXL files hold none (persist_schedule: false).
        register_schedule(self, beta_schedule=beta_schedule, timesteps=timesteps, linear_start=linear_start,
                          linear_end=linear_end, cosine_s=cosine_s, persistent=persist_schedule)

        self.first_stage_model = instantiate_from_config(first_stage_config)
        freeze(self.first_stage_model)
        # A separate VAE file (e.g. SDXL's float16-safe VAE) that the loader puts in after the main weights, and
        # the files of a family released in parts (FLUX.1's ae, t5, clip), by the name of their flag.
        self.vae_path = vae_path
        self.component_paths = dict(component_paths or {})
        if (cond_stage_config is None) == (conditioner_config is None):
            raise ValueError("give one of cond_stage_config (SD v1) and conditioner_config (SDXL)")
        if conditioner_config is not None:
            self.conditioner = instantiate_from_config(conditioner_config)  # freezes its non-trainable embedders
            self.conditioning = MicroConditioning(self.conditioner)
        else:
            self.cond_stage_model = instantiate_from_config(cond_stage_config)
            if cond_stage_trainable:
                self.cond_stage_model.requires_grad_(True)
            else:
                freeze(self.cond_stage_model)
            self.conditioning = TextConditioning(self.cond_stage_model)

        if frozen_dtype != "fp32":  # before the weights arrive, so a model built on the meta device loads them so
            for part in self.frozen_parts():
                part.to(torch.bfloat16)
        if ckpt_path is not None:
            from ldm.weights.checkpoint import load_checkpoint  # local: the loader imports this module's names
            load_checkpoint(self, ckpt_path)

    # ---- EMA -------------------------------------------------------------------------------------------
    @contextmanager
    def ema_scope(self, context: Optional[str] = None) -> Iterator[None]:
        """Run the body with the EMA weights in place of the live ones (a no-op when EMA is off)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.use_ema:
            self.model_ema(self.model)

    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if self.scale_by_std and not self._scale_measured:
            with torch.no_grad():
                posterior = self.latent_cache.posterior(batch, [self.first_stage_key]) if self.latent_cache \
                    else self.encode_first_stage(batch[self.first_stage_key])
                z = posterior.sample() if isinstance(posterior, DiagonalGaussianDistribution) else posterior
                self.scale_factor.fill_(1.0 / z.flatten().std())
            self._scale_measured = True
            print(f"scale_by_std: scale_factor = {float(self.scale_factor):.5f} (1 / std of the first batch's latents)")

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.scale_by_std and prefix + "scale_factor" in state_dict:
            self._scale_measured = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- first stage (VAE) -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        with self.frozen_autocast(x.device):
            return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: DiagonalGaussianDistribution | torch.Tensor,
                                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample the posterior and scale it to unit variance (the 0.18215 of SD v1; FLUX also shifts it first)."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior)} not supported")
        return self.scale_factor * (z - self.shift_factor)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        with borrowed(self.first_stage_model, z.device), self.frozen_autocast(z.device):
            return self.first_stage_model.decode(z / self.scale_factor + self.shift_factor).float()

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell along a side (8 for SD v1 and SDXL)."""
        return 2 ** (len(self.first_stage_model.encoder.down) - 1)

    # ---- conditioning ----------------------------------------------------------------------------------
    @property
    def text_model(self) -> nn.Module:
        """The module holding the text encoder(s): ``cond_stage_model`` (SD v1) or ``conditioner`` (SDXL)."""
        return self.conditioning.module

    def encode_text(self, prompts: Sequence[str]) -> Any:
        """The text parts of the conditioning (what a text cache stores per caption)."""
        with borrowed(self.text_model, self.betas.device), self.frozen_autocast(self.betas.device):
            return self.conditioning.text(list(prompts))

    def default_sizes(self, n: int, height: Optional[int] = None, width: Optional[int] = None,
                      original: Optional[tuple[int, int]] = None) -> Any:
        """SDXL's size/crop inputs for ``n`` images of ``height`` x ``width`` pixels (default: the model's own
        resolution), uncropped, made from a source region of ``original`` = (height, width) pixels (default: the
        same size; img2img and inpainting pass the region's size before resizing); None for a model without them."""
        native = self.image_size * self.vae_factor
        return self.conditioning.default_sizes(n, height or native, width or native, self.betas.device, original)

    def get_learned_conditioning(self, c: Sequence[str] | str, sizes: Optional[Mapping[str, torch.Tensor]] = None
                                 ) -> Any:
        """Prompts -> what the UNet is conditioned on: SD v1, CLIP's last hidden states ``[B, 77, context_dim]``
        (as the original); SDXL, ``{"c_crossattn": [...], "y": ...}`` for the given (default: native) sizes."""
        prompts = [c] if isinstance(c, str) else list(c)
        sizes = sizes if sizes is not None else self.default_sizes(len(prompts))
        return self.conditioning.learned(self.encode_text(prompts), sizes)

    def get_unconditional_conditioning(self, negatives: Sequence[str],
                                       sizes: Optional[Mapping[str, torch.Tensor]] = None) -> Any:
        """The unconditional input of classifier-free guidance for these negative prompts ("" for none)."""
        sizes = sizes if sizes is not None else self.default_sizes(len(negatives))
        with borrowed(self.text_model, self.betas.device), self.frozen_autocast(self.betas.device):
            return self.conditioning.unconditional(list(negatives), sizes)

    # ---- denoiser --------------------------------------------------------------------------------------
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor,
                    cond: torch.Tensor | Mapping[str, Any] | Sequence[torch.Tensor],
                    return_ids: bool = False) -> torch.Tensor:
        """eps_theta(x_t, t, c). ``cond`` is a context tensor, a list of them, or ``{"c_crossattn": [...]}``."""
        if return_ids:
            raise NotImplementedError("return_ids is only meaningful for patched (split-input) models")
        if not isinstance(cond, Mapping):
            cond = {"c_crossattn": cond if isinstance(cond, (list, tuple)) else [cond]}
        if self.channels_last:
            x_noisy = x_noisy.contiguous(memory_format=torch.channels_last)
        with self.frozen_autocast(x_noisy.device):
            return self.model(x_noisy, t, **cond)

    def frozen_autocast(self, device: torch.device) -> Any:
        """bf16 autocast around every use of frozen weights stored in bf16 or float8 (``frozen_dtype``): the
        training step has Lightning's, but latent and text caching, class images and validation grids run outside
        it. Nothing for an fp32 model."""
        if self.frozen_dtype == "fp32":
            return nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    @property
    def guidance_distilled(self) -> bool:
        """Whether the network takes the guidance strength as an input (FLUX.1-dev's guidance embedding)."""
        return bool(getattr(self.model.diffusion_model, "guidance_in", None) is not None)

    def with_guidance(self, cond: Any, guidance: float) -> Any:
        """``cond`` with the distilled guidance strength a guidance-embedded network reads (``guidance``, one per
        sample); unchanged for every other network."""
        if not self.guidance_distilled:
            return cond
        batch = _batch_size(cond)
        return {**cond, "guidance": torch.full((batch,), float(guidance), device=self.betas.device)}

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        return q_sample(self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod, x_start, t, noise)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 from x_t and eps (inverse of eq. 4 of Ho et al. 2020)."""
        return predict_x0(x_t, noise, extract_into_tensor(self.alphas_cumprod, t, x_t.shape))
