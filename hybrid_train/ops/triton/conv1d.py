"""Causal depthwise conv1d (+ SiLU) with document masking, forward and backward, in Triton.

out[t, c] = act(bias[c] + sum_i w[c, i] x[t - (K-1) + i, c]), a tap counted only when its token is in
the same document as t. Programs tile (batch, block of time, block of channels); channels are the
contiguous dim, so every load is a coalesced row segment.

Backward: ``_conv_bwd_pre_kernel`` recomputes the pre-activation, forms dpre = dout * act'(pre) (fp32,
written once) and the weight / bias partial sums of its time block; ``_conv_bwd_dx_kernel`` applies
the transposed taps to dpre. Partial sums are reduced in a fixed order: no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_pre(x_base, seq_base, w_ptr, b_ptr, t, vt, offs_c, mc, sx_l, sseq_l, C,
              K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Pre-activation for rows t (BT) and channels offs_c (BC), fp32."""
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    if HAS_SEQ:
        seq_t = tl.load(seq_base + t * sseq_l, mask=vt, other=-1)
    for i in tl.static_range(K):
        ts = t - (K - 1) + i
        ok = vt & (ts >= 0)
        if HAS_SEQ:
            if i < K - 1:
                ok = ok & (tl.load(seq_base + ts * sseq_l, mask=ok, other=-2) == seq_t)
        xv = tl.load(x_base + ts[:, None] * sx_l + offs_c[None, :], mask=ok[:, None] & mc[None, :], other=0.0)
        wv = tl.load(w_ptr + offs_c * K + i, mask=mc, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * wv[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, seq_ptr, out_ptr,
    L, C, sx_b, sx_l, sseq_b, sseq_l, so_b, so_l,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BT + tl.arange(0, BT)
    offs_c = tl.program_id(2) * BC + tl.arange(0, BC)
    vt = t < L
    mc = offs_c < C
    acc = _conv_pre(x_ptr + b * sx_b, seq_ptr + b * sseq_b, w_ptr, b_ptr, t, vt, offs_c, mc, sx_l, sseq_l, C,
                    K, HAS_BIAS, HAS_SEQ, BT, BC)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + b * so_b + t[:, None] * so_l + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=vt[:, None] & mc[None, :])


@triton.jit
def _conv_bwd_pre_kernel(
    x_ptr, w_ptr, b_ptr, seq_ptr, dout_ptr, dpre_ptr, dwp_ptr, dbp_ptr,
    L, C, NTB, sx_b, sx_l, sseq_b, sseq_l, sd_b, sd_l,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    t = tb.to(tl.int64) * BT + tl.arange(0, BT)
    offs_c = tl.program_id(2) * BC + tl.arange(0, BC)
    vt = t < L
    mc = offs_c < C
    m2 = vt[:, None] & mc[None, :]
    x_base = x_ptr + b * sx_b
    seq_base = seq_ptr + b * sseq_b
    g = tl.load(dout_ptr + b * sd_b + t[:, None] * sd_l + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
    if SILU:
        pre = _conv_pre(x_base, seq_base, w_ptr, b_ptr, t, vt, offs_c, mc, sx_l, sseq_l, C,
                        K, HAS_BIAS, HAS_SEQ, BT, BC)
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    tl.store(dpre_ptr + (b * L + t[:, None]) * C + offs_c[None, :], g, mask=m2)
    # partial weight / bias gradients of this (batch, time block)
    part = (b * NTB + tb) * C
    if HAS_BIAS:
        tl.store(dbp_ptr + part + offs_c, tl.sum(g, 0), mask=mc)
    if HAS_SEQ:
        seq_t = tl.load(seq_base + t * sseq_l, mask=vt, other=-1)
    for i in tl.static_range(K):
        ts = t - (K - 1) + i
        ok = vt & (ts >= 0)
        if HAS_SEQ:
            if i < K - 1:
                ok = ok & (tl.load(seq_base + ts * sseq_l, mask=ok, other=-2) == seq_t)
        xv = tl.load(x_base + ts[:, None] * sx_l + offs_c[None, :], mask=ok[:, None] & mc[None, :], other=0.0)
        tl.store(dwp_ptr + (part + offs_c) * K + i, tl.sum(g * xv.to(tl.float32), 0), mask=mc)


@triton.jit
def _conv_bwd_dx_kernel(
    dpre_ptr, w_ptr, seq_ptr, dx_ptr,
    L, C, sseq_b, sseq_l, sdx_b, sdx_l,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    # dx[s] = sum_i w[:, i] dpre[s + (K-1) - i], for output rows in the same document as s
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * BT + tl.arange(0, BT)
    offs_c = tl.program_id(2) * BC + tl.arange(0, BC)
    vs = s < L
    mc = offs_c < C
    seq_base = seq_ptr + b * sseq_b
    if HAS_SEQ:
        seq_s = tl.load(seq_base + s * sseq_l, mask=vs, other=-1)
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for i in tl.static_range(K):
        to = s + (K - 1) - i
        ok = vs & (to < L)
        if HAS_SEQ:
            if i < K - 1:
                ok = ok & (tl.load(seq_base + to * sseq_l, mask=ok, other=-2) == seq_s)
        gv = tl.load(dpre_ptr + (b * L + to[:, None]) * C + offs_c[None, :], mask=ok[:, None] & mc[None, :], other=0.0)
        wv = tl.load(w_ptr + offs_c * K + i, mask=mc, other=0.0).to(tl.float32)
        acc += gv * wv[None, :]
    tl.store(dx_ptr + b * sdx_b + s[:, None] * sdx_l + offs_c[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=vs[:, None] & mc[None, :])


_BT, _BC = 32, 128
_BWD_PRE = (256, 32, 4)  # (time rows, channels, warps) of a backward program: BENCHMARKS.md, kernels
_BWD_DX = (_BT, _BC, 4)


def _seq(seq_idx, x):
    return (seq_idx, seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (x, 0, 0)


def conv1d_fwd(x, weight, bias, seq_idx, silu):
    """x (b, l, c) with unit channel stride, weight (c, k) contiguous -> (b, l, c) in x's dtype."""
    b, l, c = x.shape
    k = weight.shape[1]
    out = torch.empty(b, l, c, device=x.device, dtype=x.dtype)
    seq, ss_b, ss_l = _seq(seq_idx, x)
    grid = (b, triton.cdiv(l, _BT), triton.cdiv(c, _BC))
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, seq, out,
        l, c, x.stride(0), x.stride(1), ss_b, ss_l, out.stride(0), out.stride(1),
        K=k, BT=_BT, BC=_BC, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=silu, num_warps=4,
    )
    return out


def conv1d_bwd(dout, x, weight, bias, seq_idx, silu):
    """Returns (dx, dweight (c, k), dbias or None)."""
    b, l, c = x.shape
    k = weight.shape[1]
    bt, bc, warps = _BWD_PRE
    ntb = triton.cdiv(l, bt)
    seq, ss_b, ss_l = _seq(seq_idx, x)
    dpre = torch.empty(b, l, c, device=x.device, dtype=torch.float32)
    dwp = torch.empty(b, ntb, c, k, device=x.device, dtype=torch.float32)
    dbp = torch.empty(b, ntb, c, device=x.device, dtype=torch.float32) if bias is not None else dwp
    _conv_bwd_pre_kernel[(b, ntb, triton.cdiv(c, bc))](
        x, weight, bias if bias is not None else weight, seq, dout, dpre, dwp, dbp,
        l, c, ntb, x.stride(0), x.stride(1), ss_b, ss_l, dout.stride(0), dout.stride(1),
        K=k, BT=bt, BC=bc, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=silu, num_warps=warps,
    )
    dx = torch.empty(b, l, c, device=x.device, dtype=x.dtype)
    bt, bc, warps = _BWD_DX
    _conv_bwd_dx_kernel[(b, triton.cdiv(l, bt), triton.cdiv(c, bc))](
        dpre, weight, seq, dx, l, c, ss_b, ss_l, dx.stride(0), dx.stride(1),
        K=k, BT=bt, BC=bc, HAS_SEQ=seq_idx is not None, num_warps=warps,
    )
    dw = dwp.sum((0, 1))
    db = dbp.sum((0, 1)) if bias is not None else None
    return dx, dw, db
