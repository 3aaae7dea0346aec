"""silu(gate) * up, the SwiGLU MLP's elementwise middle.

``silu_mul`` (gate and up as two tensors: the dense MLP) and ``silu_mul_packed`` (side by side in one:
the experts' one gate-and-up matmul) run the Triton kernels (hybrid_train/ops/triton/swiglu.py) in eager
mode: one kernel each way instead of PyTorch's two forward and three backward, and only gate and up kept
for backward (PyTorch also keeps the SiLU output: at 9B width and 4096 tokens 117 MB a block). While
traced (torch.compile, fake tensors) it stays in PyTorch ops, which inductor fuses itself; on DTensors
likewise. Under tensor parallelism the column-parallel gate and up projections hand it local tensors, so
each rank runs the kernel on its own columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from hybrid_train.ops.dispatch import KERNEL_DTYPES, use_triton
from hybrid_train.ops.library import is_tracing

__all__ = ["silu_mul", "silu_mul_packed", "silu_mul_packed_torch", "silu_mul_torch"]


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in fp32 and rounded once to the inputs' dtype (PyTorch's eager ops round
    the SiLU output first; inductor, like the kernel, does not)."""
    sharded = hasattr(gate, "to_local") or hasattr(up, "to_local")
    if (not sharded and not is_tracing((gate, up)) and gate.shape == up.shape and gate.dtype == up.dtype
            and gate.numel() and gate.dtype in KERNEL_DTYPES and use_triton(gate, up, op="swiglu")):
        return _SiluMul.apply(gate, up)
    return silu_mul_torch(gate, up)


def silu_mul_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The reference: PyTorch's own ops."""
    return F.silu(gate) * up


def silu_mul_packed(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h = [gate | up] along its last dim, as ``silu_mul``; its gradient comes back
    packed as h is, with no copy to assemble it."""
    if (not hasattr(h, "to_local") and not is_tracing((h,)) and h.shape[-1] % 2 == 0 and h.numel()
            and h.dtype in KERNEL_DTYPES and use_triton(h, op="swiglu")):
        return _SiluMulPacked.apply(h)
    return silu_mul_packed_torch(h)


def silu_mul_packed_torch(h: torch.Tensor) -> torch.Tensor:
    """The reference: PyTorch's own ops."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        from hybrid_train.ops.triton.swiglu import swiglu_fwd

        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    @once_differentiable  # (a second derivative raises instead of coming out as zero)
    def backward(ctx, dout):
        from hybrid_train.ops.triton.swiglu import swiglu_bwd

        gate, up = ctx.saved_tensors
        return swiglu_bwd(dout.contiguous(), gate, up)


class _SiluMulPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        from hybrid_train.ops.triton.swiglu import swiglu_packed_fwd

        h = h.contiguous()
        ctx.save_for_backward(h)
        return swiglu_packed_fwd(h)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        from hybrid_train.ops.triton.swiglu import swiglu_packed_bwd

        (h,) = ctx.saved_tensors
        return swiglu_packed_bwd(dout.contiguous(), h)
