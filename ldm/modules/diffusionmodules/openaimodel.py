"""The denoiser UNet of Stable Diffusion v1 and XL: predicts the noise eps(x_t, t, c[, y]).

The ADM UNet of Dhariwal & Nichol 2021 (itself from Ho et al. 2020) with its attention blocks replaced by
spatial transformers that cross-attend to the conditioning (Rombach et al. 2022, Sec. 3.3). Module names, block
order and constructor signature follow the CompVis ``openaimodel.py`` and, for the SDXL options (Podell et al.
2023), Stability AI's ``sgm`` one, so ``model.diffusion_model.*`` keys of the released checkpoints load by name.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)
from ldm.util import exists


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the module to ``x`` given the timestep embedding ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that hands the timestep embedding and the context to the children that take them."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution (``op``), or average pooling without ``use_conv``."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (Ho et al. 2020, App. B).

    ``skip(x) + conv(drop(act(norm(conv(act(norm(x))) + proj(emb)))))``; with ``use_scale_shift_norm`` the
    embedding modulates the second norm as ``norm(h) * (1 + scale) + shift`` instead (Dhariwal & Nichol 2021).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        if up or down:
            raise NotImplementedError("ResBlock up/down-sampling (resblock_updown) is not used by SD v1")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        # [B, C] -> [B, C, 1, 1]: one shift (or scale and shift) per channel, broadcast over the pixels.
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def transformer_depths(transformer_depth: Union[int, Sequence[int]], channel_mult: Sequence[int]) -> list[int]:
    """Transformer blocks per attention at each level: one int for all levels (SD v1), or a list (SDXL)."""
    if isinstance(transformer_depth, int):
        return [transformer_depth] * len(channel_mult)
    if len(transformer_depth) != len(channel_mult):
        raise ValueError(f"transformer_depth {list(transformer_depth)}: one entry per level of {list(channel_mult)}")
    return [int(d) for d in transformer_depth]


class UNetModel(nn.Module):
    """The SD denoiser: ``forward(x_t, t, context[, y]) -> eps`` (Rombach et al. 2022; Ho et al. 2020, Eq. 14).

    Encoder levels of ResBlocks (+ spatial transformers at the downsampling factors in
    ``attention_resolutions``), a middle ResBlock-transformer-ResBlock, and a mirrored decoder whose every block
    first concatenates the matching encoder activation. Only the options SD v1 and SDXL use are implemented; the
    others raise ``NotImplementedError`` so a config never silently builds a different network.

    SDXL (Podell et al. 2023, Sec. 2.1-2.2) adds: ``transformer_depth`` per level (the middle block takes the
    last level's, or ``transformer_depth_middle``), ``use_linear_in_transformer`` (Linear proj_in/proj_out), and
    a vector condition ``y`` ``[B, adm_in_channels]`` (``num_classes: sequential``) that an MLP ``label_emb``
    maps to the width of the timestep embedding and adds to it.
    """

    UNREAD_PARAMS = ("image_size", "num_heads_upsample")  # accepted for the original configs

    def __init__(
        self,
        image_size: Optional[int] = None,
        in_channels: int = 4,
        model_channels: int = 320,
        out_channels: int = 4,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        dropout: float = 0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[Union[int, Literal["sequential"]]] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: Union[int, Sequence[int]] = 1,
        context_dim: Optional[int] = None,
        n_embed: Optional[int] = None,
        legacy: bool = True,
        use_linear_in_transformer: bool = False,
        adm_in_channels: Optional[int] = None,
        transformer_depth_middle: Optional[int] = None,
    ) -> None:
        super().__init__()
        unsupported = {
            "num_classes other than 'sequential' (class labels)": num_classes not in (None, "sequential"),
            "use_fp16 (cast the module with .half() instead)": use_fp16,
            "resblock_updown": resblock_updown,
            "use_new_attention_order": use_new_attention_order,
            "n_embed (codebook prediction head)": n_embed is not None,
            "dims != 2": dims != 2,
            "use_spatial_transformer=False (ADM AttentionBlock)": not use_spatial_transformer,
        }
        for what, requested in unsupported.items():
            if requested:
                raise NotImplementedError(f"UNetModel: {what} is not supported by this implementation")
        if context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim (the width of the conditioning tokens)")
        # num_heads_upsample only sized the ADM AttentionBlock; the original's spatial-transformer decoder uses
        # num_heads / num_head_channels like the encoder, and so does this one.
        del num_heads_upsample
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels")
        if (num_classes == "sequential") != (adm_in_channels is not None):
            raise ValueError("num_classes 'sequential' and adm_in_channels (the width of y) go together")
        depths = transformer_depths(transformer_depth, channel_mult)

        del image_size  # the original configs pass it; the UNet works at any size its levels can halve
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.adm_in_channels = adm_in_channels
        self.use_checkpoint = use_checkpoint
        self._heads, self._head_channels, self._legacy = num_heads, num_head_channels, legacy
        # The original hard-wired checkpointing on in the transformer blocks whatever use_checkpoint said; here the
        # one flag governs ResBlocks and transformer blocks alike.
        self._transformer_kwargs = dict(dropout=dropout, context_dim=int(context_dim), use_checkpoint=use_checkpoint,
                                        use_linear=use_linear_in_transformer)
        self._resblock_kwargs = dict(
            dropout=dropout, dims=dims, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm
        )

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        if adm_in_channels is not None:
            # The outer Sequential is sgm's; it puts the MLP's keys at label_emb.0.0 / label_emb.0.2.
            self.label_emb = nn.Sequential(
                nn.Sequential(linear(adm_in_channels, time_embed_dim), nn.SiLU(),
                              linear(time_embed_dim, time_embed_dim))
            )

        # Encoder: remember each block's width, the decoder pops them in reverse for its skip connections.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [self._resblock(ch, time_embed_dim, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(self._transformer(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims)))
                input_block_chans.append(ch)
                ds *= 2

        middle_depth = depths[-1] if transformer_depth_middle is None else transformer_depth_middle
        self.middle_block = TimestepEmbedSequential(
            self._resblock(ch, time_embed_dim, ch),
            self._transformer(ch, middle_depth),
            self._resblock(ch, time_embed_dim, ch),
        )

        # Decoder: one more block per level than the encoder, so it also consumes the downsampler's output.
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = input_block_chans.pop()
                layers = [self._resblock(ch + skip_ch, time_embed_dim, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(self._transformer(ch, depths[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1))
        )

    def _resblock(self, channels: int, emb_channels: int, out_channels: int) -> ResBlock:
        return ResBlock(channels, emb_channels, out_channels=out_channels, **self._resblock_kwargs)

    def _transformer(self, ch: int, depth: int) -> SpatialTransformer:
        """A spatial transformer of width ``ch`` with ``depth`` blocks, with the original's head arithmetic.

        ``num_head_channels`` fixes the head width (heads = ch // width); otherwise ``num_heads`` fixes the head
        count (width = ch // heads). ``legacy`` recomputes the width as ch // heads, which only differs when
        ``num_head_channels`` does not divide ``ch``. SD v1: 8 heads of 40/80/160 channels; SDXL: heads of 64
        channels, 10 at width 640 and 20 at 1280.
        """
        if self._head_channels == -1:
            num_heads, dim_head = self._heads, ch // self._heads
        else:
            num_heads, dim_head = ch // self._head_channels, self._head_channels
        if self._legacy:
            dim_head = ch // num_heads
        return SpatialTransformer(ch, num_heads, dim_head, depth=depth, **self._transformer_kwargs)

    def set_gradient_checkpointing(self, flag: bool) -> None:
        """Switch gradient checkpointing of every ResBlock and transformer block on or off."""
        self.use_checkpoint = flag
        for module in self.modules():
            if isinstance(module, ResBlock):
                module.use_checkpoint = flag
            elif isinstance(module, BasicTransformerBlock):
                module.checkpoint = flag

    def _check_y(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        """Refuse, in one line, a ``y`` this UNet cannot use or a missing one it needs."""
        if self.adm_in_channels is None:
            if exists(y):
                raise ValueError("a vector condition y was given but this UNet has none (no adm_in_channels)")
            return
        expected = (x.shape[0], self.adm_in_channels)
        if y is None:
            raise ValueError(f"this UNet needs the vector condition y of shape {list(expected)}; got y=None")
        if tuple(y.shape) != expected:
            raise ValueError(f"y must have shape {list(expected)} (batch, adm_in_channels); got {list(y.shape)}")

    def forward(
        self,
        x: torch.Tensor,
        timesteps: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Predict the noise in ``x`` ``[B, C, H, W]`` at integer or float ``timesteps`` ``[B]``.

        ``context`` ``[B, M, context_dim]`` is what the transformers cross-attend to. ``y`` ``[B,
        adm_in_channels]`` is the vector condition of a ``num_classes: sequential`` UNet (SDXL: pooled text
        embedding ++ sinusoidal embeddings of the size and crop numbers); it is required there and refused
        elsewhere.
        """
        if timesteps is None:
            raise ValueError("UNetModel.forward needs timesteps")
        self._check_y(x, y)
        # Run in the parameters' dtype (so a .half() model accepts float32 latents) and answer in the input's.
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if exists(y):
            emb = emb + self.label_emb(y.to(dtype))
        if exists(context):
            context = context.to(dtype)
        h = x.to(dtype)
        hs = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)
