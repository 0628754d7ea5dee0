"""OpenCLIP's text tower (Cherti et al. 2023, "Reproducible scaling laws for contrastive language-image learning")
and SDXL's frozen wrapper around it, sgm's ``FrozenOpenCLIPEmbedder2``.

Written here rather than imported: ``open_clip`` pulls in torchvision and downloads weights. Module names mirror
OpenCLIP's ``CLIP`` text attributes, so SDXL's ``conditioner.embedders.1.model.*`` keys load by name:
``token_embedding``, ``positional_embedding``, ``transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}``,
``ln_final``, ``text_projection`` and the (unused here) contrastive ``logit_scale``. Unlike OpenAI's CLIP-L, the
OpenCLIP models use exact GELU and their tokenizer pads with id 0.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.encoders.modules import FrozenTextEncoder, eos_positions
from ldm.modules.encoders.tokenizer import CLIPTokenizer


@dataclass(frozen=True)
class TextTowerSize:
    width: int
    layers: int
    heads: int


# Text towers of the OpenCLIP architectures Stable Diffusion uses (open_clip/model_configs/<arch>.json);
# the MLP is 4x wide and the projection is square in both.
ARCHS = {
    "ViT-H-14": TextTowerSize(width=1024, layers=24, heads=16),  # SD 2.x
    "ViT-bigG-14": TextTowerSize(width=1280, layers=32, heads=20),  # SDXL's second text encoder
}


class MultiheadSelfAttention(nn.Module):
    """Causal self-attention with ``nn.MultiheadAttention``'s parameter names (packed q/k/v ``in_proj``), run
    through ``scaled_dot_product_attention``.

    ``in_proj_lora`` is None, or a module added to the packed projection's output (``ldm.modules.lora.FusedQKVLoRA``):
    the packed weight is a bare parameter, so LoRA cannot wrap it as it wraps a ``Linear``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.in_proj_lora: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if self.in_proj_lora is not None:
            qkv = qkv + self.in_proj_lora(x)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        # OpenCLIP's additive -inf mask above the diagonal is exactly the causal mask.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); exact-GELU MLP named ``c_fc``/``c_proj``."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        layers = [("c_fc", nn.Linear(width, mlp_dim)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(mlp_dim, width))]
        self.mlp = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """The block stack (``transformer.resblocks``). ``grad_checkpointing`` recomputes each block's activations in
    the backward pass instead of storing them (only matters if the tower is trained)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, eps: float) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_dim, eps) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"penultimate": input of the last block, "last": its output}``, both ``[B, L, width]``, no final norm."""
        out = {}
        for i, block in enumerate(self.resblocks):
            if i == len(self.resblocks) - 1:
                out["penultimate"] = x
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        out["last"] = x
        return out


class OpenCLIPTextModel(nn.Module):
    """OpenCLIP ``CLIP`` without its vision tower: what sgm keeps as ``FrozenOpenCLIPEmbedder2.model``."""

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 1280,
        layers: int = 32,
        heads: int = 20,
        mlp_dim: int = 5120,
        embed_dim: int = 1280,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = TextTransformer(width, layers, heads, mlp_dim, layer_norm_eps)
        self.ln_final = nn.LayerNorm(width, eps=layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))  # applied as x @ text_projection
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's contrastive temperature
        self.init_parameters()

    def init_parameters(self) -> None:
        """OpenCLIP's initialisation (Radford et al.'s): only used for models trained from scratch, e.g. tests."""
        width, depth = self.transformer.width, len(self.transformer.resblocks)
        proj_std = width**-0.5 * (2 * depth) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``penultimate`` and ``last`` hidden states (no ``ln_final``) and ``pooled`` ``[B, embed_dim]``:
        ``ln_final(last)`` at the end-of-text token, projected (OpenCLIP's ``encode_text``)."""
        x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]
        out = self.transformer(x)
        normed = self.ln_final(out["last"])
        eot = normed[torch.arange(normed.shape[0], device=normed.device), eos_positions(input_ids)]
        out["pooled"] = eot @ self.text_projection
        return out


class FrozenOpenCLIPEmbedder2(FrozenTextEncoder):
    """SDXL's second text encoder (sgm's class of the same name): OpenCLIP ViT-bigG/14 over prompts.

    ``layer`` ``"penultimate"`` (SDXL) or ``"last"`` picks the hidden state. ``legacy=True`` (SD 2.x style) applies
    ``ln_final`` to it; ``legacy=False`` (SDXL) returns it raw. ``always_return_pooled`` (needs ``legacy=False``)
    returns ``(z [B, 77, width], pooled [B, embed_dim])``. ``arch`` selects the size (``ARCHS``); ``width``,
    ``layers``, ``heads``, ``mlp_dim`` and ``embed_dim`` override it (tiny test models). ``version`` (the
    pretrained tag) and ``device`` are accepted so sgm configs instantiate, and unused: weights come from the SDXL
    checkpoint, and token ids go to the device of the parameters.
    """

    UNREAD_PARAMS = ("version", "device")  # accepted so the original configs instantiate

    def __init__(
        self,
        arch: str = "ViT-bigG-14",
        version: str = "laion2b_s39b_b160k",
        device: str | torch.device | None = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: Literal["last", "penultimate"] = "last",
        always_return_pooled: bool = False,
        legacy: bool = True,
        width: int | None = None,
        layers: int | None = None,
        heads: int | None = None,
        mlp_dim: int | None = None,
        embed_dim: int | None = None,
        vocab_size: int = 49408,
        bpe_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        if always_return_pooled and legacy:
            raise ValueError("always_return_pooled needs legacy=False (as in sgm)")
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
        size = ARCHS[arch]
        width = width or size.width
        self.arch, self.version = arch, version
        self.max_length = max_length
        self.layer = layer
        self.return_pooled = always_return_pooled
        self.legacy = legacy
        self.tokenizer = CLIPTokenizer(bpe_path=bpe_path, max_length=max_length, pad_token_id=0)
        self.model = OpenCLIPTextModel(
            vocab_size=vocab_size,
            context_length=max_length,
            width=width,
            layers=layers or size.layers,
            heads=heads or size.heads,
            mlp_dim=mlp_dim or 4 * width,
            embed_dim=embed_dim or width,
        )
        if freeze:
            self.freeze()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.transformer.grad_checkpointing = enable

    def tokenize(self, text: str | Sequence[str]) -> torch.LongTensor:
        """``[B, max_length]`` ids on the CPU, zero-padded like ``open_clip.tokenize``."""
        return self.tokenizer(text)

    def forward(self, text: str | Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenize(text).to(self.model.token_embedding.weight.device)
        out = self.model(ids)
        z = self.model.ln_final(out[self.layer]) if self.legacy else out[self.layer]
        return (z, out["pooled"]) if self.return_pooled else z

    def encode(self, text: str | Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self(text)
