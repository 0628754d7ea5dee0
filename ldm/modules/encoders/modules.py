"""SD v1's conditioning model: the CLIP ViT-L/14 text transformer (Radford et al. 2021) and its frozen wrapper.

SDXL reuses it as the first embedder of its conditioner with ``layer="hidden", layer_idx=11`` (sgm's options).

Module names mirror the Hugging Face transformers 4.x ``CLIPTextModel`` that the CompVis code wrapped, so the
released checkpoints load by name under ``cond_stage_model.transformer.text_model.``. Nothing is downloaded:
the weights come from the SD checkpoint and the tokenizer from a local merge table.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.encoders.tokenizer import CLIPTokenizer


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, vocab_size: int, width: int, max_positions: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_positions, width)
        # Persistent because the released .ckpt files carry it (transformers 4.x saved it).
        self.register_buffer("position_ids", torch.arange(max_positions).unsqueeze(0), persistent=True)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Newer exporters (transformers >= 4.31, diffusers) drop position_ids, and some merged community
        # checkpoints store it as slightly-off floats; both cases get the exact 0..N-1 ramp.
        key = prefix + "position_ids"
        ids = state_dict.get(key)
        if ids is None or ids.is_floating_point():
            ref = state_dict.get(prefix + "token_embedding.weight", self.position_ids)
            device = self.position_ids.device if ref.device.type == "meta" else ref.device
            n = self.position_ids.shape[-1]
            state_dict[key] = torch.arange(n, device=device).unsqueeze(0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[-1]]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections (the checkpoint stores them apart)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            rearrange(proj(x), "b n (h d) -> b h n d", h=self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        # CLIP's text tower is causal: token i sees only tokens <= i, so padding after EOS never leaks backwards.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class CLIPMLP(nn.Module):
    """Feed-forward block with CLIP's quick-GELU, x * sigmoid(1.702 x)."""

    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, mlp_dim)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of blocks; a separate module only so the checkpoint's ``encoder.layers.{i}`` names hold."""

    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(width, heads, mlp_dim, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks ``start`` to ``stop - 1``: an intermediate hidden state, and later the rest from it."""
        for layer in self.layers[start:stop]:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    """CLIP text tower: embeddings, causal encoder, final layer norm. Returns ``last_hidden_state``."""

    def __init__(
        self,
        vocab_size: int = 49408,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        max_positions: int = 77,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, width, max_positions)
        self.encoder = CLIPEncoder(width, layers, heads, mlp_dim, layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(width, eps=layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))


class CLIPTextModel(nn.Module):
    """Holder that adds the ``text_model.`` level of the transformers 4.x key names."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.text_model = CLIPTextTransformer(**kwargs)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids)


def eos_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Index of the first ``<|endoftext|>`` of each row: it has the largest id of the vocabulary, so ``argmax``
    finds it whatever the padding id (CLIP's and OpenCLIP's pooling rule)."""
    return input_ids.argmax(dim=-1)


class FrozenTextEncoder(nn.Module):
    """A text encoder that stays fixed unless it is trained (``cond_stage_trainable``; SDXL's and FLUX.1's are
    always fixed here): ``freeze`` puts its networks in eval mode, without gradients."""

    def freeze(self) -> None:
        for network in self.children():
            network.eval()
        for param in self.parameters():
            param.requires_grad = False


class FrozenCLIPEmbedder(FrozenTextEncoder):
    """SD v1 ``cond_stage_model`` and SDXL's first embedder: tokenize prompts and run CLIP's text tower.

    ``layer`` picks the output (sgm's options): ``"last"`` the last hidden state after ``final_layer_norm``
    (SD v1), ``"hidden"`` the hidden state after the first ``layer_idx`` blocks, without the final norm (SDXL:
    ``layer_idx=11`` of 12; indexed like transformers' ``hidden_states``: 0 is the embeddings, negative counts
    from the end), ``"pooled"`` the normed state at the EOS token as ``[B, 1, width]``, ``"pooler_output"`` the same
    as ``[B, width]`` (transformers' ``pooler_output``: FLUX.1's vector input, which sgm's conditioner files under
    ``vector`` by its rank). ``always_return_pooled`` returns ``(z, pooled)`` with pooled ``[B, width]`` (CLIP-L
    has no text projection in this checkpoint).

    ``version`` and ``device`` are accepted so original configs instantiate unchanged, and are otherwise unused:
    only the architecture given by the size arguments (ViT-L/14 by default) is built, nothing is downloaded, and
    the token ids follow the module's parameters to whatever device the caller (e.g. Lightning) moved it to.
    """

    UNREAD_PARAMS = ("version", "device")  # accepted so the original configs instantiate

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str | torch.device | None = None,
        max_length: int = 77,
        vocab_size: int = 49408,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        layer_norm_eps: float = 1e-5,
        freeze: bool = True,
        bpe_path: str | Path | None = None,
        layer: Literal["last", "pooled", "pooler_output", "hidden"] = "last",
        layer_idx: int | None = None,
        always_return_pooled: bool = False,
    ) -> None:
        super().__init__()
        if layer not in ("last", "pooled", "pooler_output", "hidden"):
            raise ValueError(f"layer must be 'last', 'pooled', 'pooler_output' or 'hidden', got {layer!r}")
        if layer == "hidden" and (layer_idx is None or not -layers - 1 <= layer_idx <= layers):
            raise ValueError(f"layer 'hidden' needs layer_idx in [{-layers - 1}, {layers}], got {layer_idx}")
        if layer != "hidden" and layer_idx is not None:
            raise ValueError(f"layer_idx is only read with layer 'hidden', got layer {layer!r}")
        self.version = version
        self.max_length = max_length
        self.layer = layer
        # Blocks to run for the output: hidden_states[k] is the state after k blocks; -1 is after all of them.
        self.num_blocks = layers if layer_idx is None else layer_idx % (layers + 1)
        self.return_pooled = always_return_pooled
        self.tokenizer = CLIPTokenizer(bpe_path=bpe_path, max_length=max_length)
        self.transformer = CLIPTextModel(
            vocab_size=vocab_size,
            width=width,
            layers=layers,
            heads=heads,
            mlp_dim=mlp_dim,
            max_positions=max_length,
            layer_norm_eps=layer_norm_eps,
        )
        if freeze:
            self.freeze()

    def tokenize(self, text: str | Sequence[str]) -> torch.LongTensor:
        """``[B, max_length]`` token ids on the CPU."""
        return self.tokenizer(text)

    def forward(self, text: str | Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        model = self.transformer.text_model
        ids = self.tokenize(text).to(model.embeddings.token_embedding.weight.device)
        if self.layer == "last" and not self.return_pooled:
            return self.transformer(ids)  # the SD v1 path, unchanged
        # One pass: stop at the requested block, then finish the stack only if the pooled output needs it.
        z = model.encoder(model.embeddings(ids), stop=self.num_blocks)
        if self.layer == "hidden" and not self.return_pooled:
            return z
        last = model.final_layer_norm(model.encoder(z, start=self.num_blocks))
        pooled = last[torch.arange(last.shape[0], device=last.device), eos_positions(ids)]
        z = {"last": last, "pooled": pooled[:, None], "pooler_output": pooled, "hidden": z}[self.layer]
        return (z, pooled) if self.return_pooled else z

    def encode(self, text: str | Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self(text)
