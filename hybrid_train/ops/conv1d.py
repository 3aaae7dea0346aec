"""Depthwise causal conv1d over (b, l, c) activations, with document masking for packed sequences.

``causal_conv1d_torch`` is the reference and CPU path; ``causal_conv1d`` dispatches to the Triton
kernels (hybrid_train/ops/triton/conv1d.py), registered as custom ops (hybrid_train/ops/library.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hybrid_train.ops.dispatch import KERNEL_DTYPES, use_triton
from hybrid_train.ops.library import kernel_op

__all__ = ["causal_conv1d", "causal_conv1d_torch"]


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution; arguments and result as ``causal_conv1d_torch``.

    Runs the Triton kernels when hybrid_train.ops.dispatch says so (CUDA under ``auto``) and x is
    bf16/fp16/fp32; fp64 always runs the reference.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if x.dtype in KERNEL_DTYPES and use_triton(x, op="conv1d"):
        w = weight.squeeze(1) if weight.dim() == 3 else weight
        assert w.shape == (x.shape[-1], w.shape[-1]), "weight must be (c, k) or (c, 1, k)"
        xin = x if x.stride(-1) == 1 else x.contiguous()
        return _conv1d_op(xin, w.contiguous(), bias, seq_idx, activation == "silu")
    return causal_conv1d_torch(x, weight, bias, seq_idx, activation)


def _conv1d_fake(x, weight, bias, seq_idx, silu):
    return x.new_empty(x.shape)


def _conv1d_bwd_fake(dout, x, weight, bias, seq_idx, silu):
    return [x.new_empty(x.shape), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else x.new_empty(0)]


def _conv1d_setup(ctx, inputs, output):
    x, weight, bias, seq_idx, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx)
    ctx.silu = silu


def _conv1d_backward(ctx, dout):
    x, weight, bias, seq_idx = ctx.saved_tensors
    dx, dw, db = _conv1d_bwd_op(dout, x, weight, bias, seq_idx, ctx.silu)
    return dx, dw, (db if bias is not None else None), None, None


@kernel_op("hybrid_train::causal_conv1d_fwd", _conv1d_fake, _conv1d_setup, _conv1d_backward)
def _conv1d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               seq_idx: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    from hybrid_train.ops.triton.conv1d import conv1d_fwd

    return conv1d_fwd(x, weight, bias, seq_idx, silu)


@kernel_op("hybrid_train::causal_conv1d_bwd", _conv1d_bwd_fake)
def _conv1d_bwd_op(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   seq_idx: Optional[torch.Tensor], silu: bool) -> list[torch.Tensor]:
    from hybrid_train.ops.triton.conv1d import conv1d_bwd

    dx, dw, db = conv1d_bwd(dout if dout.stride(-1) == 1 else dout.contiguous(), x, weight, bias, seq_idx, silu)
    return [dx, dw.to(weight.dtype), db.to(bias.dtype) if db is not None else x.new_empty(0)]


def causal_conv1d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution: out[t] = bias + sum_i weight[:, i] * x[t - (k - 1) + i].

    Args:
        x: (b, l, c).
        weight: (c, k), or (c, 1, k) as stored by nn.Conv1d.
        bias: (c) or None.
        seq_idx: (b, l) document index; a tap reads an earlier token only when that token is in the
            same document as the output token (packed documents do not see each other).
        activation: None or "silu".

    Returns:
        (b, l, c) in x's dtype (computed in fp32, or fp64 for fp64 inputs).
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if weight.dim() == 3:
        weight = weight.squeeze(1)  # (c, 1, k) -> (c, k)
    b, l, c = x.shape
    k = weight.shape[-1]
    assert weight.shape == (c, k), "weight must be (c, k) or (c, 1, k)"
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32

    xp = F.pad(x.to(cdt), (0, 0, k - 1, 0))  # (b, l + k - 1, c): k - 1 zeros on the left
    w = weight.to(cdt)  # (c, k)
    if seq_idx is not None:
        # Left padding gets a document id no token has; its x is zero anyway.
        seqp = F.pad(seq_idx, (k - 1, 0), value=-1)  # (b, l + k - 1)
    out = None
    # One shifted view per tap: tap i reads the token k - 1 - i steps back.
    for i in range(k):
        term = xp[:, i : i + l] * w[:, i]  # (b, l, c)
        if seq_idx is not None and i < k - 1:
            term = term * (seqp[:, i : i + l] == seq_idx).unsqueeze(-1)  # (b, l, c)
        out = term if out is None else out + term
    if bias is not None:
        out = out + bias.to(cdt)
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)
