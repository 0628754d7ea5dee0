"""One optimizer per trainable tensor, behind the one ``torch.optim.Optimizer`` that Lightning and the LR schedule
see: what fused backward and bf16-stored weights both need.

Fused backward (``optimizer_config.fused_backward``): each tensor's update runs in its post-accumulate-grad hook
(``Tensor.register_post_accumulate_grad_hook``), the moment backward has finished its gradient, and the gradient
is freed right after. A step then never holds more than the gradients still in flight, instead of a full
gradient per weight (3.4 GB for SD v1's UNet in fp32). The updates are the same as one optimizer over all tensors
after the whole backward pass: AdamW's update of a tensor reads only that tensor's gradient and state. What needs
every gradient before any update cannot be done this way (accumulation over batches, global-norm clipping, fp16's
GradScaler inf check, DDP's averaging): ``ldm.config`` and ``ldm.train`` refuse those combinations.

bf16 weights (``weights_dtype: bf16``): a tensor stored in bf16 is updated on a transient fp32 copy (the inner
optimizer's state stays fp32, or 8-bit), and the result is rounded back stochastically
(:mod:`ldm.models.diffusion.rounding`) with a generator seeded from (seed, step, tensor index): the same seed
gives the same weights, and every DDP rank rounds the same way.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from ldm.models.diffusion.rounding import stochastic_round_bf16


class PerTensorOptimizer(torch.optim.Optimizer):
    """``make(tensor)`` builds each tensor's inner optimizer (AdamW or AdamW8bit with the config's settings).

    ``param_groups[0]["lr"]`` is the learning rate Lightning logs and the LR schedule sets; every update copies
    it into the inner optimizer first. ``state_dict`` holds every inner optimizer's state and the step count
    (the rounding seeds depend on it), so a resumed run continues exactly.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float,
                 make: Callable[[torch.Tensor], torch.optim.Optimizer], fused: bool, seed: int = 0):
        params = list(params)
        super().__init__(params, {"lr": lr})
        self.fused, self.seed, self.steps = fused, seed, 0
        # The tensor each inner optimizer updates: the parameter itself, or for a bf16 parameter an fp32 stand-in
        # that holds a copy of it only during its update (empty otherwise), so the state is built in fp32.
        self.work = [p if p.dtype == torch.float32 else torch.empty(0, device=p.device) for p in params]
        self.inner = [make(w) for w in self.work]
        self.index = {p: i for i, p in enumerate(params)}
        self.hooks = [p.register_post_accumulate_grad_hook(self.update) for p in params] if fused else []

    @torch.no_grad()
    def update(self, p: torch.Tensor) -> None:
        """Update one parameter from its gradient, then free the gradient."""
        if p.grad is None:
            return
        i = self.index[p]
        inner, work = self.inner[i], self.work[i]
        for group in inner.param_groups:
            group["lr"] = self.param_groups[0]["lr"]
        if work is p:
            inner.step()
        else:
            work.data = p.detach().float()
            work.grad = p.grad.float()
            inner.step()
            generator = torch.Generator(p.device).manual_seed(rounding_seed(self.seed, self.steps, i))
            p.copy_(stochastic_round_bf16(work, generator) if p.dtype == torch.bfloat16 else work)
            work.grad = None
            work.data = torch.empty(0, device=p.device)
        p.grad = None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Fused: the updates ran during backward; this only counts the step (what Lightning's global step and
        the rounding seeds follow). Otherwise: update every tensor that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.fused:
            for p in self.param_groups[0]["params"]:
                self.update(p)
        self.steps += 1
        return loss

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def state_dict(self) -> dict[str, Any]:
        outer = super().state_dict()  # the param group (lr, initial_lr); the outer state itself is empty
        return {"state": outer["state"], "param_groups": outer["param_groups"], "steps": self.steps,
                "inner": [opt.state_dict() for opt in self.inner]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if len(state_dict.get("inner", ())) != len(self.inner):
            raise ValueError(f"optimizer state for {len(state_dict.get('inner', ()))} tensors, this model trains "
                             f"{len(self.inner)} (was it saved with optimizer_config.fused_backward or "
                             f"weights_dtype: bf16 off?)")
        super().load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
        for opt, saved in zip(self.inner, state_dict["inner"]):
            opt.load_state_dict(saved)
        self.steps = int(state_dict["steps"])

    def inner_state(self) -> list[Mapping[str, Any]]:
        """Every tensor's optimizer state (moments, step), for reports of the optimizer's memory."""
        return [s for opt in self.inner for s in opt.state.values()]


def rounding_seed(seed: int, step: int, index: int) -> int:
    from ldm.util import derive_seed
    return derive_seed(seed, "round", step, index)
