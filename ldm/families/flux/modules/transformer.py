"""The FLUX.1 transformer (Black Forest Labs 2024): a rectified-flow velocity model in the MM-DiT family
(Esser et al. 2024, "Scaling Rectified Flow Transformers", Sec. 5.1).

Latents are cut into 2x2 patches, one token each. 19 double-stream blocks keep separate weights for the image and
the T5 text tokens and attend jointly over both; 38 single-stream blocks then process the concatenated sequence
with one set of weights, the attention and the MLP computed in parallel from one projection (Dehghani et al. 2023,
"Scaling Vision Transformers to 22B"). Every block is modulated (adaLN, Peebles & Xie 2023, DiT) by one vector:
timestep + CLIP pooled text (+ the distilled guidance scale for FLUX.1 [dev]). Positions are 3-axis rotary
embeddings (Su et al. 2021, RoFormer) over (0, row, column) ids, zero for text tokens.

The attribute names and the maths follow BFL's reference code (src/flux/model.py, modules/layers.py, math.py), so
``flux1-dev.safetensors`` and ``flux1-schnell.safetensors`` load strictly by name. The blocks sit in two
``nn.ModuleList``s so an engine can move them to the accelerator one at a time.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint


@dataclass
class FluxParams:
    """The hyper-parameters of ``Flux``; the defaults are FLUX.1 [dev]'s."""

    in_channels: int = 64  # 16 latent channels x a 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP ViT-L pooled output
    context_in_dim: int = 4096  # T5 v1.1 XXL hidden size
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])  # rotary dims per id axis; sum = head dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True
    #: Gradient checkpointing of every block (Chen et al. 2016): activations recomputed in backward. Not a weight.
    use_checkpoint: bool = False

    @classmethod
    def dev(cls) -> FluxParams:
        """FLUX.1 [dev]: guidance-distilled, so the guidance scale is an input."""
        return cls(guidance_embed=True)

    @classmethod
    def schnell(cls) -> FluxParams:
        """FLUX.1 [schnell]: timestep-distilled, no guidance input."""
        return cls(guidance_embed=False)


# ---- maths (BFL's math.py) --------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10_000, time_factor: float = 1000.0
                       ) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of ``t`` in [0, 1], scaled by ``time_factor`` so its frequencies
    see the 0..1000 range DDPM-era embeddings were designed for; cosines first, then sines. [B] -> [B, dim]."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """Rotary embedding (RoFormer, Eq. 34) of positions [B, N] as 2x2 rotation matrices [B, N, dim/2, 2, 2].

    Angles are computed in float64, as BFL does: position x frequency reaches hundreds of radians, where float32
    keeps only ~1e-5 rad and the rotation of far-apart tokens would drift."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    angles = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)
    out = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2).float()


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each consecutive pair of query/key channels by its position's angle, in float32."""
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Multi-head attention with rotary positions: q, k, v [B, H, L, D] -> [B, L, H*D]."""
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return rearrange(x, "B H L D -> B L (H D)")


# ---- layers (BFL's modules/layers.py) ---------------------------------------------------------------------------

class EmbedND(nn.Module):
    """Rotary embedding of N-axis position ids [B, L, N]: axis i gets ``axes_dim[i]`` of each head's channels.
    Returns [B, 1, L, head_dim/2, 2, 2] (the 1 broadcasts over heads)."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]) -> None:
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: lifts the timestep / guidance / pooled-text vectors to the model width."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) with a learned ``scale``; the statistic is taken in float32
    so bf16 activations do not lose it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=dtype) * self.scale


class QKNorm(nn.Module):
    """RMS-normalised queries and keys per head (Esser et al. 2024, Sec. 5.3.2): keeps attention logits bounded,
    which high-resolution training in bf16 needs."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """The weights of one stream's attention (fused ``qkv``, per-head ``norm``, output ``proj``); the joint
    attention itself runs in ``DoubleStreamBlock``, which concatenates both streams' queries, keys and values."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised queries and keys and the values of ``x`` [B, L, dim], each [B, H, L, D]."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    """One adaLN triple, each [B, 1, dim]: ``(1 + scale) * norm(x) + shift`` in, ``x + gate * f(...)`` out."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    """adaLN-Zero modulation (DiT, Sec. 3.2) from the conditioning vector: two triples (attention, MLP) for a
    double-stream block, one for a single-stream block."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def _mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    # Indices 0 and 2 are part of the checkpoint key names (img_mlp.0, img_mlp.2).
    return nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim, bias=True), nn.GELU(approximate="tanh"),
                         nn.Linear(mlp_hidden_dim, hidden_size, bias=True))


class DoubleStreamBlock(nn.Module):
    """MM-DiT block (Esser et al. 2024, Fig. 2b): image and text tokens keep their own modulation, norms, attention
    weights and MLP, and attend jointly over ``cat(txt, img)``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False) -> None:
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads((1 + img_mod1.scale) * self.img_norm1(img) + img_mod1.shift)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads((1 + txt_mod1.scale) * self.txt_norm1(txt) + txt_mod1.shift)

        # Text first: ``pe`` was built from cat(txt_ids, img_ids) in the same order.
        attn = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                         torch.cat((txt_v, img_v), dim=2), pe=pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp((1 + img_mod2.scale) * self.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp((1 + txt_mod2.scale) * self.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel-layers block (Dehghani et al. 2023, Sec. 3): ``linear1`` yields q, k, v and the MLP input at once;
    ``linear2`` maps cat(attention, GELU(mlp)) back, sharing one residual and one modulation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        mod, _ = self.modulation(vec)
        x_mod = (1 + mod.scale) * self.pre_norm(x) + mod.shift
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        output = self.linear2(torch.cat((attention(q, k, v, pe=pe), self.mlp_act(mlp)), 2))
        return x + mod.gate * output


class LastLayer(nn.Module):
    """Modulated final norm and the projection back to patch channels. Its adaLN chunks are (shift, scale), the
    order diffusers swaps when converting."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


# ---- latent packing (BFL's sampling.py) -------------------------------------------------------------------------

def pack(x: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, H, W] -> tokens [B, (H/2)(W/2), 4C], one per 2x2 patch, row-major (H and W even)."""
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: height and width must be even, got {tuple(x.shape)}")
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack``: tokens [B, (h/2)(w/2), 4C] -> latents [B, C, h, w] (``h``, ``w`` in latent pixels)."""
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // 2, w=w // 2, ph=2, pw=2)


def image_ids(batch: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """Rotary position ids of ``pack``'s tokens for an [h, w] latent: [B, (h/2)(w/2), 3] = (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return repeat(ids, "h w c -> b (h w) c", b=batch)


def text_ids(batch: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """Position ids of the text tokens: all zero, so text carries no position of its own beyond T5's."""
    return torch.zeros(batch, length, 3, device=device)


# ---- the model (BFL's model.py) ---------------------------------------------------------------------------------

class Flux(nn.Module):
    """The FLUX.1 transformer: packed image tokens and T5 tokens in, the velocity of the packed tokens out.

    ``forward`` is BFL's token-level signature. ``velocity`` is the latent-level one samplers and training call;
    it is a method rather than a wrapper module so that a ``Flux`` placed at ``model.diffusion_model`` keeps the
    released key names under that prefix (``model.diffusion_model.double_blocks.0...``, as ComfyUI stores them)
    without a wrapper adding a level of its own."""

    def __init__(self, params: FluxParams) -> None:
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        if params.hidden_size % params.num_heads:
            raise ValueError(f"hidden_size {params.hidden_size} is not a multiple of num_heads {params.num_heads}")
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"axes_dim {params.axes_dim} must sum to the head dim {pe_dim}")
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList([
            DoubleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio, qkv_bias=params.qkv_bias)
            for _ in range(params.depth)])
        self.single_blocks = nn.ModuleList([
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio)
            for _ in range(params.depth_single_blocks)])
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """img [B, N, in_channels] packed latents, img_ids [B, N, 3], txt [B, L, context_in_dim], txt_ids [B, L, 3],
        timesteps [B] in [0, 1] (1 = noise), y [B, vec_in_dim], guidance [B] (the CFG scale the dev model was
        distilled from, e.g. 3.5) -> [B, N, out_channels]."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("Flux.forward takes packed tokens: img and txt must be [B, L, C]")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("FLUX.1 [dev] is guidance-distilled: pass the guidance scale")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        grad_ckpt = self.params.use_checkpoint
        for block in self.double_blocks:
            img, txt = checkpoint(block, (img, txt, vec, pe), (), grad_ckpt)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = checkpoint(block, (img, vec, pe), (), grad_ckpt)
        return self.final_layer(img[:, txt.shape[1]:, ...], vec)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                 guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """The rectified-flow velocity of latents x [B, 16, H, W] at times t [B] in [0, 1], given T5 tokens
        context [B, L, 4096] and the CLIP pooled vector y [B, 768]; returns [B, 16, H, W].

        Packs, builds the position ids and calls ``self`` (so forward hooks see the call), as BFL's sampler does:
        t and guidance are cast to the latents' dtype before the embedding."""
        b, _, h, w = x.shape
        t = t.to(device=x.device, dtype=x.dtype).expand(b)
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device, dtype=x.dtype).expand(b)
        out = self(pack(x), image_ids(b, h, w, x.device), context, text_ids(b, context.shape[1], x.device),
                   t, y, guidance)
        return unpack(out, h, w)


def flux_transformer(**params: Any) -> Flux:
    """``Flux(FluxParams(**params))``: the target a config's ``unet_config`` names, its ``params`` being
    :class:`FluxParams`' fields (each checked against that signature like any other config key)."""
    return Flux(FluxParams(**params))


flux_transformer.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                      default=f.default if f.default is not MISSING else f.default_factory())  # type: ignore[misc]
    for f in fields(FluxParams)])
