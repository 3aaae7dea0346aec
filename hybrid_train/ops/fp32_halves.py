"""An fp32 tensor as two 16-bit halves: the bf16 value autocast would cast it to, and an int16 of the rest.

The one-GPU trainer keeps its fp32 masters this way (hybrid_train/train/precision.py); the Triton AdamW
does the same arithmetic in its kernel (`_split` / `_join` in hybrid_train/ops/triton/adamw.py), and the
tests check that the two agree bit for bit. No triton here: the trainer imports this on any platform.
"""

from __future__ import annotations

import torch

__all__ = ["split_fp32", "join_fp32"]


def split_fp32(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 high half, int16 low half) of fp32 `value`: the high half is `value` rounded to nearest even,
    as autocast's cast rounds it, the low half the difference as a signed int16. `join_fp32` restores
    `value` bit for bit, but for a value exactly halfway that rounds down: its difference, +2^15, is one
    more than int16 holds, so it keeps 2^15 - 1 and comes back one fp32 ulp toward zero (1 in 131,072
    values, 2^-24 relative: under the rounding of an fp32 update itself). NaN stays NaN (quieted)."""
    bits = value.detach().float().contiguous().view(torch.int32)
    # int32 arithmetic: for negative values the sign-extended shifts keep the same low 16 bits as the
    # kernel's unsigned ones, and int32 -> int16 keeps the low 16 bits
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    high = torch.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits >> 16) | 0x40, rounded)
    low = bits & 0xFFFF
    low = torch.where((low == 0x8000) & (high == bits >> 16), 0x7FFF, low)
    return high.to(torch.int16).view(torch.bfloat16), low.to(torch.int16)


def join_fp32(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The fp32 value of a split master (`split_fp32`), with 4 bytes an element of temporaries."""
    bits = high.detach().view(torch.int16).to(torch.int32).bitwise_left_shift_(16)
    return bits.add_(low).view(torch.float32)
