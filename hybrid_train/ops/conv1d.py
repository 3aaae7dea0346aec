"""Depthwise causal conv1d over (b, l, c) activations, with document masking for packed sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d"]


def causal_conv1d(
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
