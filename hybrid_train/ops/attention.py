"""Causal (grouped-query) attention with optional packed-document masking."""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     seq_idx: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """q (b, hq, t, d), k/v (b, hkv, t, d) with hkv dividing hq -> (b, hq, t, d). Scores are scaled by
    `scale` (None: d**-0.5).

    With seq_idx (b, t), a token attends only to earlier tokens of its own document. On CUDA this
    runs FlexAttention with a block-sparse document mask (no dense (t, t) mask, and fully masked
    blocks are skipped); elsewhere SDPA with a dense boolean mask, which is fine at CPU sizes.
    """
    gqa = q.shape[1] != k.shape[1]
    if seq_idx is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)
    if q.is_cuda:
        return _flex_document_attention(q, k, v, seq_idx, gqa, scale)
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]  # (b, t, t)
    mask = (same_doc & causal)[:, None]  # (b, 1, t, t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention only generates a fused kernel when compiled.
    return torch.compile(flex_attention, dynamic=False)


# The block mask depends only on seq_idx, which every attention layer of a forward shares: build it
# once per seq_idx tensor (a weak reference, so a new batch never sees a stale mask).
_last_mask: tuple[weakref.ref, object] | None = None


def _document_block_mask(seq_idx: torch.Tensor):
    global _last_mask
    if _last_mask is not None and _last_mask[0]() is seq_idx:
        return _last_mask[1]
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = seq_idx.shape

    def document_causal(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (seq_idx[batch, q_idx] == seq_idx[batch, kv_idx])

    block_mask = create_block_mask(document_causal, B=b, H=None, Q_LEN=t, KV_LEN=t, device=seq_idx.device)
    _last_mask = (weakref.ref(seq_idx), block_mask)
    return block_mask


def _flex_document_attention(q, k, v, seq_idx, gqa, scale=None):
    block_mask = _document_block_mask(seq_idx)
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=gqa, scale=scale)
