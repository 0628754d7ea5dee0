"""FLUX.1's prompt encoder: the encoder half of T5 v1.1 XXL (Raffel et al. 2020, "Exploring the Limits of
Transfer Learning with a Unified Text-to-Text Transformer"; v1.1 swaps the ReLU feed forward for gated GELU,
Shazeer 2020, "GLU Variants Improve Transformer"), its SentencePiece tokenizer, and the frozen embedder that sgm's
``GeneralConditioner`` runs.

Module names mirror transformers' ``T5EncoderModel``, so the released files (FLUX.1's ``text_encoder_2``,
``t5xxl_fp16.safetensors``) load by name: ``shared.weight`` (tied to ``encoder.embed_tokens.weight``),
``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}``, ``encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}``,
their two ``layer_norm``s and ``encoder.final_layer_norm``. The maths is transformers' ``modeling_t5.py`` at
inference (no dropout): RMS layer norms, unscaled attention logits plus a learned relative position bias that
block 0 computes and every block reuses, and pre-norm residual blocks.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import sentencepiece
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.encoders.modules import FrozenTextEncoder


@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder sizes; the defaults are XXL (``google/t5-v1_1-xxl``, 4.76 B parameters in the encoder).

    The feed forward is always v1.1's gated GELU with the tanh approximation (transformers' ``gated-gelu``,
    ``gelu_new``). ``vocab_size`` is the embedding's row count: 32128, the tokenizer's 32100 padded to a multiple
    of 128.
    """

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


class T5LayerNorm(nn.Module):
    """RMS norm (Zhang & Sennrich 2019): no mean subtraction and no bias. The mean square is taken in float32
    even for half-precision activations, and the weight multiplies after the cast back, as transformers does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional bucketing of ``key - query`` offsets (mesh-tensorflow ``_relative_position_bucket``).

    Half of the buckets are for keys after the query. Within each half, offsets below ``num_buckets / 4`` get a
    bucket each; larger ones share log-spaced buckets up to ``max_distance``, and all beyond it share the last.
    """
    half = num_buckets // 2
    buckets = (relative_position > 0).long() * half
    distance = relative_position.abs()
    max_exact = half // 2
    # Clamped before the log only so that small offsets (answered by the exact branch) never take log(0).
    log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    """Multi-head self-attention without the 1/sqrt(d) scaling (T5 folds it into the initialisation); the
    position bias (and any padding mask) is added to the logits. Only block 0 owns ``relative_attention_bias``."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.heads = config.num_heads
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.heads)

    def compute_bias(self, length: int) -> torch.Tensor:
        """The learned bias of every (query, key) pair, ``[1, heads, length, length]``."""
        positions = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.num_buckets,
                                           self.max_distance)
        return rearrange(self.relative_attention_bias(buckets), "q k h -> 1 h q k")

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=self.heads) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(rearrange(out, "b h n d -> b n (h d)"))


class T5LayerSelfAttention(nn.Module):
    """``x + attention(norm(x))``; a module only so the checkpoint's ``layer.0.SelfAttention`` names hold."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """v1.1's gated-GELU feed forward: ``wo(gelu_tanh(wi_0 x) * wi_1 x)``."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        # transformers keeps ``wo`` in float32 when it loads T5 in float16 (its output overflows there); a model
        # loaded the same way runs as it does. A float8 ``wo`` (text_encoder_fp8) computes in its stored dtype.
        return self.wo(h.to(getattr(self.wo, "stored_dtype", self.wo.weight.dtype)))


class T5LayerFF(nn.Module):
    """``x + feed_forward(norm(x))`` under the checkpoint's ``layer.1.DenseReluDense`` names."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_float16(x: torch.Tensor) -> torch.Tensor:
    """transformers' float16 guard after each sub-layer: once a value overflows to inf, every value is clamped to
    65504 - 1000 so the next RMS norm sees finite numbers (a tensor test, not ``if``, so it never syncs)."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    """One encoder block: self-attention then feed forward, each pre-norm with a residual."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = _clamp_float16(self.layer[0](x, bias))
        return _clamp_float16(self.layer[1](x))


class T5Stack(nn.Module):
    """Token embedding, the blocks, the final RMS norm (transformers' encoder ``T5Stack``)."""

    def __init__(self, config: T5Config, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList(T5Block(config, has_relative_attention_bias=i == 0)
                                   for i in range(config.num_layers))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # Block 0's relative position bias serves every block, as in T5.
        bias = self.block[0].layer[0].SelfAttention.compute_bias(input_ids.shape[1])
        if attention_mask is not None:  # padded keys get the dtype's lowest value: a softmax weight of 0
            keep = attention_mask.bool()[:, None, None, :]
            bias = bias.masked_fill(~keep, torch.finfo(bias.dtype).min)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


def _tie_embedding(state_dict: dict[str, Any], prefix: str) -> None:
    """Give the tied token embedding both of its names when a file holds only one (in place)."""
    names = (prefix + "shared.weight", prefix + "encoder.embed_tokens.weight")
    present = [name for name in names if name in state_dict]
    if len(present) == 1:
        other = names[1] if present[0] == names[0] else names[0]
        state_dict[other] = state_dict[present[0]]


def t5_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A released T5 encoder file's tensors, ready for a strict ``T5Encoder.load_state_dict``.

    Files keep the tied token embedding as ``shared.weight``, ``encoder.embed_tokens.weight`` or both (safetensors
    cannot store one tensor twice), while the module's state dict names it twice; the missing name is added.
    ``prefix`` is where the encoder's keys start (``"conditioner.embedders.1.transformer."``).
    """
    out = dict(state_dict)
    _tie_embedding(out, prefix)
    return out


class T5Encoder(nn.Module):
    """transformers' ``T5EncoderModel``: ``forward(input_ids, attention_mask=None)`` -> last hidden state
    ``[B, L, d_model]``. ``shared`` and ``encoder.embed_tokens`` are one parameter, as in the original."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Children load after this hook from the same dict, so a file holding one name of the tied embedding
        # loads strictly wherever the encoder sits.
        _tie_embedding(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)


class T5Tokenizer:
    """T5's SentencePiece unigram tokenizer (Kudo & Richardson 2018) over a ``spiece.model`` file.

    ``tokenizer(texts, max_length)`` gives the ids of transformers' ``T5Tokenizer``/``T5TokenizerFast`` called with
    ``padding="max_length", truncation=True``: the pieces' ids cut to ``max_length - 1``, then ``</s>`` (1), then
    ``<pad>`` (0). As in transformers, special tokens written in a prompt (``</s>``, ``<pad>``, ``<unk>`` and the
    sentinels ``<extra_id_0>`` ... ``<extra_id_99>``) are tokens, and the text between them is encoded piece by
    piece. The sentinels follow the file's pieces, numbered down from the top: ``<extra_id_N>`` is
    ``vocab_size - 1 - N`` (32099 for ``<extra_id_0>`` with T5's 32000 pieces).

    ``path`` is the ``spiece.model`` file or a folder holding one (FLUX.1's ``tokenizer_2``).
    """

    PAD_ID, EOS_ID = 0, 1

    def __init__(self, path: str | Path, extra_ids: int = 100) -> None:
        path = Path(path)
        self.path = path / "spiece.model" if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(f"T5 tokenizer file {self.path} not found (pass the spiece.model of the T5 "
                                    "tokenizer, FLUX.1's tokenizer_2/spiece.model)")
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except RuntimeError as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{self.path} is not a SentencePiece model, as the T5 tokenizer's spiece.model is "
                             f"({reason})") from None
        if (self.processor.pad_id(), self.processor.eos_id()) != (self.PAD_ID, self.EOS_ID):
            raise ValueError(f"{self.path} is a tokenizer of another model: T5's has <pad> = 0 and </s> = 1, this "
                             f"one {self.processor.pad_id()} and {self.processor.eos_id()}")
        self.vocab_size = self.processor.get_piece_size() + extra_ids
        special = {"</s>": self.EOS_ID, "<pad>": self.PAD_ID, "<unk>": self.processor.unk_id()}
        special.update({f"<extra_id_{n}>": self.vocab_size - 1 - n for n in range(extra_ids)})
        self.special_ids = special
        self.special_pattern = re.compile("(" + "|".join(map(re.escape, special)) + ")")

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without ``</s>``."""
        ids: list[int] = []
        # re.split with a group alternates text and matched special tokens: odd indices are the tokens.
        for i, part in enumerate(self.special_pattern.split(text)):
            ids.extend([self.special_ids[part]] if i % 2 else self.processor.encode(part))
        return ids

    def __call__(self, texts: str | Sequence[str], max_length: int) -> torch.LongTensor:
        """``[B, max_length]`` token ids on the CPU."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = []
        for text in texts:
            ids = self.encode(text)[: max_length - 1] + [self.EOS_ID]
            rows.append(ids + [self.PAD_ID] * (max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(texts), max_length)


class FrozenT5Embedder(FrozenTextEncoder):
    """FLUX.1's T5 embedder for sgm's conditioner: prompts -> T5's last hidden state ``[B, max_length, d_model]``.

    No attention mask is passed: padding tokens attend to and are attended by the prompt, as in Black Forest Labs'
    ``HFEmbedder`` and diffusers' ``FluxPipeline``, which FLUX.1 was trained with. ``max_length`` is 512 for
    FLUX.1-dev and 256 for schnell. ``tokenizer_path`` is T5's ``spiece.model`` (or its folder); None builds the
    network only (to load or inspect weights), and prompts then fail with a one-line error. ``config`` holds
    ``T5Config`` fields (XXL when empty), so a tiny test model can be written in YAML. ``is_trainable``,
    ``ucg_rate`` and ``input_key`` are set by the conditioner.
    """

    def __init__(self, tokenizer_path: str | Path | None = None, max_length: int = 512, freeze: bool = True,
                 **config: Any) -> None:
        super().__init__()
        self.max_length = max_length
        self.transformer = T5Encoder(T5Config(**config))
        self.tokenizer = None if tokenizer_path is None else T5Tokenizer(tokenizer_path)
        rows = self.transformer.config.vocab_size
        if self.tokenizer is not None and self.tokenizer.vocab_size > rows:
            raise ValueError(f"{self.tokenizer.path} has {self.tokenizer.vocab_size} tokens but the T5 encoder's "
                             f"embedding only {rows}: a tokenizer of another model")
        if freeze:
            self.freeze()

    def tokenize(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """``[B, max_length]`` token ids on the CPU."""
        if self.tokenizer is None:
            raise ValueError("FrozenT5Embedder has no tokenizer: pass tokenizer_path, the T5 tokenizer file "
                             "(spiece.model, FLUX.1's tokenizer_2/spiece.model)")
        return self.tokenizer(texts, self.max_length)

    def forward(self, texts: str | Sequence[str]) -> torch.Tensor:
        ids = self.tokenize(texts).to(self.transformer.shared.weight.device)
        return self.transformer(ids)

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self(texts)
