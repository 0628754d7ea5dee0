"""Fitting a big frozen network into little memory: its weights stored in float8, and its blocks kept off the
accelerator until they run. Generic parts for any transformer with a list of blocks (FLUX.1's 19 + 38).

* :func:`quantize_fp8_`: the frozen ``nn.Linear`` weights of a module stored as ``float8_e4m3fn`` with one float32
  scale per tensor (amax / 448, e4m3's largest value), a quarter of fp32's bytes and half of bf16's; each layer
  multiplies its weight back up to the compute dtype in its forward, so only one layer's weight is ever wide.
  Trained layers (requires_grad) stay as they are; adapters (LoRA) added around a quantized layer train as usual.
  The layer saves and loads its weight in the dtype it had (``state_dict`` holds no float8 and no extra keys), so
  checkpoints keep the released layout.
* :class:`BlockSwap`: blocks of an ``nn.ModuleList`` live in host memory (pinned on CUDA) and are copied to the
  accelerator just before they run, the next one ahead on a side stream; all but ``resident`` of them are released
  after their forward and after their backward (gradient checkpointing runs each block's forward again inside
  backward, so a block is fetched for that too). Only frozen tensors move, and only host-to-device.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

#: The largest finite float8_e4m3fn value: a tensor's scale maps its largest magnitude onto it.
E4M3_MAX = 448.0


def fp8_supported() -> bool:
    """Whether this torch build has ``float8_e4m3fn`` (torch >= 2.1) and can convert to and from it here."""
    if not hasattr(torch, "float8_e4m3fn"):
        return False
    try:
        return bool(torch.ones(2).to(torch.float8_e4m3fn).float().eq(1).all())
    except (RuntimeError, TypeError):
        return False


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored in float8_e4m3fn times ``weight_scale`` (see the module docstring).
    Made from an existing layer by :func:`quantize_fp8_`, which swaps the class in place (peft and module paths
    see the same object)."""

    weight_scale: torch.Tensor
    stored_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        weight = self.weight.to(dtype) * self.weight_scale.to(dtype)
        return F.linear(x, weight, self.bias.to(dtype) if self.bias is not None else None)

    def dequantized(self) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.float()).to(self.stored_dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dequantized()  # the released layout: no float8, no scale key
        destination.pop(prefix + "weight_scale", None)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dtype != torch.float8_e4m3fn:
            weight, scale = to_fp8(state_dict[key])
            state_dict = {**state_dict, key: weight, prefix + "weight_scale": scale}
        elif prefix + "weight_scale" not in state_dict:
            state_dict = {**state_dict, prefix + "weight_scale": self.weight_scale}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def to_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight / scale in float8_e4m3fn, scale)`` with scale = amax / 448 (1 for an all-zero tensor)."""
    amax = weight.detach().abs().max().float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (weight.detach().float() / scale).to(torch.float8_e4m3fn), scale.reshape(())


def quantize_fp8_(module: nn.Module) -> int:
    """Store every frozen ``nn.Linear`` weight under ``module`` in float8 with a per-tensor scale; returns how many
    layers were converted. Raises ``RuntimeError`` (one line) on a torch without float8."""
    if not fp8_supported():
        raise RuntimeError(f"torch {torch.__version__} has no usable float8_e4m3fn: fp8 weights need torch >= 2.1")
    count = 0
    for layer in module.modules():
        if type(layer) is nn.Linear and not layer.weight.requires_grad and layer.weight.device.type != "meta":
            stored = layer.weight.dtype
            weight, scale = to_fp8(layer.weight)
            layer.weight = nn.Parameter(weight, requires_grad=False)
            layer.__class__ = Fp8Linear
            layer.register_buffer("weight_scale", scale.to(weight.device))
            layer.stored_dtype = stored
            count += 1
    return count


class BlockSwap:
    """Keep ``blocks[:len(blocks) - resident]`` in host memory and give each a copy on ``device`` only while it
    runs (see the module docstring). Training must recompute the swapped blocks' activations in backward
    (``checkpointed``): otherwise autograd would hold their device weights from forward to backward anyway.

    Only a block's frozen tensors move (trained ones, such as LoRA adapters inside it, stay on the device with
    their optimizer state). Each keeps one host copy (pinned on CUDA). Fetching a block copies them
    host-to-device, the next block ahead on a side stream; releasing it points them back at the host copy, with no
    copy at all, since nothing updated them. Forward runs the blocks in order and releases each after it; backward runs them in reverse, fetching
    each (and the one before it, ahead) for its recomputation and gradients, and releasing it after.
    ``transfer(tensor, device)`` makes the copies (tests pass a recording one)."""

    def __init__(self, blocks: nn.ModuleList, resident: int, device: torch.device | str, checkpointed: bool,
                 transfer: Optional[Any] = None):
        self.blocks, self.device, self.checkpointed = list(blocks), torch.device(device), checkpointed
        self.swapped = set(range(max(0, len(self.blocks) - resident)))
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.transfer = transfer or self._transfer
        self.host: dict[int, torch.Tensor] = {}
        for k in self.swapped:
            for t in _tensors(self.blocks[k]):
                data = t.data.to("cpu")
                self.host[id(t)] = data.pin_memory() if self.stream is not None else data
                t.data = self.host[id(t)]
        self.on_device: set[int] = set()
        for k in self.swapped:
            keep_on_host(self.blocks[k])
        self.handles = []
        for k, block in enumerate(self.blocks):
            if k in self.swapped:
                self.handles += [block.register_forward_pre_hook(self._before(k)),
                                 block.register_forward_hook(self._after(k)),
                                 block.register_full_backward_pre_hook(self._before_backward(k)),
                                 block.register_full_backward_hook(self._after_backward(k))]

    def _transfer(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.stream is None:
            return tensor.to(device)
        with torch.cuda.stream(self.stream):
            return tensor.to(device, non_blocking=True)

    def fetch(self, k: int) -> None:
        if k in self.swapped and k not in self.on_device:
            for t in _tensors(self.blocks[k]):
                t.data = self.transfer(self.host[id(t)], self.device)
            self.on_device.add(k)

    def release(self, k: int) -> None:
        if k in self.on_device:
            for t in _tensors(self.blocks[k]):
                t.data = self.host[id(t)]  # the host copy is still current: the block is frozen
            self.on_device.discard(k)

    def _ready(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def _before(self, k: int):
        def hook(block: nn.Module, args: Any) -> None:
            self.fetch(k)
            self._ready()
            if not in_backward():
                self.fetch(k + 1)
            elif torch.is_grad_enabled() and not self.checkpointed:
                raise RuntimeError("block swap while training needs gradient checkpointing of the swapped blocks")
        return hook

    def _after(self, k: int):
        def hook(block: nn.Module, args: Any, output: Any) -> None:
            if in_backward():
                return  # a recomputation: backward needs the block next
            if torch.is_grad_enabled() and not self.checkpointed:
                raise RuntimeError("block swap while training needs gradient checkpointing of the swapped blocks")
            self.release(k)
        return hook

    def _before_backward(self, k: int):
        def hook(block: nn.Module, grad_output: Any) -> None:
            self.fetch(k)
            self._ready()
            self.fetch(k - 1)
        return hook

    def _after_backward(self, k: int):
        def hook(block: nn.Module, grad_input: Any, grad_output: Any) -> None:
            self.release(k)
        return hook

    def remove(self) -> None:
        """Detach the hooks and put every block on the device for good."""
        for handle in self.handles:
            handle.remove()
        for k in sorted(self.swapped):
            self.fetch(k)
        self._ready()


def keep_on_host(block: nn.Module) -> None:
    """Make ``block.to(...)`` / ``.cuda()`` / ``.half()`` (Lightning moving the whole model to its device) apply
    to the block's trained parameters only: its frozen ones stay where block swap keeps them (else the move would
    fill the accelerator with the very weights swapping keeps off it)."""
    def _apply(fn: Any, recurse: bool = True) -> nn.Module:
        for module in block.modules():
            for name, p in module._parameters.items():
                if p is not None and p.requires_grad:
                    p.data = fn(p.data)
                    if p.grad is not None:
                        p.grad.data = fn(p.grad.data)
        return block
    block._apply = _apply


def in_backward() -> bool:
    """Whether autograd's engine is running a backward pass in this thread (gradient checkpointing recomputes a
    block's forward there)."""
    return torch._C._current_graph_task_id() != -1


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """The frozen parameters and the buffers of ``module``, each once: what block swap moves."""
    seen, out = set(), []
    for t in [*(p for p in module.parameters() if not p.requires_grad), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def parameters_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``modules`` (each tensor once)."""
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
