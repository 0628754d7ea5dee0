"""Attention blocks of the latent-diffusion denoiser (Rombach et al. 2022, Sec. 3.3).

A ``SpatialTransformer`` turns a feature map into tokens and runs transformer blocks over them: self-attention,
cross-attention to the conditioning sequence (CLIP text tokens for SD v1), and a GEGLU feed-forward
(Shazeer 2020). Attribute names match the CompVis code so SD v1 checkpoints load by name.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.diffusionmodules.util import checkpoint, zero_module
from ldm.util import default, exists


class GEGLU(nn.Module):
    """GELU-gated linear unit: ``a * gelu(b)`` with ``[a, b] = proj(x)`` (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP ``dim -> mult*dim -> dim_out``; SD v1 uses the GEGLU variant (``glu=True``)."""

    def __init__(
        self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        # Indices 0/1/2 are part of the checkpoint key names (ff.net.0.proj, ff.net.2).
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of queries from ``x`` over keys/values from ``context`` (self-attention if None).

    ``softmax(Q K^T / sqrt(d)) V`` (Vaswani et al. 2017), computed by ``scaled_dot_product_attention``, which
    picks a fused kernel when one is available and never materialises the attention matrix in that case.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``x``: ``[B, N, query_dim]``; ``context``: ``[B, M, context_dim]``; ``mask``: ``[B, M]``, True = attend."""
        context = default(context, x)
        # Splitting heads is a view of each projection: the SDPA kernels only need a unit stride on the last
        # (head) dimension, and the fused CUDA kernels want exactly this [B, N, H, D] memory layout, so an
        # explicit `.contiguous()` here would be a needless copy.
        q, k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.heads)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        if exists(mask):
            mask = rearrange(mask, "b j -> b 1 1 j").bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to ``context``, GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (Rombach et al. 2022, Sec. 3.3).

    ``[B, C, H, W]`` -> group norm -> 1x1 conv to ``n_heads * d_head`` -> ``H*W`` tokens -> transformer blocks
    -> 1x1 conv back to ``C`` -> residual. ``proj_out`` starts at zero, so the block starts as the identity.
    With ``use_linear`` (SDXL, Podell et al. 2023) ``proj_in``/``proj_out`` are ``nn.Linear`` layers applied to
    the tokens instead: the same map as a 1x1 conv, but stored as ``[out, in]`` rather than ``[out, in, 1, 1]``.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        use_checkpoint: bool = True,
        use_linear: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.use_linear = use_linear
        inner_dim = n_heads * d_head
        # Plain GroupNorm with eps 1e-6 here (not GroupNorm32): this is what SD v1 was trained with.
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        # Registered in the original order (proj_in, blocks, proj_out): it fixes the order of parameters(), which
        # optimizer states saved in checkpoints are indexed by.
        self.proj_in = self._projection(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                      checkpoint=use_checkpoint)
                for _ in range(depth)
            ]
        )
        self.proj_out = zero_module(self._projection(inner_dim, in_channels))

    def _projection(self, dim_in: int, dim_out: int) -> nn.Module:
        if self.use_linear:
            return nn.Linear(dim_in, dim_out)
        return nn.Conv2d(dim_in, dim_out, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        _, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        # Both rearranges are made contiguous: a channels-last view reaching the 1x1 conv makes every conv after
        # it run channels-last, and the CPU kernels then re-lay out each 3x3 weight on every call (1 s of a 3.5 s
        # v1 forward, and ~100 MiB).
        if self.use_linear:
            x = self.proj_in(rearrange(x, "b c h w -> b (h w) c").contiguous())
        else:
            x = rearrange(self.proj_in(x), "b c h w -> b (h w) c").contiguous()
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
        return x + x_in if self.use_linear else self.proj_out(x) + x_in
