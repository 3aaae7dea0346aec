"""Row kernels of the fused linear cross-entropy (hybrid_train/ops/cross_entropy.py).

The matmuls stay in cuBLAS; these kernels replace the elementwise passes over one vocabulary chunk
of logits (t, vc): one read for the forward statistics, one read and one write for the gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_stats_kernel(
    logits_ptr, labels_ptr, m_ptr, s_ptr, tgt_ptr,
    VC, v0, s_row,
    BLOCK: tl.constexpr,
):
    # One program per token row: fold this chunk into the running max m, sum of exp(x - m), and pick
    # the target logit if the label falls in [v0, v0 + VC).
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * s_row
    label = tl.load(labels_ptr + row)
    m_old = tl.load(m_ptr + row)
    mx = tl.full((BLOCK,), float("-inf"), tl.float32)
    for v in range(0, VC, BLOCK):
        cols = v + tl.arange(0, BLOCK)
        xv = tl.load(base + cols, mask=cols < VC, other=float("-inf")).to(tl.float32)
        mx = tl.maximum(mx, xv)
    m_new = tl.maximum(m_old, tl.max(mx, 0))
    acc = tl.zeros((BLOCK,), tl.float32)
    for v in range(0, VC, BLOCK):
        cols = v + tl.arange(0, BLOCK)
        xv = tl.load(base + cols, mask=cols < VC, other=float("-inf")).to(tl.float32)
        acc += tl.exp(xv - m_new)
    s_old = tl.load(s_ptr + row)
    tl.store(s_ptr + row, s_old * tl.exp(m_old - m_new) + tl.sum(acc, 0))
    tl.store(m_ptr + row, m_new)
    local = label - v0
    if (local >= 0) & (local < VC):
        tl.store(tgt_ptr + row, tl.load(base + local).to(tl.float32))


@triton.jit
def _ce_grad_kernel(
    logits_ptr, labels_ptr, lse_ptr, a_ptr, gt_ptr,
    VC, v0, s_row,
    BLOCK: tl.constexpr,
):
    # In place: logits -> a_t softmax(x)_v - gt_t [v == label_t], for one chunk of the vocabulary.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * s_row
    local = tl.load(labels_ptr + row) - v0
    lse = tl.load(lse_ptr + row)
    a = tl.load(a_ptr + row)
    gt = tl.load(gt_ptr + row)
    for v in range(0, VC, BLOCK):
        cols = v + tl.arange(0, BLOCK)
        mask = cols < VC
        xv = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(xv - lse) * a - tl.where(cols == local, gt, 0.0)
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def chunk_stats(logits: torch.Tensor, labels: torch.Tensor, v0: int, m, s, tgt) -> None:
    t, vc = logits.shape
    _ce_stats_kernel[(t,)](logits, labels, m, s, tgt, vc, v0, logits.stride(0), BLOCK=2048, num_warps=8)


def chunk_grad_(logits: torch.Tensor, labels: torch.Tensor, v0: int, lse, a, gt) -> None:
    t, vc = logits.shape
    _ce_grad_kernel[(t,)](logits, labels, lse, a, gt, vc, v0, logits.stride(0), BLOCK=2048, num_warps=8)
