"""``--peer diffusers`` for FLUX.1: the DreamBooth-LoRA step as diffusers'
``examples/dreambooth/train_dreambooth_lora_flux.py`` runs it, written out here (not imported from the script, which
is not a library), on the same weights as ours.

Its parts: diffusers' ``FluxTransformer2DModel`` with peft LoRA on the script's default targets
(``LORA_TARGETS``: every attention projection of both streams and both feed-forward layers of the double blocks;
``to_q``/``to_k``/``to_v`` match in the single blocks too), ``AutoencoderKL`` and
``FlowMatchEulerDiscreteScheduler``; transformers' ``CLIPTextModel`` + ``CLIPTokenizer`` and ``T5EncoderModel`` +
``T5TokenizerFast``. The weights are our model's under their names (``ldm.families.flux.diffusers``: the transformer
renamed by ``transformer_weights``, which works at any width where diffusers' single-file converter assumes FLUX's
3072, the autoencoder by diffusers' ``convert_ldm_vae_checkpoint``; the text encoders keep transformers' names), so
both steps start from the same network.

The script's setup, with ``--with_prior_preservation``, ``--rank R``, ``--gradient_checkpointing`` (+ckpt),
``--use_8bit_adam`` (+8bit), ``--mixed_precision bf16`` (+bf16) and ``--cache_latents`` (+cached): every frozen part
cast to the weight dtype (bf16 under mixed precision, where peft then gives the adapters the same dtype); the
instance and class prompts encoded once (CLIP's pooled output; T5's last hidden state, padded to
``--max_sequence_length``) and both text encoders deleted; with ``--cache_latents`` the images' latent distributions
computed once and the autoencoder deleted.

One step, in the script's order: the latent sampled, shifted and scaled, noise, sigmas, x_t = (1 - sigma) z +
sigma noise packed into 2x2 patches with their image ids, the transformer at timestep / 1000 with the guidance
embedding at ``--guidance_scale`` (under autocast with mixed precision), unpacked, target noise - z, weighting
scheme ``none``, the prediction chunked into instance and class halves, mean((pred - target)^2) per half, instance +
``prior_loss_weight`` x class, backward, ``clip_grad_norm_(1.0)``, optimizer step, LR scheduler step, ``zero_grad``.

Departures, each a flag of the script or the draws: ``--guidance_scale`` is the config's ``train_guidance`` (the
recipe's 1.0; the script's default 3.5), ``--max_sequence_length`` our T5 ``max_length``, the learning rate and AdamW
settings ours; the text ids are one prompt's (the transformer shares them across the batch), where the script
concatenates the instance and class prompts' ids with prior preservation, which its transformer call then refuses
(diffusers issue #10722; the fix of pull request #13949). The latent sample, sigma and noise come from a generator
seeded per step, drawn in our order (latent, t, noise) and with our density (the recipe's ``flux_shift``): the
script draws u ~ U(0, 1), takes timesteps = ``scheduler.timesteps[int(1000 u)]`` and its table's sigma there, which
on FLUX.1-dev's table (dynamic shifting leaves it unshifted for training) is timestep / 1000; here the timestep is
1000 t, so sigma = t. That changes the numbers, not the work: with the same weights both steps compute the same
loss (the tests check it).
"""
from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Optional

from benchmarks.peer_dreambooth import script_optimizer

MAX_GRAD_NORM = 1.0  # the script's --max_grad_norm default
#: The script's ``target_modules`` when ``--lora_layers`` is not given.
LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")


class FluxPeerStep:
    """diffusers' FLUX.1 DreamBooth-LoRA step over our model's weights (see the module docstring)."""

    def __init__(self, model: Any, params: Mapping[str, Any], batch: Mapping[str, Any], rank: int,
                 checkpointing: bool, optimizer: str, lr: float, optimizer_kwargs: Mapping[str, Any], mixed: Any,
                 cache_latents: bool) -> None:
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler
        from peft import LoraConfig
        from ldm.families.flux.diffusers import pipeline_configs
        from ldm.models.diffusion.objectives import FlowObjective
        device = model.device
        configs = pipeline_configs(params)
        self.device, self.mixed = device, mixed
        self.weight_dtype = mixed if mixed is not None else torch.float32
        self.transformer, vae, clip, t5 = convert_components(model, configs, self.weight_dtype)
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"])
        self.objective = FlowObjective(**{k: params[k] for k in ("timestep_sampling", "sigmoid_scale",
                                                                 "discrete_flow_shift", "base_shift", "max_shift")
                                          if k in params})
        self.guidance = float(params.get("train_guidance", 1.0))
        self.prior_loss_weight = float(params.get("reg_weight", 1.0))
        for part in (self.transformer, vae, clip, t5):
            part.requires_grad_(False).to(device, dtype=self.weight_dtype)
        if checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                target_modules=list(LORA_TARGETS)))
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.optimizer, self.lr_scheduler = script_optimizer(optimizer, self.params, lr, optimizer_kwargs)
        # compute_text_embeddings for the instance and the class prompt, concatenated; then the encoders go.
        prompts = [batch["caption"][0], batch["reg_caption"][0]]
        self.prompt_embeds, self.pooled_prompt_embeds, self.text_ids = encode_prompts(
            clip, t5, configs, prompts, device)
        del clip, t5
        self.shift_factor, self.scaling_factor = vae.config.shift_factor, vae.config.scaling_factor
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        pixel_values = torch.cat([batch["image"], batch["reg_image"]]).to(device, dtype=self.weight_dtype)
        self.latents_cache, self.vae, self.pixel_values = None, vae, pixel_values
        if cache_latents:
            with torch.no_grad():
                self.latents_cache = vae.encode(pixel_values).latent_dist
            self.vae = None  # the script deletes it when there is no validation prompt
        del vae
        self.transformer.train()
        self.steps = 0
        self.first_loss: Optional[float] = None

    def __call__(self) -> None:
        import torch
        from diffusers import FluxPipeline
        from diffusers.training_utils import compute_loss_weighting_for_sd3
        g = torch.Generator(self.device).manual_seed(self.steps)
        if self.latents_cache is not None:
            model_input = self.latents_cache.sample(generator=g)
        else:
            model_input = self.vae.encode(self.pixel_values).latent_dist.sample(generator=g)
        model_input = (model_input - self.shift_factor) * self.scaling_factor
        model_input = model_input.to(dtype=self.weight_dtype)
        bsz, channels, height, width = model_input.shape
        latent_image_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, self.device,
                                                                   self.weight_dtype)
        # Our draws (module docstring): t, then the noise; sigma = t is the table's timestep / 1000.
        t = self.objective.sample_t(None, bsz, tuple(model_input.shape), self.device, g)
        timesteps = t * self.noise_scheduler.config.num_train_timesteps
        noise = torch.randn(model_input.shape, generator=g, device=self.device, dtype=model_input.dtype)
        sigmas = (timesteps / self.noise_scheduler.config.num_train_timesteps).to(model_input.dtype)
        sigmas = sigmas.view(-1, 1, 1, 1)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy_model_input, bsz, channels, height, width)
        guidance = torch.tensor([self.guidance], device=self.device).expand(bsz)
        with torch.autocast(self.device.type, dtype=self.mixed) if self.mixed is not None else nullcontext():
            model_pred = self.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                          pooled_projections=self.pooled_prompt_embeds,
                                          encoder_hidden_states=self.prompt_embeds, txt_ids=self.text_ids,
                                          img_ids=latent_image_ids, return_dict=False)[0]
        model_pred = FluxPipeline._unpack_latents(model_pred, height=height * self.vae_scale_factor,
                                                  width=width * self.vae_scale_factor,
                                                  vae_scale_factor=self.vae_scale_factor)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
        target = noise - model_input
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        # As the script writes it: the whole batch's weighting broadcast against each half (ones: the mean is
        # the half's).
        prior_loss = torch.mean((weighting.float() * (model_pred_prior.float() - target_prior.float()) ** 2)
                                .reshape(target_prior.shape[0], -1), 1).mean()
        loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2)
                          .reshape(target.shape[0], -1), 1).mean()
        loss = loss + self.prior_loss_weight * prior_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.transformer.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        if self.first_loss is None:
            self.first_loss = float(loss.detach())
        self.steps += 1


def convert_components(model: Any, configs: Mapping[str, Any], dtype: Any) -> tuple[Any, Any, Any, Any]:
    """Our model's transformer, autoencoder, CLIP and T5 as diffusers' and transformers' modules holding its
    tensors (built on the meta device and filled by assignment: the weights exist once)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    from ldm.export.diffusers import TEXT_MODEL, UNET, _build, text_encoder_weights
    from ldm.families.flux.diffusers import CLIP_TEXT, T5, transformer_weights
    weights = model.state_dict()
    config = configs["transformer"]
    bfl = {k[len(UNET):]: v for k, v in weights.items() if k.startswith(UNET)}
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    transformer = _build(FluxTransformer2DModel, transformer_weights(bfl, hidden), dtype, **config)
    vae = _build(AutoencoderKL, convert_ldm_vae_checkpoint(weights, configs["vae"]), dtype, **configs["vae"])
    clip_config = CLIPTextConfig(**configs["text"])
    with torch.device("meta"):
        expected = CLIPTextModel(clip_config).state_dict().keys()
    clip_weights = {TEXT_MODEL + k[len(CLIP_TEXT):]: v for k, v in weights.items() if k.startswith(CLIP_TEXT)}
    clip = _build(CLIPTextModel, text_encoder_weights(clip_weights, expected), dtype, config=clip_config)
    t5 = _build(T5EncoderModel, {k[len(T5):]: v for k, v in weights.items() if k.startswith(T5)}, dtype,
                config=T5Config(**configs["t5"]))
    t5.encoder.embed_tokens.weight = t5.shared.weight  # one tensor, as transformers' own loading ties them
    return transformer, vae, clip, t5


def encode_prompts(clip: Any, t5: Any, configs: Mapping[str, Any], prompts: list[str],
                   device: Any) -> tuple[Any, Any, Any]:
    """The script's ``encode_prompt`` of each prompt (CLIP's ``pooler_output`` of 77 tokens; T5's last hidden
    state padded to ``--max_sequence_length``; text ids of zeros), concatenated in the given order. The tokenizers
    are transformers' ``CLIPTokenizer`` and ``T5TokenizerFast`` built from the files our export writes."""
    import torch
    from transformers import CLIPTokenizer, T5TokenizerFast
    from ldm.export.diffusers import tokenizer_files
    from ldm.families.flux.diffusers import write_t5_tokenizer
    length = configs["t5_tokenizer"]["max_length"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer").mkdir()
        for name, text in tokenizer_files(configs["clip"]["bpe_path"], configs["clip"]["max_length"]).items():
            (Path(tmp) / "tokenizer" / name).write_text(text, encoding="utf-8")
        clip_tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer")
        write_t5_tokenizer(Path(tmp) / "tokenizer_2", configs["t5_tokenizer"]["path"], length)
        t5_tokenizer = T5TokenizerFast.from_pretrained(Path(tmp) / "tokenizer_2")
    embeds, pooled = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = clip_tokenizer([prompt], padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
            pooled.append(clip(ids.to(device), output_hidden_states=False).pooler_output.to(clip.dtype))
            ids = t5_tokenizer([prompt], padding="max_length", max_length=length, truncation=True,
                               return_tensors="pt").input_ids
            embeds.append(t5(ids.to(device))[0].to(t5.dtype))
    text_ids = torch.zeros(embeds[0].shape[1], 3, device=device, dtype=t5.dtype)
    return torch.cat(embeds), torch.cat(pooled), text_ids
