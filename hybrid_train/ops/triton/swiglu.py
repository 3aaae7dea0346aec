"""silu(gate) * up, forward and backward, in Triton: the SwiGLU MLP's elementwise middle.

One pass each way, computed in fp32 and rounded once: forward reads gate and up and writes the product;
backward reads the product's gradient, gate and up and writes both input gradients. Eagerly, PyTorch
takes two kernels forward (SiLU, then the product, keeping the SiLU output for backward) and three
backward. Two layouts: gate and up as two (tokens, hidden) tensors (the dense MLP's two projections), or
packed side by side in one (tokens, 2 * hidden) tensor (the experts' one gate-and-up matmul), whose
gradient is then written as one packed tensor too, what the matmul's backward reads (PyTorch's chunk
would assemble it with a copy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK, NUM_WARPS = 2048, 4


@triton.jit
def _inputs(offs, hidden, PACKED: tl.constexpr):
    """Where an output element's gate and up are: the same offset in two tensors, or row * 2 hidden + col
    and hidden further on in one packed tensor."""
    if PACKED:
        row = offs // hidden
        gate = offs + row * hidden
        return gate, gate + hidden
    return offs, offs


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, hidden, PACKED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gi, ui = _inputs(offs, hidden, PACKED)
    g = tl.load(gate_ptr + gi, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + ui, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, hidden, PACKED: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gi, ui = _inputs(offs, hidden, PACKED)
    d = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + gi, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + ui, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dup_ptr + ui, (d * g * s).to(dup_ptr.dtype.element_ty), mask=mask)
    # d silu(g) / dg = s (1 + g (1 - s))
    tl.store(dgate_ptr + gi, (d * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=mask)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up contiguous, one shape and dtype: silu(gate) * up in their dtype."""
    out = torch.empty_like(gate)
    n = gate.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, 1, PACKED=False, BLOCK=BLOCK,
                                                 num_warps=NUM_WARPS)
    return out


def swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) in the inputs' dtype, from the product's gradient (contiguous, any float dtype)."""
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dout, gate, up, dgate, dup, n, 1, PACKED=False, BLOCK=BLOCK,
                                                 num_warps=NUM_WARPS)
    return dgate, dup


def swiglu_packed_fwd(h: torch.Tensor) -> torch.Tensor:
    """h contiguous (..., 2 * hidden), gate then up along the last dim: silu(gate) * up (..., hidden)."""
    hidden = h.shape[-1] // 2
    out = h.new_empty(*h.shape[:-1], hidden)
    n = out.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](h, h, out, n, hidden, PACKED=True, BLOCK=BLOCK,
                                                 num_warps=NUM_WARPS)
    return out


def swiglu_packed_bwd(dout: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d h, packed as h, from the product's gradient (contiguous (..., hidden), any float dtype)."""
    dh = torch.empty_like(h)
    n = dout.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dout, h, h, dh, dh, n, h.shape[-1] // 2, PACKED=True,
                                                 BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dh
