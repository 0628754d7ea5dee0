"""One optimizer per trainable tensor, behind the one ``torch.optim.Optimizer`` that Lightning and the LR schedule
see: what fused backward and bf16-stored weights both need.

Fused backward (``optimizer_config.fused_backward``): each tensor's update runs in its post-accumulate-grad hook
(``Tensor.register_post_accumulate_grad_hook``), the moment backward has finished its gradient, and the gradient
is freed right after. A step then never holds more than the gradients still in flight, instead of a full
gradient per weight (3.4 GB for SD v1's UNet in fp32). The updates are the same as one optimizer over all tensors
after the whole backward pass: AdamW's update of a tensor reads only that tensor's gradient and state. What needs
every gradient before any update cannot be done this way (accumulation over batches, global-norm clipping, fp16's
GradScaler inf check, DDP's averaging): ``ldm.training.config`` and ``ldm.training.run`` refuse those combinations.

bf16 weights (``weights_dtype: bf16``): a tensor stored in bf16 is updated on a transient fp32 copy (the inner
optimizer's state stays fp32, or 8-bit), and the result is rounded back stochastically
(:mod:`ldm.optim.rounding`) with a generator seeded from (seed, step, tensor index): the same seed
gives the same weights, and every DDP rank rounds the same way.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from ldm.optim.rounding import stochastic_round_bf16


class PerTensorOptimizer(torch.optim.Optimizer):
    """``make(tensors)`` builds each trained tensor's inner optimizer (AdamW or AdamW8bit with the config's
    settings) over that tensor's chunks.

    ``param_groups[0]["lr"]`` is the learning rate Lightning logs and the LR schedule sets; every update copies
    it into the inner optimizer first. ``state_dict`` holds every inner optimizer's state and the step count
    (the rounding seeds depend on it), so a resumed run continues exactly.

    A tensor of more than ``chunk`` elements is updated ``chunk`` elements at a time, each span with its own
    state (a view for fp32 weights), so what an update allocates besides the state (the fp32 copy of a bf16
    weight and of its gradient, the rounding's noise, bitsandbytes' dequantised moments) is bounded by the
    chunk, not by the largest tensor: the update of SD v1's token embedding (38 M elements, bf16, AdamW8bit)
    took 1 GiB of temporaries whole and takes 115 MiB in chunks. AdamW works element by element and AdamW8bit
    quantises blocks of 256, which ``chunk`` is a multiple of: the result is the same as one update of the whole
    tensor.
    """

    #: Elements per chunk: 4 Mi (16 MiB in fp32), a multiple of AdamW8bit's quantisation block (256).
    CHUNK = 1 << 22

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float,
                 make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], fused: bool, seed: int = 0,
                 chunk: int = CHUNK):
        params = list(params)
        super().__init__(params, {"lr": lr})
        self.fused, self.seed, self.steps = fused, seed, 0
        if chunk % 256 or chunk < 4096:
            raise ValueError(f"chunk {chunk}: must be a multiple of 256 (AdamW8bit's block) and at least 4096 (its "
                             f"minimum size for 8-bit state)")
        # Per tensor: its spans (start, end) of the flattened tensor and the tensor each span's state belongs to:
        # the parameter itself (one fp32 span), a view of it (fp32 chunks), or for a bf16 parameter an fp32
        # stand-in that holds a copy of its span only during the update (empty otherwise), so the state is fp32.
        self.spans = [chunk_spans(p.numel(), chunk if p.is_contiguous() else p.numel()) for p in params]
        self.work = [self._stand_ins(p, spans) for p, spans in zip(params, self.spans)]
        self.inner = [make(w) for w in self.work]
        self.index = {p: i for i, p in enumerate(params)}
        self.hooks = [p.register_post_accumulate_grad_hook(self.update) for p in params] if fused else []

    @staticmethod
    def _stand_ins(p: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        if p.dtype != torch.float32:
            return [torch.empty(0, device=p.device) for _ in spans]
        if len(spans) == 1:
            return [p]
        flat = p.detach().view(-1)
        return [flat[a:b] for a, b in spans]

    @torch.no_grad()
    def update(self, p: torch.Tensor) -> None:
        """Update one parameter from its gradient, span by span, then free the gradient."""
        if p.grad is None:
            return
        i = self.index[p]
        inner, works, spans = self.inner[i], self.work[i], self.spans[i]
        for group in inner.param_groups:
            group["lr"] = self.param_groups[0]["lr"]
        if works[0] is p:
            inner.step()
            p.grad = None
            return
        flat, grad = p.detach().view(-1), p.grad.view(-1)
        stored = p.dtype != torch.float32
        generator = torch.Generator(p.device).manual_seed(rounding_seed(self.seed, self.steps, i)) if stored else None
        for work, (a, b) in zip(works, spans):
            if stored:
                work.data = flat[a:b].float()
            work.grad = grad[a:b].float() if stored else grad[a:b]
            inner.step()  # steps only the span with a gradient
            if stored:
                flat[a:b].copy_(stochastic_round_bf16(work, generator) if p.dtype == torch.bfloat16 else work)
                work.data = torch.empty(0, device=p.device)
            work.grad = None
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
        for i, (spans, saved) in enumerate(zip(self.spans, state_dict["inner"])):
            saved_spans = len(saved["param_groups"][0]["params"])
            if saved_spans != len(spans):
                raise ValueError(f"optimizer state of tensor {i} is in {saved_spans} chunk(s), this optimizer updates "
                                 f"it in {len(spans)} (saved by a version with another chunk size; resume with it)")
        super().load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
        for opt, saved in zip(self.inner, state_dict["inner"]):
            opt.load_state_dict(saved)
        self.steps = int(state_dict["steps"])

    def inner_state(self) -> list[Mapping[str, Any]]:
        """Every tensor's optimizer state (moments, step), for reports of the optimizer's memory."""
        return [s for opt in self.inner for s in opt.state.values()]


def chunk_spans(n: int, chunk: int) -> list[tuple[int, int]]:
    """``[0, n)`` in spans of ``chunk`` elements; a short remainder joins the last whole span (a span under
    AdamW8bit's ``min_8bit_size`` would otherwise get 32-bit state)."""
    starts = list(range(0, n, chunk)) or [0]
    if len(starts) > 1 and n - starts[-1] < chunk // 2:
        starts.pop()
    return [(a, b) for a, b in zip(starts, starts[1:] + [n])]


def rounding_seed(seed: int, step: int, index: int) -> int:
    from ldm.util import derive_seed
    return derive_seed(seed, "round", step, index)
