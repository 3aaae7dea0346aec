"""Fused LM head + cross-entropy (+ z-loss), chunked over the vocabulary.

``lm_loss(hidden @ weight.T, labels, z_loss)`` without the (tokens x vocab) logits: at 8192 tokens
and a 128256 vocabulary those are 2.1 GB in bf16, 4.2 GB as fp32, and as much again for their
gradient. Here the vocabulary is walked in chunks:

- forward: per chunk, logits = hidden @ W_chunk^T (cuBLAS, in the weight dtype like the LM head
  itself), folded into a running max / sum-of-exp per token and the target logit; only the per-token
  log-sum-exp (fp32) is kept for backward;
- backward: per chunk, the logits are recomputed, turned in place into d loss / d logits, then
  dW_chunk = dlogits^T hidden (written straight into the weight gradient: no accumulation across
  chunks) and d hidden += dlogits W_chunk (fp32 accumulator, tokens x d).

Extra memory is one logits chunk (tokens x chunk in the weight dtype, plus fp32 temporaries of a chunk
on the PyTorch path) and the fp32 hidden-gradient accumulator; the price is one more
(tokens x vocab x d) matmul than an unfused head.

When the logits in the weight dtype take at most _KEEP_LOGITS_BYTES (2 GiB: 8192 tokens at a 128256
vocabulary in bf16), they are kept instead: the forward computes them in one matmul and saves them,
the backward turns them in place into d loss / d logits and takes dW and d hidden as one matmul each
(the hidden gradient accumulates in fp32 inside that matmul). Three head matmuls, as an unfused head,
for the bf16 logits held from forward to backward (the unfused head holds them in fp32, twice); the
PyTorch path still makes its fp32 temporaries one chunk at a time.

On CUDA the elementwise passes over a chunk are Triton row kernels
(hybrid_train/ops/triton/cross_entropy.py); elsewhere the same loop runs in PyTorch ops.
"""

from __future__ import annotations

import contextlib

import torch

from hybrid_train.ops.dispatch import use_triton

__all__ = ["fused_linear_cross_entropy"]

_CHUNK_BYTES = 256 * 2**20  # one fp32 logits chunk at most this large
_KEEP_LOGITS_BYTES = 2 * 2**30  # whole logits kept for backward up to this size (weight dtype)


def keeps_logits(tokens: int, vocab: int, element_size: int) -> bool:
    """Whether the fused loss keeps the whole logits for backward by default (at most _KEEP_LOGITS_BYTES)."""
    return tokens * vocab * element_size <= _KEEP_LOGITS_BYTES


def _vocab_chunk(tokens: int, vocab: int, chunk: int | None) -> int:
    if chunk is None:
        chunk = max(1024, _CHUNK_BYTES // (4 * max(tokens, 1)))
    return min(vocab, chunk)


def _stats_torch(logits, labels, v0, m, s, tgt):
    lf = logits.float()  # (t, vc)
    m_new = torch.maximum(m, lf.max(dim=1).values)
    s.mul_(torch.exp(m - m_new)).add_(torch.exp(lf - m_new[:, None]).sum(dim=1))
    m.copy_(m_new)
    local = labels - v0
    inside = (local >= 0) & (local < lf.shape[1])
    picked = lf.gather(1, local.clamp(0, lf.shape[1] - 1)[:, None])[:, 0]
    tgt.copy_(torch.where(inside, picked, tgt))


def _grad_torch_(logits, labels, v0, lse, a, gt):
    g = torch.exp(logits.float() - lse[:, None]) * a[:, None]  # (t, vc)
    local = labels - v0
    inside = (local >= 0) & (local < g.shape[1])
    rows = torch.nonzero(inside)[:, 0]
    g[rows, local[rows]] -= gt[rows]
    logits.copy_(g)


_MM_OUT_DTYPE: bool | None = None  # whether torch.mm(..., out_dtype=) runs on this build's CUDA


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result. The hidden gradient sums one such product per vocabulary chunk, and
    those partial sums cancel: rounding each to bf16 first cost ~1.7% error on the final norm's gradient
    (measured, 32 chunks), against 0.26% for an unfused head."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)  # fp32 accumulator written out unrounded
            _MM_OUT_DTYPE = True
            return out
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE = False
    return a.float() @ b.float()


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, z_loss, ignore_index, chunk, keep_logits):
        t = hidden.shape[0]
        vocab = weight.shape[0]
        triton_path = use_triton(hidden, weight, op="cross_entropy")
        if triton_path:
            from hybrid_train.ops.triton.cross_entropy import chunk_stats as stats
        else:
            stats = _stats_torch
        if keep_logits is None:
            keep_logits = chunk is None and keeps_logits(t, vocab, weight.element_size())
        vc = _vocab_chunk(t, vocab, chunk)
        # The row kernels read a whole kept row in one pass; the PyTorch ops make fp32 temporaries, so they
        # walk the kept logits in chunks of the same size as the recomputing path.
        pass_chunk = vocab if triton_path else vc
        dev = hidden.device
        m = torch.full((t,), float("-inf"), device=dev, dtype=torch.float32)
        s = torch.zeros(t, device=dev, dtype=torch.float32)
        tgt = torch.zeros(t, device=dev, dtype=torch.float32)
        if keep_logits:
            logits = hidden @ weight.T  # (t, vocab) in the weight dtype, one matmul
            for v0 in range(0, vocab, pass_chunk):
                stats(logits[:, v0 : v0 + pass_chunk], labels, v0, m, s, tgt)
        else:
            for v0 in range(0, vocab, vc):
                logits = hidden @ weight[v0 : v0 + vc].T  # (t, vc) in the weight dtype
                stats(logits, labels, v0, m, s, tgt)
        lse = m + torch.log(s)  # (t)
        valid = labels != ignore_index
        n_valid = valid.sum()
        ce = torch.where(valid, lse - tgt, 0.0).sum() / n_valid
        loss = ce + z_loss * lse.square().mean() if z_loss else ce
        kept = (logits,) if keep_logits else ()
        del logits
        ctx.save_for_backward(hidden, weight, labels, lse, valid, n_valid, *kept)
        ctx.z_loss, ctx.vc, ctx.pass_chunk, ctx.triton_path, ctx.kept = z_loss, vc, pass_chunk, triton_path, keep_logits
        ce = ce.detach()
        # An autograd.Function attaches every output to its node, detached or not; unmarked, ce would keep
        # the graph alive in whatever accumulates it (a running loss sum chained every step's graph).
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, g_loss, _g_ce):
        if ctx.kept == "used":  # the kept logits were overwritten by the first backward
            raise RuntimeError("fused_linear_cross_entropy kept its logits for one backward and they were "
                               "used; call it with keep_logits=False to backward through it twice")
        hidden, weight, labels, lse, valid, n_valid, *kept = ctx.saved_tensors
        t = hidden.shape[0]
        vocab = weight.shape[0]
        if ctx.triton_path:
            from hybrid_train.ops.triton.cross_entropy import chunk_grad_ as grad_
        else:
            grad_ = _grad_torch_
        # d loss / d logit_tv = a_t softmax_tv - gt_t [v == label_t]
        gt = g_loss * valid.float() / n_valid  # (t)
        a = gt + (g_loss * 2.0 * ctx.z_loss / t) * lse if ctx.z_loss else gt
        a = a.contiguous()
        gt = gt.contiguous()
        if kept:  # the whole logits, saved by forward: overwritten here, so there is no second backward
            ctx.kept = "used"
            (logits,) = kept
            for v0 in range(0, vocab, ctx.pass_chunk):  # now d loss / d logits, in place
                grad_(logits[:, v0 : v0 + ctx.pass_chunk], labels, v0, lse, a, gt)
            return logits @ weight, logits.T @ hidden, None, None, None, None, None
        dh = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
        dw = torch.empty_like(weight)
        for v0 in range(0, vocab, ctx.vc):
            w = weight[v0 : v0 + ctx.vc]
            logits = hidden @ w.T  # (t, vc), recomputed
            grad_(logits, labels, v0, lse, a, gt)  # now d loss / d logits
            torch.matmul(logits.T, hidden, out=dw[v0 : v0 + ctx.vc])
            dh += _matmul_fp32(logits, w)
            del logits
        return dh.to(hidden.dtype), dw, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    vocab_chunk: int | None = None,
    keep_logits: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross entropy of ``hidden @ weight.T`` (+ z_loss * mean logsumexp^2), fp32.

    Same value and gradients as ``lm_loss(hidden @ weight.T, labels, z_loss)`` of
    hybrid_train/train/loss.py: the cross entropy averages over tokens whose label is not
    ``ignore_index``; the z-loss term averages over all tokens, as there. Under autocast both
    operands are cast to the autocast dtype, as an ``nn.Linear`` head's would be.

    Args:
        hidden: (..., d) final hidden states (after the final norm), the LM head's input.
        weight: (vocab, d) LM head weight.
        labels: (...) int targets.
        vocab_chunk: vocabulary rows per chunk; default keeps one fp32 chunk of logits <= 256 MB.
        keep_logits: save the whole logits for backward (three head matmuls) instead of recomputing them
            chunk by chunk (four); None = when no vocab_chunk is given and they take at most 2 GiB in the
            weight dtype.

    Returns:
        (loss to optimize, cross entropy alone, detached), both fp32 scalars.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    assert y.shape[0] == h.shape[0], "labels must have one entry per hidden row"
    # Under autocast, as an unfused head: both operands in the autocast dtype. The function then runs with
    # autocast off, so that backward (which autocast never reaches) recomputes the very same logits.
    dtype, autocast = weight.dtype, contextlib.nullcontext()
    if torch.is_autocast_enabled(h.device.type):
        dtype, autocast = torch.get_autocast_dtype(h.device.type), torch.autocast(h.device.type, enabled=False)
    with autocast:
        return _FusedLinearCE.apply(h.to(dtype), weight.to(dtype), y, float(z_loss), int(ignore_index), vocab_chunk,
                                    keep_logits)
