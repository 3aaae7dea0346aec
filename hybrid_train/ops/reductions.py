"""Reductions over many tensors at once: the sum of squares behind the gradient norm.

``sum_squares_torch`` is the reference and CPU path (torch._foreach_norm, fp32 per tensor);
``sum_squares`` runs one Triton launch per dtype over every tensor (hybrid_train/ops/triton/sum_squares.py)
where the tensors are on CUDA.
"""

from __future__ import annotations

import torch

from hybrid_train.ops.dispatch import KERNEL_DTYPES, use_triton

__all__ = ["sum_squares", "sum_squares_torch"]


def sum_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ x² over every element of plain tensors of one device (any float dtypes), summed in fp32: a 0-dim
    float32 tensor on that device."""
    if (tensors and use_triton(*tensors, op="sum_squares")
            and all(t.is_contiguous() and t.dtype in KERNEL_DTYPES for t in tensors)):
        from hybrid_train.ops.triton.sum_squares import sum_squares as triton_sum_squares

        return triton_sum_squares(tensors)
    return sum_squares_torch(tensors)


def sum_squares_torch(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(())
    narrow = [t.dtype in (torch.bfloat16, torch.float16) for t in tensors]  # their norms taken in fp32
    norms = {}
    for is_narrow in (True, False):
        picked = [i for i, n in enumerate(narrow) if n == is_narrow]
        if picked:
            found = torch._foreach_norm([tensors[i] for i in picked], 2.0, dtype=torch.float32 if is_narrow else None)
            norms.update(zip(picked, found))
    # summed in the tensors' order, whatever their dtypes: the same gradients in bf16 or fp32 give the same norm
    return torch.stack([norms[i].float() for i in range(len(tensors))]).square().sum()
