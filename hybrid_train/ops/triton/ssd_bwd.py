"""SSD chunked scan, backward, in Triton.

Takes the forward's processed dt, its cumsum, the states entering each chunk and CB (saved:
recomputing them costs a sequential state pass, about 7% of forward+backward at Bamba's shape, and
a launch), then:

1. ``_state_bwd_kernel`` (per batch, head, block of p and n; chunks in reverse): dS_out of each
   chunk, the gradient of the chunk decay, and d initial_states.
   dS_in(c) = (dy o e)^T C + decay_c dS_out(c).
2. ``_dx_kernel`` (per batch, chunk, head, block of columns j): dx, dt's direct gradient
   x_j . d(dt_j x_j), the decay-to-end term W_j, T's column sums below the block (below) and dD.
3. ``_dcb_kernel`` (per batch, chunk, group, split of the group's heads, causal tile): dCB summed
   over the heads of the group, so dC += dCB B and dB += dCB^T C are one small matmul per group;
   and per head the tile sums of T (below) that the log-decay gradient needs. It forms
   dy_i . dt_j x_j per head anyway, so T costs it one product and a reduction along each tile's rows.
4. ``_dbc_state_kernel`` (per batch, chunk, group, head split, row block): the state parts of dB and
   dC, summed over heads, and the incoming-state term of the log-decay gradient.
5. ``_dt_bwd_kernel`` (per batch, chunk, head): assembles d(dt * A), then dt, A, dt_bias gradients.

Log-decay gradient, stable form. With T_ij = CB_ij L_ij (dy_i . dt_j x_j) the intra-chunk term
(L_ij = exp(acs_i - acs_j)), the gradient w.r.t. dA_k (= dt_k A) is the sum of T over the pairs
that straddle k: sum_{i >= k > j} T_ij. Summing those directly, rather than forming per-row and
per-column totals and differencing their cumsums, never subtracts large nearly equal numbers. Per
tile below the diagonal the dCB kernel writes T's row sums, per diagonal tile the pairs inside it;
the dx kernel, whose accumulator for column j already holds sum_{i below} CB_ij L_ij dy_i, writes
T's column sums over the row blocks below j's block (one product with dt_j x_j, reduced along p);
``_dt_bwd_kernel`` assembles each block of k from them (scans within the block only). The other
terms: the incoming state e_i = exp(acs_i) gives a reverse cumsum of e_i dy_i . (S_in C_i); the
decay to the chunk end w_j = exp(acs_Q - acs_j) gives sum_{j<k} W_j; the chunk decay exp(acs_Q)
gives a constant.

Factored decays. Between a row block I and a column block J strictly before it, every pair (i, j)
straddles r, the last row of J, so exp(acs_i - acs_j) = exp(acs_i - acs_r) exp(acs_r - acs_j), both
factors <= 1 (acs falls along the chunk: A < 0, dt >= 0). The dx and dCB kernels fold the factors
into their operands, so those tiles are plain matmuls with no per-element exp; the document mask
factors too, since seq_idx never decreases (seq_i == seq_j exactly when both equal seq_r). Only
the diagonal tiles keep the per-pair form.

No atomics anywhere: every cross-program sum goes through a partial buffer reduced in a fixed
order, so gradients are bitwise reproducible.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from hybrid_train.ops.dispatch import interpreting
from hybrid_train.ops.triton.common import LAUNCH, dot_dtype, dt_limit_args, launch, softplus
from hybrid_train.ops.triton.ssd_fwd import (_seq_args, add_state_block, check_chunk_offsets, contiguous_if_spread,
                                             ssd_blocks, state_blocks, state_program)


@triton.jit
def _state_bwd_kernel(
    dy_ptr, C_ptr, seq_ptr, acs_ptr, states_ptr, dfinal_ptr, dstates_ptr, ddec_ptr, dinit_ptr,
    L, H, P, N, R, NCHUNKS, NPB, NNB,
    sdy_b, sdy_l, sdy_h, sdy_p,
    sC_b, sC_l, sC_g, sC_n,
    sseq_b, sseq_l,
    CHUNK: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
):
    b, h, g, offs_p, offs_n = state_program(H, R, NPB, NNB, BP, BN)
    b64 = b.to(tl.int64)
    mp = offs_p < P
    mn = offs_n < N
    mpn = mp[:, None] & mn[None, :]
    pn = offs_p[:, None] * N + offs_n[None, :]
    if HAS_DFINAL:
        run = tl.load(dfinal_ptr + (b64 * H + h) * P * N + pn, mask=mpn, other=0.0)  # (BP, BN) fp32
    else:
        run = tl.zeros((BP, BN), dtype=tl.float32)
    seq_base = seq_ptr + b64 * sseq_b
    if HAS_SEQ:
        prev_seq = tl.load(seq_base)  # loop-carried: set at each chunk's first block
    dy_base = dy_ptr + b64 * sdy_b + h * sdy_h
    C_base = C_ptr + b64 * sC_b + g * sC_g
    # One flat loop over (chunk, K block), chunks in reverse, so that the pipeliner prefetches across
    # chunk boundaries. At each chunk's first block: run = dS_out(c) is stored, its decay-gradient
    # partial taken, and it is decayed over the chunk; the chunk's (dy o e)^T C then accumulates
    # straight into it, leaving dS_in(c) = dS_out(c - 1).
    NK: tl.constexpr = CHUNK // BK
    for it in range(NCHUNKS * NK):
        c = NCHUNKS - 1 - it // NK
        kk = it % NK
        t0 = c * CHUNK
        row = ((b64 * H + h) * NCHUNKS + c) * CHUNK
        if kk == 0:
            decay = tl.exp(tl.load(acs_ptr + row + CHUNK - 1))
            if HAS_SEQ:
                prev_seq = tl.load(seq_base + tl.maximum(t0 - 1, 0).to(tl.int64) * sseq_l)
                seq_last = tl.load(seq_base + (tl.minimum(t0 + CHUNK, L) - 1).to(tl.int64) * sseq_l)
                decay = tl.where(seq_last == prev_seq, decay, 0.0)
            bhc = (b64 * NCHUNKS + c) * H + h
            tl.store(dstates_ptr + bhc * P * N + pn, run.to(dstates_ptr.dtype.element_ty), mask=mpn)
            Sin = tl.load(states_ptr + bhc * P * N + pn, mask=mpn, other=0.0).to(tl.float32)
            # per-row sums only: the sum across warps stays off this serial path (the dt kernel adds them)
            tl.store(ddec_ptr + (bhc * NPB * NNB + tl.program_id(0) % (NPB * NNB)) * BP + tl.arange(0, BP),
                     tl.sum(run * Sin, 1) * decay)
            run = run * decay
        offs_k = kk * BK + tl.arange(0, BK)
        vk = offs_k < L - t0
        t64 = t0.to(tl.int64)
        e = tl.exp(tl.load(acs_ptr + row + offs_k))
        if HAS_SEQ:
            seq_k = tl.load(seq_base + t64 * sseq_l + offs_k * sseq_l, mask=vk, other=-1)
            e = tl.where(seq_k == prev_seq, e, 0.0)
        run = add_state_block(run, dy_base + t64 * sdy_l, sdy_l, sdy_p, C_base + t64 * sC_l, sC_l, sC_n, offs_k, vk, e,
                              offs_p, offs_n, mp, mn, DOT)
    tl.store(dinit_ptr + (b64 * H + h) * P * N + pn, run, mask=mpn)


@triton.jit
def _dx_kernel(
    x_ptr, dy_ptr, B_ptr, D_ptr, seq_ptr, dtp_ptr, acs_ptr, cb_ptr, dstates_ptr,
    dx_ptr, ddtp_ptr, W_ptr, below_ptr, dDp_ptr,
    L, H, P, N, R, G, NCHUNKS,
    sx_b, sx_l, sx_h, sx_p,
    sdy_b, sdy_l, sdy_h, sdy_p,
    sB_b, sB_l, sB_g, sB_n,
    sseq_b, sseq_l,
    sdx_b, sdx_l, sdx_h, sdx_p,
    CHUNK: tl.constexpr, BLK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_D: tl.constexpr, D_HP: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
):
    # One program: one head, one chunk, one block of columns j (the sources).
    NBLK: tl.constexpr = CHUNK // BLK
    # 1-D grid, column blocks fastest: the blocks of one chunk and head share dy and dS in L2
    pid = tl.program_id(0) // NBLK  # ((b * NCHUNKS) + c) * H + h
    jb = tl.program_id(0) % NBLK
    h = pid % H
    c = (pid // H) % NCHUNKS
    b = pid // (H * NCHUNKS)
    g = h // R
    b64 = b.to(tl.int64)
    bhc = (b64 * NCHUNKS + c) * H + h
    t0 = c * CHUNK
    t64 = t0.to(tl.int64)
    rem = L - t0  # rows of this chunk inside the sequence
    offs_j = jb * BLK + tl.arange(0, BLK)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    vj = offs_j < rem
    mp = offs_p < P
    mn = offs_n < N
    mjp = vj[:, None] & mp[None, :]
    row = ((b64 * H + h) * NCHUNKS + c) * CHUNK
    acs_j = tl.load(acs_ptr + row + offs_j)
    dt_j = tl.load(dtp_ptr + row + offs_j)
    total = tl.load(acs_ptr + row + CHUNK - 1)
    # chunk-start pointers (64-bit); offsets inside the chunk are 32-bit (the launch checks the strides)
    seq_base = seq_ptr + b64 * sseq_b + t64 * sseq_l
    x_base = x_ptr + b64 * sx_b + h * sx_h + t64 * sx_l
    dy_base = dy_ptr + b64 * sdy_b + h * sdy_h + t64 * sdy_l
    # Rows wholly below the block (i > r >= j, r = the block's last row) factor through acs_r:
    # exp(acs_i - acs_j) = exp(acs_i - acs_r) exp(acs_r - acs_j), so do the state part's
    # decay to the chunk end and (seq_idx never decreasing) the document masks. The column factor v_j
    # scales the accumulator once; the row factor goes into dy; those tiles are plain matmuls on CB.
    r_pos = jb * BLK + BLK - 1
    ref = tl.load(acs_ptr + row + r_pos)
    v = tl.exp(ref - acs_j)
    to_end = tl.exp(total - ref)
    if HAS_SEQ:
        seq_j = tl.load(seq_base + offs_j * sseq_l, mask=vj, other=-1)
        seq_r = tl.load(seq_base + tl.minimum(r_pos, rem - 1) * sseq_l)
        seq_last = tl.load(seq_base + (tl.minimum(CHUNK, rem) - 1) * sseq_l)
        v = tl.where(seq_j == seq_r, v, 0.0)
        to_end = tl.where(seq_r == seq_last, to_end, 0.0)

    xj = tl.load(x_base + offs_j[:, None] * sx_l + offs_p[None, :] * sx_p, mask=mjp, other=0.0).to(tl.float32)
    Bj = tl.load(B_ptr + b64 * sB_b + g * sB_g + t64 * sB_l + offs_j[:, None] * sB_l + offs_n[None, :] * sB_n,
                 mask=vj[:, None] & mn[None, :], other=0.0)  # (BLK, BN)
    dSoT = tl.load(dstates_ptr + bhc * P * N + offs_n[:, None] + offs_p[None, :] * N,
                   mask=mn[:, None] & mp[None, :], other=0.0)  # (BN, BP)
    xdt = xj * dt_j[:, None]

    acc = tl.zeros((BLK, BP), dtype=tl.float32)
    cb_base = cb_ptr + (((b64 * NCHUNKS + c) * G + g) * CHUNK) * CHUNK
    for ib in range(jb + 1, NBLK):  # row blocks strictly below
        offs_i = ib * BLK + tl.arange(0, BLK)
        vi = offs_i < rem
        u = tl.exp(tl.load(acs_ptr + row + offs_i) - ref)
        if HAS_SEQ:
            seq_i = tl.load(seq_base + offs_i * sseq_l, mask=vi, other=-2)
            u = tl.where(seq_i == seq_r, u, 0.0)
        dyi = tl.load(dy_base + offs_i[:, None] * sdy_l + offs_p[None, :] * sdy_p,
                      mask=vi[:, None] & mp[None, :], other=0.0)  # (BLK_i, BP)
        cbT = tl.load(cb_base + offs_i[None, :] * CHUNK + offs_j[:, None])  # (BLK_j, BLK_i) = CB[i, j]
        acc += tl.dot(cbT.to(DOT), (dyi.to(tl.float32) * u[:, None]).to(DOT))
    acc = acc * v[:, None]
    # T's column sums over the rows below the block, for the log-decay gradient:
    # sum_{i below} T_ij = xdt_j . sum_{i below} CB_ij L_ij dy_i = xdt_j . acc_j
    tl.store(below_ptr + row + offs_j, tl.sum(acc * xdt, 1))

    # State part: d(dt_j x_j) += w_j dS_out B_j, w_j = exp(total - acs_j) = v_j to_end
    st = tl.dot(Bj.to(DOT), dSoT.to(DOT)) * (v * to_end)[:, None]  # (BLK, BP)
    Wv = tl.sum(st * xdt, 1)  # W_j = w_j xdt_j . (dS_out B_j)
    acc += st

    # Diagonal block (i and j both in J).
    dyj = tl.load(dy_base + offs_j[:, None] * sdy_l + offs_p[None, :] * sdy_p, mask=mjp, other=0.0)
    cbT = tl.load(cb_base + offs_j[None, :] * CHUNK + offs_j[:, None])  # [j, i] = CB[i, j]
    mask = offs_j[None, :] >= offs_j[:, None]  # i >= j
    if HAS_SEQ:
        mask = mask & (seq_j[None, :] == seq_j[:, None])
    sT = cbT * tl.exp(tl.where(mask, acs_j[None, :] - acs_j[:, None], float("-inf")))
    acc += tl.dot(sT.to(DOT), dyj.to(DOT))

    # acc = d(dt_j x_j)
    dx = acc * dt_j[:, None]
    if HAS_D:
        dyf = dyj.to(tl.float32)
        if D_HP:
            Dv = tl.load(D_ptr + h * P + offs_p, mask=mp, other=0.0).to(tl.float32)
            dx += dyf * Dv[None, :]
            tl.store(dDp_ptr + (bhc * NBLK + jb) * P + offs_p, tl.sum(dyf * xj, 0), mask=mp)
        else:
            dx += dyf * tl.load(D_ptr + h).to(tl.float32)
            tl.store(dDp_ptr + bhc * NBLK + jb, tl.sum(tl.sum(dyf * xj, 1), 0))
    tl.store(dx_ptr + b64 * sdx_b + h * sdx_h + t64 * sdx_l + offs_j[:, None] * sdx_l + offs_p[None, :] * sdx_p,
             dx.to(dx_ptr.dtype.element_ty), mask=mjp)
    tl.store(ddtp_ptr + row + offs_j, tl.sum(acc * xj, 1))
    tl.store(W_ptr + row + offs_j, Wv)


@triton.jit
def _dcb_kernel(
    x_ptr, dy_ptr, seq_ptr, dtp_ptr, acs_ptr, cb_ptr, dcb_ptr, tiles_ptr,
    L, H, P, R, G, NCHUNKS, HPS, NSPLIT,
    sx_b, sx_l, sx_h, sx_p,
    sdy_b, sdy_l, sdy_h, sdy_p,
    sseq_b, sseq_l,
    CHUNK: tl.constexpr, BLK: tl.constexpr, BP: tl.constexpr,
    HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
):
    # One program: one causal tile (rows I, columns J) of one chunk and group, a split of its heads:
    # dCB_ij = sum_h L_ij (dy_i . dt_j x_j).
    # 1-D grid, tiles fastest: the tiles of one chunk and head split share dy and x in L2
    NB: tl.constexpr = CHUNK // BLK
    pid = tl.program_id(0) // (NB * NB)  # (((b * NCHUNKS) + c) * G + g) * NSPLIT + s
    ib = (tl.program_id(0) // NB) % NB
    jb = tl.program_id(0) % NB
    s = pid % NSPLIT
    bcg = pid // NSPLIT
    g = bcg % G
    c = (bcg // G) % NCHUNKS
    b = bcg // (G * NCHUNKS)
    b64 = b.to(tl.int64)
    offs_i = ib * BLK + tl.arange(0, BLK)
    offs_j = jb * BLK + tl.arange(0, BLK)
    # dcb: (NSPLIT, b, c, g, Q, Q); tiles above the diagonal are zeros (the matmuls read them)
    out = dcb_ptr + ((s.to(tl.int64) * (tl.num_programs(0) // (NB * NB * NSPLIT)) + bcg) * CHUNK) * CHUNK \
        + offs_i[:, None] * CHUNK + offs_j[None, :]
    if jb > ib:
        tl.store(out, tl.zeros((BLK, BLK), dtype=tl.float32))
        return
    t0 = c * CHUNK
    t64 = t0.to(tl.int64)
    rem = L - t0
    vi = offs_i < rem
    vj = offs_j < rem
    offs_p = tl.arange(0, BP)
    mp = offs_p < P
    # Off-diagonal tiles (i > r >= j, r = the last row of block J) factor the decay through acs_r as
    # in the dx kernel: both factors go into the operands and the tile is one plain matmul.
    r_pos = jb * BLK + BLK - 1
    mask = offs_j[None, :] <= offs_i[:, None]
    if HAS_SEQ:
        seq_base = seq_ptr + b64 * sseq_b + t64 * sseq_l
        seq_i = tl.load(seq_base + offs_i * sseq_l, mask=vi, other=-1)
        seq_j = tl.load(seq_base + offs_j * sseq_l, mask=vj, other=-2)
        seq_r = tl.load(seq_base + tl.minimum(r_pos, rem - 1) * sseq_l)
        mask = mask & (seq_i[:, None] == seq_j[None, :])
    acc = tl.zeros((BLK, BLK), dtype=tl.float32)
    cb = tl.load(cb_ptr + (bcg.to(tl.int64) * CHUNK + offs_i[:, None]) * CHUNK + offs_j[None, :]).to(tl.float32)
    offs_t = tl.arange(0, BLK)
    r0 = s * HPS
    r1 = tl.minimum(r0 + HPS, R)
    for r in range(r0, r1):
        h = g * R + r
        row = ((b64 * H + h) * NCHUNKS + c) * CHUNK
        acs_i = tl.load(acs_ptr + row + offs_i)
        acs_j = tl.load(acs_ptr + row + offs_j)
        dt_j = tl.load(dtp_ptr + row + offs_j)
        dyi = tl.load(dy_ptr + b64 * sdy_b + h * sdy_h + t64 * sdy_l
                      + offs_i[:, None] * sdy_l + offs_p[None, :] * sdy_p,
                      mask=vi[:, None] & mp[None, :], other=0.0)  # (BLK, BP)
        xj = tl.load(x_ptr + b64 * sx_b + h * sx_h + t64 * sx_l + offs_j[:, None] * sx_l + offs_p[None, :] * sx_p,
                     mask=vj[:, None] & mp[None, :], other=0.0)  # (BLK, BP)
        # GL_ij = L_ij (dy_i . dt_j x_j)
        tile = tiles_ptr + ((((b64 * NCHUNKS + c) * H + h) * NB + ib) * NB + jb) * BLK
        if ib == jb:
            xdt = (xj.to(tl.float32) * dt_j[:, None]).to(DOT)
            GL = tl.dot(dyi.to(DOT), tl.trans(xdt))
            GL = GL * tl.exp(tl.where(mask, acs_i[:, None] - acs_j[None, :], float("-inf")))
        else:
            ref = tl.load(acs_ptr + row + r_pos)
            u = tl.exp(acs_i - ref)
            v = tl.exp(ref - acs_j) * dt_j
            if HAS_SEQ:
                u = tl.where(seq_i == seq_r, u, 0.0)
                v = tl.where(seq_j == seq_r, v, 0.0)
            GL = tl.dot((dyi.to(tl.float32) * u[:, None]).to(DOT), tl.trans((xj.to(tl.float32) * v[:, None]).to(DOT)))
        acc += GL
        # T_ij = CB_ij L_ij (dy_i . dt_j x_j): what the decay gradient sums over the pairs straddling
        # each k (see _dt_bwd_kernel). Per head and tile: below the diagonal its row sums (the
        # column sums come from the dx kernel), on it the pairs inside the tile: sum_{i >= k > j} T_ij
        # for k in the block.
        T = cb * GL
        if ib == jb:
            before = tl.cumsum(T, 1) - T  # [i, k] = sum_{j < k} T_ij
            tl.store(tile + offs_t, tl.sum(tl.where(offs_i[:, None] >= offs_j[None, :], before, 0.0), 0))
        else:
            tl.store(tile + offs_t, tl.sum(T, 1))  # over j: per row i
    tl.store(out, acc)


@triton.jit
def _dbc_state_kernel(
    x_ptr, dy_ptr, C_ptr, seq_ptr, dtp_ptr, acs_ptr, states_ptr, dstates_ptr,
    dCp_ptr, dBp_ptr, dacs_ptr,
    BATCH, L, H, P, N, R, G, NCHUNKS, HPS, NSPLIT,
    sx_b, sx_l, sx_h, sx_p,
    sdy_b, sdy_l, sdy_h, sdy_p,
    sC_b, sC_l, sC_g, sC_n,
    sseq_b, sseq_l,
    CHUNK: tl.constexpr, BLK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
):
    # 1-D grid, row blocks fastest: the row blocks of one chunk share its states S_in and dS_out in L2
    NBLK: tl.constexpr = CHUNK // BLK
    pid = tl.program_id(0) // NBLK  # (((b * NCHUNKS) + c) * G + g) * NSPLIT + s
    ib = tl.program_id(0) % NBLK
    s = pid % NSPLIT
    bcg = pid // NSPLIT
    g = bcg % G
    c = (bcg // G) % NCHUNKS
    b = bcg // (G * NCHUNKS)
    b64 = b.to(tl.int64)
    t0 = c * CHUNK
    t64 = t0.to(tl.int64)
    offs_i = ib * BLK + tl.arange(0, BLK)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    vi = offs_i < L - t0
    mp = offs_p < P
    mn = offs_n < N
    mip = vi[:, None] & mp[None, :]
    Ci = tl.load(C_ptr + b64 * sC_b + g * sC_g + t64 * sC_l + offs_i[:, None] * sC_l + offs_n[None, :] * sC_n,
                 mask=vi[:, None] & mn[None, :], other=0.0).to(tl.float32)  # (BLK, BN)
    if HAS_SEQ:
        seq_base = seq_ptr + b64 * sseq_b + t64 * sseq_l
        seq_i = tl.load(seq_base + offs_i * sseq_l, mask=vi, other=-1)
        prev_seq = tl.load(seq_ptr + b64 * sseq_b + tl.maximum(t64 - 1, 0) * sseq_l)
        seq_last = tl.load(seq_base + (tl.minimum(CHUNK, L - t0) - 1) * sseq_l)
    accC = tl.zeros((BLK, BN), dtype=tl.float32)
    accB = tl.zeros((BLK, BN), dtype=tl.float32)
    pn = offs_p[:, None] * N + offs_n[None, :]
    mpn = mp[:, None] & mn[None, :]
    r0 = s * HPS
    r1 = tl.minimum(r0 + HPS, R)
    for r in range(r0, r1):
        h = g * R + r
        row = ((b64 * H + h) * NCHUNKS + c) * CHUNK
        bhc = (b64 * NCHUNKS + c) * H + h
        acs_i = tl.load(acs_ptr + row + offs_i)
        dt_i = tl.load(dtp_ptr + row + offs_i)
        total = tl.load(acs_ptr + row + CHUNK - 1)
        dyi = tl.load(dy_ptr + b64 * sdy_b + h * sdy_h + t64 * sdy_l
                      + offs_i[:, None] * sdy_l + offs_p[None, :] * sdy_p,
                      mask=mip, other=0.0)  # (BLK, BP)
        xi = tl.load(x_ptr + b64 * sx_b + h * sx_h + t64 * sx_l + offs_i[:, None] * sx_l + offs_p[None, :] * sx_p,
                     mask=mip, other=0.0).to(tl.float32)
        Sin = tl.load(states_ptr + bhc * P * N + pn, mask=mpn, other=0.0)  # (BP, BN)
        dSo = tl.load(dstates_ptr + bhc * P * N + pn, mask=mpn, other=0.0)
        e = tl.exp(acs_i)
        w = tl.exp(total - acs_i) * dt_i
        if HAS_SEQ:
            e = tl.where(seq_i == prev_seq, e, 0.0)
            w = tl.where(seq_i == seq_last, w, 0.0)
        tmp = tl.dot(dyi.to(DOT), Sin.to(DOT))  # (BLK, BN): S_in^T dy_i
        accC += tmp * e[:, None]
        tl.store(dacs_ptr + row + offs_i, e * tl.sum(tmp * Ci, 1))
        accB += tl.dot((xi * w[:, None]).to(DOT), dSo.to(DOT))
    # (NSPLIT, b, c*Q, g, n) partials
    off = ((s.to(tl.int64) * BATCH + b) * NCHUNKS * CHUNK + c * CHUNK + offs_i)[:, None] * (G * N) \
        + g * N + offs_n[None, :]
    tl.store(dCp_ptr + off, accC, mask=mn[None, :])
    tl.store(dBp_ptr + off, accB, mask=mn[None, :])


@triton.jit
def _dt_bwd_kernel(
    dt_ptr, A_ptr, dtb_ptr, acs_ptr, dtp_ptr, ddtp_ptr, W_ptr, dacs_ptr, tiles_ptr, below_ptr, cross_ptr,
    ddec_ptr,
    ddt_ptr, dAp_ptr, dbp_ptr,
    L, H, NCHUNKS, N_STATE_BLOCKS, lo, hi,
    sdt_b, sdt_l, sdt_h,
    sddt_b, sddt_l, sddt_h,
    CHUNK: tl.constexpr, BLK: tl.constexpr, DDEC_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
):
    NBLK: tl.constexpr = CHUNK // BLK
    pid = tl.program_id(0)  # ((b * NCHUNKS) + c) * H + h
    h = pid % H
    c = (pid // H) % NCHUNKS
    b = pid // (H * NCHUNKS)
    b64 = b.to(tl.int64)
    bhc = pid.to(tl.int64)
    offs = tl.arange(0, CHUNK)
    t = c.to(tl.int64) * CHUNK + offs
    valid = t < L
    row = ((b64 * H + h) * NCHUNKS + c) * CHUNK
    # cross_k = sum_{i >= k > j} T_ij from the dCB kernel's per-tile sums, block by block (each block's
    # scans over its own entries only: no difference of large partial sums), through a scratch row.
    offs_b = tl.arange(0, BLK)
    tbase = tiles_ptr + bhc * (NBLK * NBLK * BLK)
    for kb in tl.static_range(NBLK):
        part = tl.load(tbase + (kb * NBLK + kb) * BLK + offs_b)  # i and j in block kb
        rows = tl.zeros((BLK,), dtype=tl.float32)  # i in kb, j in earlier blocks: per row i
        for jb in tl.static_range(kb):
            rows += tl.load(tbase + (kb * NBLK + jb) * BLK + offs_b)
        cols = tl.load(below_ptr + row + kb * BLK + offs_b)  # i in later blocks, j in kb: per column j
        far = tl.zeros((BLK,), dtype=tl.float32)  # i in later blocks, j in earlier blocks
        for ib in tl.static_range(kb + 1, NBLK):
            for jb in tl.static_range(kb):
                far += tl.load(tbase + (ib * NBLK + jb) * BLK + offs_b)
        part += tl.cumsum(rows, 0, reverse=True) + (tl.cumsum(cols, 0) - cols) + tl.sum(far, 0)
        tl.store(cross_ptr + row + kb * BLK + offs_b, part)
    tl.debug_barrier()  # the row is read back whole by other threads of this program
    cross = tl.load(cross_ptr + row + offs)
    ddec = 0.0
    for sb in range(N_STATE_BLOCKS):  # the state-backward programs' partials, per row of their p block
        ddec += tl.sum(tl.load(ddec_ptr + (bhc * N_STATE_BLOCKS + sb) * DDEC_ROWS + tl.arange(0, DDEC_ROWS)), 0)
    dacs = tl.load(dacs_ptr + row + offs)
    Wv = tl.load(W_ptr + row + offs)
    ddA = cross + tl.cumsum(dacs, 0, reverse=True) + (tl.cumsum(Wv, 0) - Wv) + ddec  # d(dt_k A)
    A = tl.load(A_ptr + h).to(tl.float32)
    dtv = tl.load(dtp_ptr + row + offs)
    tl.store(dAp_ptr + bhc, tl.sum(dtv * ddA, 0))
    ddt = tl.load(ddtp_ptr + row + offs) + A * ddA
    # back through clamp, softplus and bias
    v = tl.load(dt_ptr + b64 * sdt_b + h * sdt_h + t * sdt_l, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v = v + tl.load(dtb_ptr + h).to(tl.float32)
    if HAS_LIMIT:
        sp = v
        if SOFTPLUS:
            sp = softplus(v)
        ddt = tl.where((sp >= lo) & (sp <= hi), ddt, 0.0)
    if SOFTPLUS:
        ddt = ddt * tl.where(v > 20.0, 1.0, tl.sigmoid(v))
    ddt = tl.where(valid, ddt, 0.0)
    tl.store(ddt_ptr + b64 * sddt_b + h * sddt_h + t * sddt_l, ddt.to(ddt_ptr.dtype.element_ty), mask=valid)
    tl.store(dbp_ptr + bhc, tl.sum(ddt, 0))


@contextlib.contextmanager
def _tf32_for(dtype: torch.dtype):
    """TF32 matmuls for 16-bit inputs, whatever the user's setting: their B and C are exact in TF32, and
    dCB's rounding (2^-11 relative) is at or below the 16-bit rounding of the gradients themselves;
    fp32 inputs keep full precision. torch has no per-call switch: the process-wide one is set here
    and restored on exit."""
    if dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9's precision API; reading the legacy flag after it was used raises
    new_api = hasattr(matmul, "fp32_precision")
    attr = "fp32_precision" if new_api else "allow_tf32"
    prev = getattr(matmul, attr)
    setattr(matmul, attr, "tf32" if new_api else True)
    try:
        yield
    finally:
        setattr(matmul, attr, prev)


def _head_split(groups_programs: int, heads_per_group: int, target: int) -> tuple[int, int]:
    """(heads per split, splits): about ``target`` programs, few partial buffers to sum.

    Under the interpreter: two splits where there are two heads, so the partial sums are exercised.
    """
    if interpreting():
        splits = min(2, heads_per_group)
    else:
        splits = max(1, min(heads_per_group, triton.cdiv(target, max(1, groups_programs))))
    hps = triton.cdiv(heads_per_group, splits)
    return hps, triton.cdiv(heads_per_group, hps)


def ssd_bwd(dout, x, dt, A, B, C, chunk, D, z, dt_bias, dt_softplus, dt_limit, seq_idx,
            initial_states, ypre, dfinal, chunk_states):
    """Gradients (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit); None for absent inputs.

    chunk_states: (dtp, acs, states, cb) from the forward (``ssd_fwd``'s last output).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    R = h // g
    nc = triton.cdiv(l, chunk)
    BLK, BP, BN = ssd_blocks(chunk, p, n)
    nblk = chunk // BLK
    dev = x.device
    f32 = torch.float32
    DOT = dot_dtype(x.dtype)
    lo, hi, has_limit = dt_limit_args(dt_limit)

    dz = None
    if z is not None:
        # the z gate: out = ypre * silu(z)
        zf, gof = z.float(), dout.float()
        sig = torch.sigmoid(zf)
        dz = (gof * ypre.float() * sig * (1 + zf * (1 - sig))).to(z.dtype)
        dy = (gof * zf * sig).to(x.dtype)
    else:
        dy = dout
    dy = contiguous_if_spread(dy, chunk)  # autograd's gradient may come as any view
    check_chunk_offsets(chunk, dy=dy)

    dtp, acs, states, cb = chunk_states
    seq, ss_b, ss_l = _seq_args(seq_idx, x)

    # 1. reverse state passing
    bp, bn = state_blocks(BP, BN, "state_bwd_blocks")
    n_state_blocks = triton.cdiv(p, bp) * triton.cdiv(n, bn)  # partial sums of the chunk-decay gradient
    dstates = torch.empty(b, nc, h, p, n, device=dev, dtype=x.dtype)
    ddec = torch.empty(b, nc, h, n_state_blocks, bp, device=dev, dtype=f32)  # per program, per row of its p block
    dinit = torch.empty(b, h, p, n, device=dev, dtype=f32)
    dfin = dfinal.float().contiguous() if dfinal is not None else x
    _state_bwd_kernel[(b * h * n_state_blocks,)](
        dy, C, seq, acs, states, dfin, dstates, ddec, dinit,
        l, h, p, n, R, nc, triton.cdiv(p, bp), triton.cdiv(n, bn), *dy.stride(), *C.stride(), ss_b, ss_l,
        CHUNK=chunk, BK=BLK, BP=bp, BN=bn, HAS_DFINAL=dfinal is not None,
        HAS_SEQ=seq_idx is not None, DOT=DOT, **launch("state_bwd"),
    )

    # 2. dx, dt's direct gradient, W, straddling sums, dD
    dx = torch.empty(b, l, h, p, device=dev, dtype=x.dtype)
    ddtp = torch.empty(b, h, nc, chunk, device=dev, dtype=f32)
    W = torch.empty_like(ddtp)
    below = torch.empty_like(ddtp)  # column sums of T over the row blocks below each column's block
    d_hp = D is not None and D.dim() == 2
    dDp = torch.empty((b, nc, h, nblk, p) if d_hp else (b, nc, h, nblk), device=dev, dtype=f32)
    _dx_kernel[(b * nc * h * nblk,)](
        x, dy, B, D if D is not None else A, seq, dtp, acs, cb, dstates,
        dx, ddtp, W, below, dDp,
        l, h, p, n, R, g, nc,
        *x.stride(), *dy.stride(), *B.stride(), ss_b, ss_l, *dx.stride(),
        CHUNK=chunk, BLK=BLK, BP=BP, BN=BN, HAS_D=D is not None, D_HP=d_hp,
        HAS_SEQ=seq_idx is not None, DOT=DOT, **launch("dx"),
    )

    # 3. dCB summed over the heads of each group
    hps, nsplit = _head_split(b * nc * g * nblk * (nblk + 1) // 2, R, LAUNCH["dcb_programs"])
    dcb = torch.empty(nsplit, b, nc, g, chunk, chunk, device=dev, dtype=f32)
    tiles = torch.empty(b, nc, h, nblk * nblk * BLK, device=dev, dtype=f32)  # per-head row sums of T
    _dcb_kernel[(b * nc * g * nsplit * nblk * nblk,)](
        x, dy, seq, dtp, acs, cb, dcb, tiles,
        l, h, p, R, g, nc, hps, nsplit,
        *x.stride(), *dy.stride(), ss_b, ss_l,
        CHUNK=chunk, BLK=BLK, BP=BP, HAS_SEQ=seq_idx is not None, DOT=DOT, **launch("dcb"),
    )

    # 4. state parts of dB and dC; incoming-state part of the log-decay gradient
    hps2, nsplit2 = _head_split(b * nc * g * nblk, R, LAUNCH["dbc_programs"])
    dCp = torch.empty(nsplit2, b, nc * chunk, g, n, device=dev, dtype=f32)
    dBp = torch.empty_like(dCp)
    dacs = torch.empty(b, h, nc, chunk, device=dev, dtype=f32)
    _dbc_state_kernel[(b * nc * g * nsplit2 * nblk,)](
        x, dy, C, seq, dtp, acs, states, dstates, dCp, dBp, dacs,
        b, l, h, p, n, R, g, nc, hps2, nsplit2,
        *x.stride(), *dy.stride(), *C.stride(), ss_b, ss_l,
        CHUNK=chunk, BLK=BLK, BP=BP, BN=BN, HAS_SEQ=seq_idx is not None, DOT=DOT,
        **launch("dbc_state"),
    )

    # 5. dt, A, dt_bias
    ddt = torch.empty(b, l, h, device=dev, dtype=dt.dtype)
    dAp = torch.empty(b, nc, h, device=dev, dtype=f32)
    dbp = torch.empty_like(dAp)
    _dt_bwd_kernel[(b * nc * h,)](
        dt, A, dt_bias if dt_bias is not None else A, acs, dtp, ddtp, W, dacs, tiles, below, torch.empty_like(acs),
        ddec,
        ddt, dAp, dbp,
        l, h, nc, n_state_blocks, lo, hi, *dt.stride(), *ddt.stride(),
        CHUNK=chunk, BLK=BLK, DDEC_ROWS=bp, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        HAS_LIMIT=has_limit, **launch("dt_bwd"),
    )

    # Per group: dC_i += sum_j dCB_ij B_j, dB_j += sum_i dCB_ij C_i, added onto the state parts in
    # place by batched matmuls over (batch, chunk), one pair per group, on strided views (no
    # transposed copies).
    dcb = (dcb.sum(0) if nsplit > 1 else dcb[0]).view(b * nc, g, chunk, chunk)
    pad = nc * chunk - l

    def chunked(t):  # (b, l, g, n) -> (b*c, Q, g, n) fp32, zero-padded
        t = t.float()
        if pad:
            t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad))
        return t.reshape(b * nc, chunk, g, n)  # a view unless B or C is not batch-outermost

    dC = dCp.sum(0) if nsplit2 > 1 else dCp[0]  # (b, c*Q, g, n)
    dB = dBp.sum(0) if nsplit2 > 1 else dBp[0]
    Bc, Cc = chunked(B), chunked(C)
    dCc, dBc = dC.view(b * nc, chunk, g, n), dB.view(b * nc, chunk, g, n)
    with _tf32_for(B.dtype):
        for gg in range(g):
            dCc[:, :, gg].baddbmm_(dcb[:, gg], Bc[:, :, gg])
            dBc[:, :, gg].baddbmm_(dcb[:, gg].transpose(1, 2), Cc[:, :, gg])
    # contiguous, as the op's fake promises (a padded fp32 slice would otherwise come back as is)
    dC = dC[:, :l].to(C.dtype, memory_format=torch.contiguous_format)
    dB = dB[:, :l].to(B.dtype, memory_format=torch.contiguous_format)

    dA = dAp.sum((0, 1)).to(A.dtype)
    ddt_bias = dbp.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    dD = None
    if D is not None:
        dD = dDp.sum((0, 1, 3)).to(D.dtype)  # (h) or (h, p)
    dinit_out = dinit.to(initial_states.dtype) if initial_states is not None else None
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit_out
