"""Stochastic rounding of float32 to bfloat16, for training with weights stored in bf16.

An AdamW update is often smaller than half the gap between two neighbouring bf16 numbers (2**-8 of the weight):
rounded to nearest, it is lost, and a weight stored in bf16 stops learning. Rounding up with probability equal to
the distance from the lower neighbour (in units of the gap) makes the stored weight right on average, so small
updates accumulate in expectation (Gupta et al. 2015, "Deep Learning with Limited Numerical Precision", sec. 3;
Zamirai et al. 2020, "Revisiting BFloat16 Training").

bf16 is the upper 16 bits of a float32: adding uniform noise in [0, 2**16) to the lower 16 bits of the float32
bit pattern, then dropping them, rounds the magnitude up exactly with that probability. The noise comes from a
caller's generator, so a run with a fixed seed rounds the same way every time.
"""
from __future__ import annotations

import torch

#: The float32 bits a bf16 keeps (the sign, the exponent and 7 mantissa bits): 0xFFFF0000 as a signed int32.
_BF16_BITS = -(1 << 16)


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` (float32) as bfloat16, rounded to the next bf16 away from zero with probability (|x| - lower) /
    gap and towards zero otherwise; E[result] = x. Infinities and NaN are rounded to nearest (they stay what
    they are)."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 takes float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    # Sign-magnitude: adding to the bits grows the magnitude for either sign; a carry out of the mantissa
    # correctly moves to the next binade. Only NaN/inf patterns (exponent all ones) could wrap, so they are
    # taken from the nearest rounding instead.
    rounded = ((bits + noise) & _BF16_BITS).view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isfinite(x), rounded, x.to(torch.bfloat16))
