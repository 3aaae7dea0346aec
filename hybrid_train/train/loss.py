"""Language-modelling loss from the logits, outside the model: the path under tensor parallelism (and
train.loss_impl=logits). Otherwise the model's head computes the same loss fused (`LMHead`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross entropy (+ z_loss * mean logsumexp^2) in fp32.

    logits (b, t, v), labels (b, t). Returns (loss to optimize, cross entropy alone)."""
    logits = logits.float().flatten(0, 1)  # (b*t, v)
    ce = F.cross_entropy(logits, labels.flatten())
    if not z_loss:
        return ce, ce.detach()
    lse = torch.logsumexp(logits, dim=-1)
    return ce + z_loss * lse.pow(2).mean(), ce.detach()
