"""Causal (grouped-query) attention with optional packed-document masking."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """q (b, hq, t, d), k/v (b, hkv, t, d) with hkv dividing hq -> (b, hq, t, d).

    With seq_idx (b, t), a token attends only to earlier tokens of its own document. On CUDA this
    runs FlexAttention with a block-sparse document mask (no dense (t, t) mask, and fully masked
    blocks are skipped); elsewhere SDPA with a dense boolean mask, which is fine at CPU sizes.
    """
    gqa = q.shape[1] != k.shape[1]
    if seq_idx is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if q.is_cuda:
        return _flex_document_attention(q, k, v, seq_idx, gqa)
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]  # (b, t, t)
    mask = (same_doc & causal)[:, None]  # (b, 1, t, t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention only generates a fused kernel when compiled.
    return torch.compile(flex_attention, dynamic=False)


def _flex_document_attention(q, k, v, seq_idx, gqa):
    from torch.nn.attention.flex_attention import create_block_mask

    b, _, t, _ = q.shape

    def document_causal(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (seq_idx[batch, q_idx] == seq_idx[batch, kv_idx])

    block_mask = create_block_mask(document_causal, B=b, H=None, Q_LEN=t, KV_LEN=t, device=q.device)
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
