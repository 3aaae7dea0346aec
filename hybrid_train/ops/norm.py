"""Gated RMSNorm of the Mamba-2 mixer output (mamba_ssm RMSNormGated, norm_before_gate=False), and
the plain RMSNorm of the blocks.

``gated_rms_norm_torch`` is the reference and CPU path; ``gated_rms_norm`` dispatches to the Triton
kernels (hybrid_train/ops/triton/norm.py), registered as custom ops (hybrid_train/ops/library.py).
``rms_norm`` runs the same kernels without a gate in eager mode; under torch.compile it stays in
PyTorch ops, which inductor fuses with the residual add around it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hybrid_train.ops.dispatch import KERNEL_DTYPES, use_triton
from hybrid_train.ops.library import kernel_op

__all__ = ["gated_rms_norm", "gated_rms_norm_torch", "rms_norm", "rms_norm_torch"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, autocast_output: bool = False) -> torch.Tensor:
    """weight * x / rms(x) over the last dim, computed in fp32; the result in x's dtype promoted with
    weight's (fp32 weight on bf16 activations gives fp32, as ``rms_norm_torch``). The kernel rounds once,
    at the end; the reference (and so a compiled run) rounds the normalized value to x's dtype before
    scaling, as transformers does: for bf16 activations the two differ by that rounding, for fp32 ones
    (the trainer's residual stream) by float order only.

    autocast_output: for a norm whose every reader casts its output to the autocast dtype (a block's
    Linears and experts): under autocast the kernel writes its fp32 result in that dtype (the values the
    casts give), one tensor the readers share, instead of a copy per reader, each kept for backward and
    its gradient cast back to fp32 and summed, a kernel apiece (at 9B width about 15 GB of memory traffic
    a step of 8 blocks). The readers' gradients are then summed by autograd in that dtype, as wherever
    the weights themselves are bf16 (FSDP's mixed precision). The PyTorch form (compiled blocks, where
    inductor fuses those casts; the CPU) keeps the fp32 result."""
    # A tensor-parallel norm runs on DTensors (sequence-sharded or replicated): those keep PyTorch ops.
    sharded = hasattr(x, "to_local") or hasattr(weight, "to_local")
    if (x.dtype in KERNEL_DTYPES and x.shape[-1] <= 65536 and not sharded and not torch.compiler.is_compiling()
            and use_triton(x, weight, op="rms_norm")):
        d = x.shape[-1]
        in_dtype = torch.promote_types(x.dtype, weight.dtype)
        out_dtype = None
        if autocast_output and in_dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        out, _ = _gated_norm_op(x.reshape(-1, d).to(in_dtype).contiguous(), None, weight.contiguous(), float(eps), d,
                                out_dtype)
        return out.view(x.shape)
    return rms_norm_torch(x, weight, eps)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference: normalized in fp32, rounded to x's dtype, then scaled by weight (as transformers'
    Bamba / Llama RMSNorm)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
) -> torch.Tensor:
    """rmsnorm(x * silu(z)) * weight per group; arguments and result as ``gated_rms_norm_torch``."""
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    if x.dtype in KERNEL_DTYPES and gs <= 65536 and use_triton(x, op="gated_norm"):
        assert d % gs == 0, "group_size must divide the last dim"
        x2 = x.reshape(-1, d).contiguous()
        z2 = z.reshape(-1, d).contiguous() if z is not None else None
        out, _ = _gated_norm_op(x2, z2, weight.contiguous(), float(eps), int(gs))
        return out.view(x.shape)
    return gated_rms_norm_torch(x, z, weight, eps, group_size)


def _gated_norm_fake(x, z, weight, eps, group_size, out_dtype=None):
    return (x.new_empty(x.shape, dtype=out_dtype or x.dtype),
            x.new_empty(x.shape[0], x.shape[1] // group_size, dtype=torch.float32))


def _gated_norm_bwd_fake(dout, x, z, weight, rstd, eps, group_size):
    return [x.new_empty(x.shape), x.new_empty(x.shape) if z is not None else x.new_empty(0), torch.empty_like(weight)]


def _gated_norm_setup(ctx, inputs, output):
    x, z, weight, eps, group_size = inputs[:5]
    ctx.save_for_backward(x, z, weight, output[1])
    ctx.eps, ctx.group_size = eps, group_size


def _gated_norm_backward(ctx, dout, _drstd):
    x, z, weight, rstd = ctx.saved_tensors
    dx, dz, dw = _gated_norm_bwd_op(dout, x, z, weight, rstd, ctx.eps, ctx.group_size)
    return dx, (dz if z is not None else None), dw, None, None, None


@kernel_op("hybrid_train::gated_rms_norm_fwd", _gated_norm_fake, _gated_norm_setup, _gated_norm_backward)
def _gated_norm_op(x: torch.Tensor, z: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                   group_size: int, out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (m, d) in out_dtype (None: x's), 1/rms (m, groups) fp32); the input gradients in the inputs' dtypes."""
    from hybrid_train.ops.triton.norm import gated_norm_fwd

    return gated_norm_fwd(x, z, weight, eps, group_size, out_dtype)


@kernel_op("hybrid_train::gated_rms_norm_bwd", _gated_norm_bwd_fake)
def _gated_norm_bwd_op(dout: torch.Tensor, x: torch.Tensor, z: Optional[torch.Tensor], weight: torch.Tensor,
                       rstd: torch.Tensor, eps: float, group_size: int) -> list[torch.Tensor]:
    from hybrid_train.ops.triton.norm import gated_norm_bwd

    dx, dz, dw = gated_norm_bwd(dout.contiguous(), x, z, weight, rstd, eps, group_size)
    return [dx, dz if dz is not None else x.new_empty(0), dw]


def gated_rms_norm_torch(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
) -> torch.Tensor:
    """rmsnorm(x * silu(z)) * weight, the RMS taken per group of ``group_size`` channels.

    Args:
        x: (..., d).
        z: (..., d) gate, or None for a plain (grouped) RMSNorm.
        weight: (d).
        group_size: channels per group along the last dim; None = the whole last dim. Per-group
            statistics keep the norm local to a tensor-parallel shard when groups are split.

    Returns:
        Same shape and dtype as x (computed in fp32, or fp64 for fp64 inputs).
    """
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    assert d % gs == 0, "group_size must divide the last dim"
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(cdt)
    if z is not None:
        h = h * F.silu(z.to(cdt))
    h = h.unflatten(-1, (d // gs, gs))  # (..., groups, gs)
    h = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps)  # (..., groups, gs)
    h = h.flatten(-2)  # (..., d)
    return (h * weight.to(cdt)).to(x.dtype)
