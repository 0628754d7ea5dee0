"""The training half of ``LatentDiffusion``: the DreamBooth objective (subject + weighted prior terms, masks,
aspect-ratio buckets), the seeded per-step randomness that makes resumes exact, LoRA, the optimizer and its lean
options (fused backward, bf16 weights, compile, channels-last), and the checkpoint hooks.

A mixin over the attributes ``LatentDiffusion.__init__`` sets: the model code (``ddpm.py``) reads as the
original's wiring of VAE, text encoder and UNet, and training lives here.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ContextManager, Iterator, Mapping, Optional

import torch
from torch import nn

from ldm.models.diffusion.conditioning import batch_sizes
from ldm.models.diffusion.ddim import concat_conditioning
from ldm.models.diffusion.losses import combine, mask_weights, offset_noise_, per_example_loss


class DreamBoothTraining:
    """Lightning's training hooks of ``LatentDiffusion`` (see the module docstring)."""

    def add_lora(self) -> None:
        """Freeze the base weights and add the configured LoRA adapters (after the base weights are loaded)."""
        from ldm.weights.lora import add_lora
        add_lora(self, self.lora_settings)

    def role_latents(self, batch: Mapping[str, Any], generator: Optional[torch.Generator] = None
                     ) -> list[torch.Tensor]:
        """Latents of the subject images and (when the batch has them) of the class images, one tensor per role:
        from the cache, else through the VAE. Roles of one shape are encoded together; with aspect-ratio buckets
        the subject and class halves may differ in shape, and are then encoded one after the other."""
        roles = [self.first_stage_key] + (["reg_" + self.first_stage_key] if "reg_" + self.first_stage_key in batch
                                          else [])
        groups = [roles] if len({tuple(batch[r].shape[1:]) for r in roles}) == 1 else [[r] for r in roles]
        out: list[torch.Tensor] = []
        for group in groups:
            if self.latent_cache is not None:
                posterior = self.latent_cache.posterior(batch, group)
            else:
                images = torch.cat([batch[r] for r in group]).to(memory_format=torch.contiguous_format)
                posterior = self.encode_first_stage(images)
            z = self.get_first_stage_encoding(posterior, generator).detach()
            out += list(z.split([len(batch[r]) for r in group]))
        return out

    def get_latents(self, batch: Mapping[str, Any], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Latents of the subject images, then of the class images (both halves of one shape)."""
        return torch.cat(self.role_latents(batch, generator))

    def get_captions(self, batch: Mapping[str, Any]) -> tuple[list[str], int]:
        captions = list(batch[self.cond_stage_key])
        return captions + list(batch.get("reg_" + self.cond_stage_key, [])), len(captions)

    def shared_step(self, batch: Mapping[str, Any], generator: Optional[torch.Generator] = None,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One DreamBooth loss evaluation: encode, noise at a random t, predict (eps, or a flow model's velocity:
        ``self.objective``), subject + prior terms.

        Subject and class examples go through the UNet in one pass when they have one shape, else in one pass
        each (aspect-ratio buckets). With a loss mask in the batch the subject terms weight latent pixels by it
        (``mask_floor`` for the background; class examples are never masked), and the unmasked subject loss is
        reported beside. Every random draw (posterior sample, t, noise, offset, caption dropout) comes from
        ``generator`` when one is given."""
        zs = self.role_latents(batch, generator)
        captions, n_subject = self.get_captions(batch)
        if self.caption_dropout > 0:
            drop = torch.rand(len(captions), generator=generator, device=generator.device if generator else None)
            captions = ["" if d < self.caption_dropout else c for c, d in zip(captions, drop.tolist())]
        roles = [""] + (["reg_"] if len(captions) > n_subject else [])
        device = zs[0].device
        t = self.objective.sample_t(self, len(captions), tuple(zs[0].shape), device, generator)
        same_shape = len({z.shape[1:] for z in zs}) == 1
        parts = [(torch.cat(zs), roles, 0, len(captions))] if same_shape else [
            (z, [role], start, start + len(z)) for z, role, start in zip(zs, roles, (0, n_subject))]
        preds, targets = [], []
        prior = None
        base_prior = self.prior_preservation == "base_model"
        for z, group, lo, hi in parts:
            c = self.condition_on(captions[lo:hi], batch, group)
            noise = offset_noise_(torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator),
                                  self.offset_noise, generator)
            x, t_part = self.objective.noised(self, z, t[lo:hi], noise), t[lo:hi]
            if base_prior and lo == 0:
                # The prior rows (the subject's noisy latents, class prompts) join the subject's pass: one
                # forward and backward of twice the batch is cheaper than two (0.17 s against 0.21 s for the
                # toy model's on a 2-core CPU).
                prior_c, prior_target = self.base_prior_target(x[:n_subject], t[:n_subject], batch)
                x, t_part = torch.cat([x, x[:n_subject]]), torch.cat([t_part, t[:n_subject]])
                c = concat_conditioning(c, prior_c)
            pred = self.apply_model(x, t_part, c)
            if base_prior and lo == 0:
                pred, prior_pred = pred[:hi - lo], pred[hi - lo:]
                prior = per_example_loss(prior_pred, prior_target, self.loss_type)
            preds.append(pred)
            targets.append(self.objective.target(z, noise))
        weights = self.objective.weights(self, t)
        losses = torch.cat([per_example_loss(p, y, self.loss_type) for p, y in zip(preds, targets)])
        if prior is not None:
            losses = torch.cat([losses, prior])
            weights = None if weights is None else torch.cat([weights, weights[:n_subject]])
        mask_key = f"{self.first_stage_key}_mask"
        if mask_key not in batch:
            return combine(losses, n_subject, self.reg_weight, weights)
        # Masked loss: the subject rows are the first n_subject rows of the first part.
        spatial = mask_weights(batch[mask_key], tuple(zs[0].shape[-2:]), self.mask_floor)
        masked = per_example_loss(preds[0][:n_subject], targets[0][:n_subject], self.loss_type, spatial)
        loss, logs = combine(torch.cat([masked, losses[n_subject:]]), n_subject, self.reg_weight, weights)
        unmasked = losses[:n_subject] * (weights[:n_subject] if weights is not None else 1)
        logs["loss_subject_unmasked"] = unmasked.mean().detach()
        return loss, logs

    def condition_on(self, captions: list[str], batch: Mapping[str, Any], roles: list[str]) -> Any:
        """The network's conditioning for ``captions`` (the text cache's embeddings where it has them) with the
        batch's size numbers of ``roles`` and the training guidance."""
        text = self.text_cache(captions) if self.text_cache is not None else self.encode_text(captions)
        return self.with_guidance(self.conditioning.condition(text, batch_sizes(batch, roles)), self.train_guidance)

    def base_prior_losses(self, x_noisy: torch.Tensor, t: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """``prior_preservation: base_model``: per subject example, the loss between the trained model's prediction
        for its class prompt (``prior_caption``, "photo of a dog") and the base model's (adapters off, no
        gradient) on the same noisy latent and t. No class images are needed: the base model's answer is the
        prior, as ai-toolkit's "differential output preservation" and OneTrainer's prior prediction use it.
        (A training step computes the same in the subject's pass: ``shared_step``.)"""
        c, target = self.base_prior_target(x_noisy, t, batch)
        return per_example_loss(self.apply_model(x_noisy, t, c), target, self.loss_type)

    def base_prior_target(self, x_noisy: torch.Tensor, t: torch.Tensor, batch: Mapping[str, Any]
                          ) -> tuple[Any, torch.Tensor]:
        """The prior term's two halves: the trained model's conditioning for the class prompts, and the base
        model's prediction (no gradient) for them on ``x_noisy`` at ``t``, the target."""
        captions = list(batch["prior_caption"])
        with torch.no_grad(), self.base_weights():
            base_c = self.condition_on(captions, batch, [""])
            target = self.apply_model(x_noisy, t, base_c)
        # Frozen text encoders answer alike either way: their encoding is the base's.
        text_trains = self.lora_settings.text_encoder if self.lora_settings else self.cond_stage_trainable
        return (self.condition_on(captions, batch, [""]) if text_trains else base_c), target

    def base_weights(self) -> ContextManager[None]:
        """Inside the block the model answers as the base model: a LoRA model with its adapters off; a full
        fine-tune with the frozen copy of its trainable weights (``keep_base_copy``) in place of the trained ones."""
        if self.lora_settings:
            from ldm.weights.lora import adapters_disabled
            return adapters_disabled(self)
        copy = getattr(self, "_base_copy", None)
        if copy is None:
            raise RuntimeError("prior_preservation base_model on a full fine-tune: no base copy was kept "
                               "(configure_model keeps it, before training or a resumed checkpoint changes them)")
        device = next(iter(copy.values())).device
        if device != self.betas.device:  # the copy is not a submodule: it follows the model on first use
            copy = self._base_copy = {k: nn.Parameter(v.to(self.betas.device), requires_grad=False)
                                      for k, v in copy.items()}
        return parameters_replaced(self, copy)

    def keep_base_copy(self) -> None:
        """``prior_preservation: base_model`` on a full fine-tune: a frozen copy of every trainable weight as it is
        now (the base model; one more copy of the trained network in memory), outside the module's registry, so
        that it is neither trained nor saved. A resumed run builds the model from the base file first
        (``ldm.training.run``), so the copy is the base's there too, before Lightning restores the checkpoint."""
        if self.prior_preservation != "base_model" or self.lora_settings:
            return
        self._base_copy = {n: nn.Parameter(p.detach().clone(), requires_grad=False)
                           for n, p in self.named_parameters() if p.requires_grad}

    def step_generator(self) -> Optional[torch.Generator]:
        """The generator of the next training batch, from (noise_seed, batches trained so far, rank); None without
        a seed. The count is the model's own and travels in its checkpoints, so a resumed run continues it."""
        if self.noise_seed is None:
            return None
        from ldm.util import derive_seed
        seed = derive_seed(self.noise_seed, "step", self.batches_trained, self.global_rank)
        return torch.Generator(self.device).manual_seed(seed)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        generator = self.step_generator()
        self.batches_trained += 1
        loss, logs = self.shared_step(batch, generator)
        batch_size = batch[self.first_stage_key].shape[0]
        self.log("train/loss", logs["loss"], prog_bar=True, on_step=True, logger=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k != "loss"},
                      prog_bar=False, on_step=True, logger=True, batch_size=batch_size)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=False, on_step=True, logger=True,
                 batch_size=batch_size)
        if not self.automatic_optimization:
            self.fused_step(loss)
        return loss

    def fused_step(self, loss: torch.Tensor) -> None:
        """Fused backward under Lightning's manual optimization: backward runs every update in the parameters'
        hooks (``PerTensorOptimizer``); ``step()`` then only counts the step, which is what Lightning's
        global step follows, and the LR schedule steps as automatic optimization would step it."""
        optimizer = self.optimizers()
        self.manual_backward(loss)
        optimizer.step()
        self.lr_schedulers().step()

    def offload_frozen(self) -> None:
        """With caches in place nothing in a training step needs the VAE (or a frozen text encoder): free their
        GPU memory. The image logger borrows them back for sampling."""
        if self.device.type != "cuda":
            return
        self.first_stage_model.to("cpu")
        if self.text_cache is not None:
            self.text_model.to("cpu")
        torch.cuda.empty_cache()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.model, self.text_model) for p in m.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """What the optimizer trains: the trainable weights, or, with ``text_encoder_lr`` and a text encoder that
        trains, two groups: the network's at the run's rate, the text encoder's at ``text_learning_rate``."""
        params = self.trainable_parameters()
        if self.text_encoder_lr is None:
            return params
        text = {id(p) for p in self.text_model.parameters() if p.requires_grad}
        if not text:
            raise ValueError("model.params.text_encoder_lr: the text encoder does not train (set "
                             "cond_stage_trainable: true, or lora_config.text_encoder: true)")
        return [{"params": [p for p in params if id(p) not in text]},
                {"params": [p for p in params if id(p) in text], "lr": self.text_learning_rate}]

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        # set_to_none frees the gradient tensors between steps instead of zero-filling them.
        optimizer.zero_grad(set_to_none=self.set_grads_to_none)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["batches_trained"] = self.batches_trained
        checkpoint["state_dict"] = self.saved_layout(checkpoint["state_dict"])
        if self.lora_settings:  # keep the original key layout; adapters ride along as extra keys
            from ldm.weights.lora import plain_keys
            checkpoint["state_dict"] = plain_keys(checkpoint["state_dict"])
            # what sampling needs to bake the adapters into the weights (ldm.weights.checkpoint.bake_adapters)
            checkpoint["lora_alpha"] = float(self.lora_settings.alpha if self.lora_settings.alpha is not None
                                             else self.lora_settings.rank)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_resumable(checkpoint)
        self.batches_trained = int(checkpoint.get("batches_trained", 0))
        if self.lora_settings:
            from ldm.weights.lora import peft_keys
            checkpoint["state_dict"] = peft_keys(checkpoint["state_dict"], self.state_dict().keys())

    def check_resumable(self, checkpoint: Mapping[str, Any]) -> None:
        """Refuse, in one line (``CheckpointError``), a training checkpoint this model cannot continue from: its
        optimizer state saved with fused backward / bf16 weights switched the other way (its moments would be
        lost), or weights of another layout (LoRA adapters on one side only, another model or size). The training
        module calls this before anything is written into the run folder; Lightning's restore calls it again."""
        from ldm.weights.checkpoint import CheckpointError, audit, refuse_nonfinite
        states = checkpoint.get("optimizer_states") or [{}]
        per_tensor = bool(self.optimizer_config.get("fused_backward")) or self.weights_dtype == "bf16"
        if checkpoint.get("optimizer_states") and ("inner" in states[0]) != per_tensor:
            raise CheckpointError("the checkpoint's optimizer state was saved with fused_backward / weights_dtype: "
                                  f"bf16 {'on' if 'inner' in states[0] else 'off'}; resume with the same settings "
                                  f"(its moments would otherwise be lost)")
        saved = checkpoint.get("state_dict") or {}
        own = {k: v.shape for k, v in self.state_dict().items()}
        if self.lora_settings:
            from ldm.weights.lora import peft_keys
            saved = peft_keys(saved, own)
        has_lora = any("lora_" in k for k in saved)
        if has_lora != bool(self.lora_settings):
            raise CheckpointError(f"the checkpoint was saved {'with' if has_lora else 'without'} LoRA adapters and "
                                  f"this run {'has' if self.lora_settings else 'has no'} lora_config; resume with "
                                  f"the settings it was saved with")
        problem = audit(own, saved)
        if problem:
            raise CheckpointError(f"the checkpoint's weights do not fit this run's model: {problem}")
        refuse_nonfinite(saved, "the checkpoint", why="the run diverged before it was saved (resume from an earlier "
                                                      "step file, with a lower learning rate)")

    def configure_optimizers(self) -> dict[str, Any]:
        from ldm.optim.build import build_optimizer, build_scheduler
        if getattr(self, "_hooked_optimizer", None) is not None:  # configured again: the old hooks must go
            self._hooked_optimizer.remove_hooks()
        optimizer = build_optimizer(self.parameter_groups(), self.learning_rate, self.optimizer_config,
                                    seed=self.noise_seed or 0, cpu_offload=self._zero_offload())
        self._hooked_optimizer = optimizer if not self.automatic_optimization else None
        scheduler = build_scheduler(optimizer, self.scheduler_config, self.lr_schedule, self.lr_warmup_steps,
                                    max_steps=self.trainer.max_steps if self._trainer is not None else -1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _zero_offload(self) -> bool:
        """Whether the run's strategy is DeepSpeed ZeRO with the optimizer offloaded to the CPU (which then needs
        DeepSpeed's CPU AdamW)."""
        zero = getattr(getattr(self._trainer, "strategy", None), "config", None) or {}
        return isinstance(zero, Mapping) and bool((zero.get("zero_optimization") or {}).get("offload_optimizer"))

    # ---- lean training: bf16 weights, compile, channels-last ---------------------------------------------
    def frozen_parts(self) -> list[nn.Module]:
        """The sub-models that never train: the autoencoder, the frozen text encoders, and the network itself when
        only adapters train (LoRA)."""
        parts = [self.first_stage_model]
        if not self.cond_stage_trainable:
            parts += [m for m in self.conditioning.text_encoders().values()
                      if not any(p.requires_grad for p in m.parameters())]
        return parts + ([self.model.diffusion_model] if self.lora_settings else [])

    def configure_model(self) -> None:
        """Lightning's hook before the optimizer is built (and before the model moves to its device): store the
        trainable weights in bf16, the frozen network's and text encoders' linear weights in float8, swap the
        network's first blocks to host memory, put the UNet in channels-last format, compile it. Idempotent."""
        if getattr(self, "_lean_applied", False):
            return
        self._lean_applied = True
        if self.weights_dtype == "bf16":
            for p in self.trainable_parameters():
                p.data = p.data.to(torch.bfloat16)
        self.keep_base_copy()
        self.apply_low_memory()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.compile_unet:
            from ldm.modules.speed import compile_or_eager
            device = getattr(getattr(self._trainer, "strategy", None), "root_device", self.device)
            compile_or_eager(self.model.diffusion_model, device)

    def apply_low_memory(self) -> None:
        """``frozen_dtype: fp8``, ``text_encoder_fp8`` and ``blocks_to_swap`` (ldm/modules/lowmem.py)."""
        from ldm.modules.lowmem import BlockSwap, quantize_fp8_
        if self.frozen_dtype == "fp8":
            n = quantize_fp8_(self.model.diffusion_model)
            print(f"frozen_dtype fp8: {n} linear layers of the network stored in float8_e4m3fn")
        if self.text_encoder_fp8:
            n = sum(quantize_fp8_(m) for m in self.conditioning.text_encoders().values())
            print(f"text_encoder_fp8: {n} linear layers of the text encoders stored in float8_e4m3fn")
        if self.blocks_to_swap:
            net = self.model.diffusion_model
            blocks = [*net.double_blocks, *net.single_blocks]
            device = getattr(getattr(self._trainer, "strategy", None), "root_device", self.device)
            if device.type != "cuda":
                print(f"blocks_to_swap {self.blocks_to_swap}: training on {device.type}, no accelerator memory to "
                      f"spare: every block stays where the model is")
                return
            self.block_swap = BlockSwap(blocks, resident=len(blocks) - self.blocks_to_swap, device=device,
                                        checkpointed=bool(net.params.use_checkpoint))
            print(f"blocks_to_swap: {self.blocks_to_swap} of {len(blocks)} blocks kept in host memory")

    def saved_layout(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state_dict`` in the layout of the model's files: weights stored in bf16 for training are written in
        fp32, as they were read (a bf16-weights checkpoint loads into the normal model)."""
        if self.weights_dtype != "bf16":
            return dict(state_dict)
        return {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state_dict.items()}


@contextmanager
def parameters_replaced(model: nn.Module, values: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """Inside the block, each named parameter of ``model`` is the tensor ``values`` gives for its name (the same
    module code computes with other weights); the model's own parameters are back afterwards, untouched."""
    saved = []
    for name, value in values.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        saved.append((owner, attr, owner._parameters[attr]))
        owner._parameters[attr] = value
    try:
        yield
    finally:
        for owner, attr, parameter in reversed(saved):
            owner._parameters[attr] = parameter
