"""Gated RMSNorm of the Mamba-2 mixer output (mamba_ssm RMSNormGated, norm_before_gate=False)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gated_rms_norm"]


def gated_rms_norm(
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
