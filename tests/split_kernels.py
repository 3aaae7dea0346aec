"""The Triton AdamW's split and join of fp32 masters run alone, to check them bit for bit against
hybrid_train/ops/fp32_halves.py (the PyTorch arithmetic the model's state dict uses) on every bf16 high
half with the low halves at the edges (ties, sign changes), NaN and inf included. Used by the CPU
interpreter cases and the GPU tests."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid_train.ops.fp32_halves import join_fp32, split_fp32
from hybrid_train.ops.triton.adamw import _join, _split


@triton.jit
def _split_join_kernel(bits_ptr, high_ptr, low_ptr, joined_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    high, low = _split(tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True))
    high = high.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    low = low.to(tl.uint16).to(tl.int16, bitcast=True)
    tl.store(high_ptr + offs, high, mask=mask)
    tl.store(low_ptr + offs, low, mask=mask)
    tl.store(joined_ptr + offs, _join(high, low), mask=mask)


def assert_kernel_halves_match_torch(device) -> None:
    highs = torch.arange(1 << 16, dtype=torch.int32) << 16
    lows = torch.tensor([0, 1, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF], dtype=torch.int32)
    bits = torch.cat([(highs[:, None] | lows[None, :]).flatten(),
                      torch.randint(-2 ** 31, 2 ** 31 - 1, (1 << 18,), dtype=torch.int32)]).to(device)
    high = torch.empty(bits.shape, dtype=torch.bfloat16, device=device)
    low = torch.empty(bits.shape, dtype=torch.int16, device=device)
    joined = torch.empty(bits.shape, dtype=torch.float32, device=device)
    _split_join_kernel[(triton.cdiv(bits.numel(), 4096),)](bits, high, low, joined, bits.numel(), BLOCK=4096)
    expected_high, expected_low = split_fp32(bits.view(torch.float32))
    assert torch.equal(high.view(torch.int16), expected_high.view(torch.int16))
    assert torch.equal(low, expected_low)
    assert torch.equal(joined.view(torch.int32), join_fp32(expected_high, expected_low).view(torch.int32))
    kept = joined.view(torch.int32) == bits  # and the join keeps the value but at ties that round down, and NaN
    tie_down = ((bits & 0xFFFF) == 0x8000) & ((bits >> 16) & 1 == 0)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    assert torch.all(kept | tie_down | nan) and not torch.any(kept & tie_down)
