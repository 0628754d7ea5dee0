"""The SD v1 denoiser UNet: checkpoint layout, timestep embedding, fidelity to diffusers, gradient checkpointing."""
from __future__ import annotations

import math
import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import reference_layout
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding

PREFIX = "model.diffusion_model."

# configs/stable-diffusion/v1-inference.yaml and tiny-inference.yaml, unet_config.params.
V1 = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True, transformer_depth=1,
    context_dim=768, use_checkpoint=True, legacy=False,
)
TINY = dict(V1, image_size=8, model_channels=32, attention_resolutions=[1], channel_mult=[1, 2], num_heads=2,
            context_dim=32)


def test_v1_layout_matches_reference_checkpoint() -> None:
    with torch.device("meta"):
        unet = UNetModel(**V1)
    ours = {k: list(v.shape) for k, v in unet.state_dict().items()}
    reference = {k[len(PREFIX):]: list(shape) for k, (shape, _) in reference_layout().items() if k.startswith(PREFIX)}
    assert len(reference) == 686
    assert sorted(set(reference) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(reference)) == [], "unexpected keys"
    assert {k: s for k, s in ours.items() if s != reference[k]} == {}, "shape mismatch"


def test_timestep_embedding_closed_form() -> None:
    t = [0.0, 1.0, 37.5, 999.0]
    dim, half = 8, 4
    got = timestep_embedding(torch.tensor(t), dim)
    expected = torch.tensor(
        [[math.cos(s * 10000 ** (-j / half)) for j in range(half)]
         + [math.sin(s * 10000 ** (-j / half)) for j in range(half)] for s in t]
    )
    assert got.shape == (4, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    odd = timestep_embedding(torch.tensor(t), dim + 1)
    assert odd.shape == (4, 9) and torch.equal(odd[:, :dim], got) and not odd[:, dim].any()
    assert torch.equal(timestep_embedding(torch.tensor([3, 5]), 4, repeat_only=True),
                       torch.tensor([[3] * 4, [5] * 4]))


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, zero-initialised layers included, so that no branch is trivially silent."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 4
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def test_matches_diffusers_unet() -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from conftest import diffusers_unet_config

    unet = UNetModel(**TINY).eval()
    _randomize(unet, seed=0)
    config = diffusers_unet_config(TINY)
    reference = UNet2DConditionModel(**config).eval()
    converted = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in unet.state_dict().items()}, config)
    reference.load_state_dict(converted, strict=True)

    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([17, 803])
    with torch.no_grad():
        ours = unet(x, t, context)
        theirs = reference(x, t, encoder_hidden_states=context).sample
    assert theirs.abs().max() > 0.1
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-4


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages created under this mode and still alive, and their peak.

    Counts every op output whose storage is new (views and in-place results share an input's storage), and
    subtracts it when the storage is freed. Unlike `saved_tensors_hooks`, it sees what non-reentrant checkpoint
    keeps (its own hooks shadow outer ones, and the block inputs it holds are never "saved"), and the
    recomputation during backward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._keys: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._keys.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in inputs and key not in self._keys:
                self._keys.add(key)
                self.live += storage.nbytes()
                weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _train_step(unet: UNetModel, flag: bool, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor):
    """One forward+backward; returns (bytes held for backward after forward, peak bytes, parameter grads)."""
    unet.set_gradient_checkpointing(flag)
    unet.zero_grad(set_to_none=True)
    with LiveTensorBytes() as mem:
        out = unet(x, t, c)
        held = mem.live - out.untyped_storage().nbytes()
        out.square().mean().backward()
        del out
    return held, mem.peak, [p.grad.clone() for p in unet.parameters()]


def test_gradient_checkpointing_saves_memory_and_keeps_gradients() -> None:
    torch.manual_seed(0)
    unet = UNetModel(**dict(TINY, image_size=32, model_channels=64, context_dim=64))
    _randomize(unet, seed=2)
    x, t, c = torch.randn(1, 4, 32, 32), torch.tensor([10]), torch.randn(1, 77, 64)

    plain_held, plain_peak, plain_grads = _train_step(unet, False, x, t, c)
    ckpt_held, ckpt_peak, ckpt_grads = _train_step(unet, True, x, t, c)
    off_held, off_peak, _ = _train_step(unet, False, x, t, c)

    assert ckpt_held < 0.6 * plain_held, (ckpt_held, plain_held)
    assert ckpt_peak < 0.8 * plain_peak, (ckpt_peak, plain_peak)  # the peak includes the recomputation and grads
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (off_held, off_peak) == (plain_held, plain_peak), "set_gradient_checkpointing(False) did not turn it off"


def test_no_checkpointing_without_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """In inference there is nothing to recompute: the flag must not route through torch's checkpoint."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("checkpoint called under no_grad")

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", refuse)
    unet = UNetModel(**TINY)
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 77, 32))
    with pytest.raises(AssertionError, match="no_grad"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 77, 32))


@pytest.mark.parametrize(
    "override", [{"num_classes": 10}, {"use_new_attention_order": True}, {"n_embed": 8}, {"dims": 3},
                 {"resblock_updown": True}, {"use_spatial_transformer": False, "context_dim": None}],
)
def test_unsupported_options_raise(override: dict) -> None:
    with torch.device("meta"), pytest.raises(NotImplementedError):
        UNetModel(**dict(TINY, **override))


def test_config_flag_alone_governs_every_block() -> None:
    """use_checkpoint from the config reaches the transformer blocks too (the original hard-wired them on)."""
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock
    for flag in (False, True):
        unet = UNetModel(**{**TINY, "use_checkpoint": flag})
        blocks = [m for m in unet.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
        assert blocks and all((m.use_checkpoint if isinstance(m, ResBlock) else m.checkpoint) is flag for m in blocks)


def test_v1_layout_with_per_level_transformer_depth() -> None:
    """transformer_depth as a per-level list (the SDXL form) builds the same v1 network as the int."""
    with torch.device("meta"):
        unet = UNetModel(**dict(V1, transformer_depth=[1, 1, 1, 1]))
    reference = {k[len(PREFIX):]: list(shape) for k, (shape, _) in reference_layout().items() if k.startswith(PREFIX)}
    assert {k: list(v.shape) for k, v in unet.state_dict().items()} == reference


def test_v1_refuses_a_vector_condition_in_one_line() -> None:
    unet = UNetModel(**TINY)
    with pytest.raises(ValueError, match="y was given but this UNet has none") as refused:
        unet(torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 77, 32), y=torch.zeros(1, 4))
    assert "\n" not in str(refused.value)
