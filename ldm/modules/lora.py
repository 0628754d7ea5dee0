"""A LoRA adapter (Hu et al. 2022) for a packed q/k/v projection, which peft cannot wrap: OpenCLIP's attention keeps
q, k and v in one bare ``in_proj_weight`` parameter (``nn.MultiheadAttention``'s layout), not in ``Linear`` layers.
``ldm.weights.lora`` attaches it as ``MultiheadSelfAttention.in_proj_lora`` and names its parts as kohya names the separate
projections of transformers' CLIP (``self_attn_q_proj``...).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: the row blocks of a packed in_proj, in order
QKV = ("q", "k", "v")


class FusedQKVLoRA(nn.Module):
    """LoRA of a packed q/k/v projection (OpenCLIP's ``attn.in_proj_weight``, ``[3W, W]``), added to its output
    by ``MultiheadSelfAttention``: one adapter per row block, i.e. kohya's separate ``q_proj``/``k_proj``/``v_proj``
    adapters, each with its own rank and alpha (a part without one adds zeros).

    Together they are one low-rank update of the packed weight, ``[s_q B_q A_q; s_k B_k A_k; s_v B_v A_v]``: down
    ``cat(A_q, A_k, A_v)`` of rank r_q + r_k + r_v and a block-diagonal up (Hu et al. 2022, eq. 3, per block), so
    three kohya adapters are represented exactly, and merging adds each block to its third of the rows. Names and
    initialisation follow peft's ``lora_A``/``lora_B``: A Kaiming-uniform, B zero (the adapter starts at no change).
    """

    def __init__(self, width: int, ranks: Mapping[str, int], alphas: Mapping[str, float],
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not ranks or set(ranks) - set(QKV):
            raise ValueError(f"parts must be some of {QKV}, got {sorted(ranks)}")
        self.width = width
        self.lora_A = nn.ParameterDict({p: nn.Parameter(torch.empty(r, width)) for p, r in ranks.items()})
        self.lora_B = nn.ParameterDict({p: nn.Parameter(torch.zeros(width, r)) for p, r in ranks.items()})
        self.scaling = {p: float(alphas[p]) / r for p, r in ranks.items()}
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # adds nothing while set (ldm.weights.lora.adapters_disabled)
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return x.new_zeros(*x.shape[:-1], 3 * self.width)
        h = self.dropout(x)
        blocks = []
        for p in QKV:
            if p in self.lora_A:
                a, b = self.lora_A[p], self.lora_B[p]
                blocks.append(F.linear(F.linear(h.to(a.dtype), a), b).to(x.dtype) * self.scaling[p])
            else:
                blocks.append(x.new_zeros(*x.shape[:-1], self.width))
        return torch.cat(blocks, dim=-1)
