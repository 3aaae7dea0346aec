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
def _grads(d, g, u):
    """(d gate, d up) of silu(g) * u, in fp32; d silu(g) / dg = s (1 + g (1 - s)) with s = sigmoid(g)."""
    s = tl.sigmoid(g)
    return d * u * s * (1.0 + g * (1.0 - s)), d * g * s


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dg, du = _grads(d, g, u)
    tl.store(dup_ptr + offs, du.to(dup_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + offs, dg.to(dgate_ptr.dtype.element_ty), mask=mask)


# The packed layout: program (row, column block), so no element needs a division to find its row.
@triton.jit
def _swiglu_packed_fwd_kernel(h_ptr, out_ptr, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    gate = h_ptr + row * 2 * hidden + cols
    g = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate + hidden, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_packed_bwd_kernel(dout_ptr, h_ptr, dh_ptr, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    at = row * 2 * hidden + cols
    d = tl.load(dout_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + at + hidden, mask=mask, other=0.0).to(tl.float32)
    dg, du = _grads(d, g, u)
    tl.store(dh_ptr + at + hidden, du.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + at, dg.to(dh_ptr.dtype.element_ty), mask=mask)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up contiguous, one shape and dtype: silu(gate) * up in their dtype."""
    out = torch.empty_like(gate)
    n = gate.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) in the inputs' dtype, from the product's gradient (contiguous, any float dtype)."""
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dout, gate, up, dgate, dup, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dgate, dup


def swiglu_packed_fwd(h: torch.Tensor) -> torch.Tensor:
    """h contiguous (..., 2 * hidden), gate then up along the last dim: silu(gate) * up (..., hidden)."""
    hidden = h.shape[-1] // 2
    out = h.new_empty(*h.shape[:-1], hidden)
    grid = (out.numel() // hidden, triton.cdiv(hidden, BLOCK))
    _swiglu_packed_fwd_kernel[grid](h, out, hidden, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def swiglu_packed_bwd(dout: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d h, packed as h, from the product's gradient (contiguous (..., hidden), any float dtype)."""
    dh = torch.empty_like(h)
    hidden = h.shape[-1] // 2
    grid = (dout.numel() // hidden, triton.cdiv(hidden, BLOCK))
    _swiglu_packed_bwd_kernel[grid](dout, h, dh, hidden, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dh
