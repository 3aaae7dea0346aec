"""SSD chunked scan, forward, in Triton: four launches.

1. ``_cb_kernel``: CB[i, j] = C_i . B_j for every chunk and group (b, c, g, Q, Q), in B's dtype
   (zeros in the tiles above the diagonal). Shared by the heads of a group: computed once per group.
2. ``_dt_cumsum_kernel``: one program per (batch, chunk, block of heads) finalises dt (bias,
   softplus, limit) and its in-chunk cumsum of dt * A, written for the other kernels. Kept out of
   the state kernel: its scans and sums synchronise all warps, which on that kernel's serial chunk
   loop costs time.
3. ``_state_fwd_kernel``: one program per (batch, head, block of p, block of n) walks the chunks in
   order. Per chunk it forms the chunk's own state x^T diag(dt * decay-to-end) B on tensor cores,
   stores the state entering the chunk and carries it on. Fusing "chunk state" with "state passing"
   keeps the per-chunk states out of HBM (only the entering states, in the input dtype, are written).
4. ``_scan_fwd_kernel``: one program per (batch, chunk, head(s), block of rows) computes
   y_i = sum_{j<=i} CB_ij exp(acs_i - acs_j) dt_j x_j  +  exp(acs_i) C_i . S_in  +  D x_i,
   skipping the block tiles above the diagonal, then the optional z gate. Only the diagonal tile
   takes an exp per score: below it the decay factors into a row and a column factor.

Notation: b batch, l length, c chunks of Q, h heads = g groups x r heads per group, p head dim,
n state dim; acs = cumsum over the chunk of dt * A ("log decay from the chunk start").
Tensors of (b, l, h, p) pass 2^31 elements at long lengths: each kernel forms 64-bit pointers to the
start of its (batch, chunk) and 32-bit offsets inside it (time in the chunk, head or group, channel),
which ``check_chunk_offsets`` guarantees fit; the op copies a view that does not. The decay
factorings assume A <= 0 and processed dt >= 0 (Mamba-2's parametrisation), so that acs never rises
along a chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid_train.ops.triton.common import LAUNCH, dot_dtype, dt_limit_args, launch, pow2_at_least_16, process_dt


@triton.jit
def _cb_kernel(
    B_ptr, C_ptr, cb_ptr,
    L, G, N, NCHUNKS,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    CHUNK: tl.constexpr, BLK: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr,
):
    # 1-D grid, tiles fastest: the tiles of one chunk run side by side and share its B, C in L2
    NB: tl.constexpr = CHUNK // BLK
    pid = tl.program_id(0) // (NB * NB)  # ((b * NCHUNKS) + c) * G + g
    ib = (tl.program_id(0) // NB) % NB
    jb = tl.program_id(0) % NB
    offs_i = ib * BLK + tl.arange(0, BLK)
    offs_j = jb * BLK + tl.arange(0, BLK)
    out = cb_ptr + (pid.to(tl.int64) * CHUNK) * CHUNK + offs_i[:, None] * CHUNK + offs_j[None, :]
    if jb > ib:  # above the diagonal: masked by causality, but defined (readers mask by multiplying)
        tl.store(out, tl.zeros((BLK, BLK), dtype=cb_ptr.dtype.element_ty))
        return
    g = pid % G
    c = (pid // G) % NCHUNKS
    b = pid // (G * NCHUNKS)
    b64 = b.to(tl.int64)
    t0 = c.to(tl.int64) * CHUNK
    offs_n = tl.arange(0, BN)
    ti = t0 + offs_i
    tj = t0 + offs_j
    mn = offs_n < N
    Ci = tl.load(C_ptr + b64 * sC_b + g * sC_g + ti[:, None] * sC_l + offs_n[None, :] * sC_n,
                 mask=(ti < L)[:, None] & mn[None, :], other=0.0)  # (BLK, BN)
    BjT = tl.load(B_ptr + b64 * sB_b + g * sB_g + tj[None, :] * sB_l + offs_n[:, None] * sB_n,
                  mask=(tj < L)[None, :] & mn[:, None], other=0.0)  # (BN, BLK)
    tl.store(out, tl.dot(Ci.to(DOT), BjT.to(DOT)).to(cb_ptr.dtype.element_ty))  # (BLK, BLK), fp32 accumulation


@triton.jit
def _dt_cumsum_kernel(
    dt_ptr, A_ptr, dtb_ptr, dtp_ptr, acs_ptr,
    L, H, NCHUNKS, lo, hi,
    sdt_b, sdt_l, sdt_h,
    CHUNK: tl.constexpr, BH: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
):
    # One program per (batch, chunk, block of BH heads): dt finalised (bias, softplus, limit; 0 past
    # l) and the in-chunk cumsum of dt * A, written for every other kernel. A block of heads reads
    # dt's rows (b, l, h) contiguously rather than one element per row.
    nhb = tl.cdiv(H, BH)
    hb = tl.program_id(0) % nhb
    c = (tl.program_id(0) // nhb) % NCHUNKS
    b64 = (tl.program_id(0) // (nhb * NCHUNKS)).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    offs_h = hb * BH + tl.arange(0, BH)
    mh = offs_h < H
    t = c.to(tl.int64) * CHUNK + offs
    valid = (t < L)[:, None] & mh[None, :]
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(dtb_ptr + offs_h, mask=mh, other=0.0).to(tl.float32)[None, :]
    raw = tl.load(dt_ptr + b64 * sdt_b + offs_h[None, :].to(tl.int64) * sdt_h + t[:, None] * sdt_l,
                  mask=valid, other=0.0).to(tl.float32)  # (CHUNK, BH)
    dtq = tl.where(valid, process_dt(raw, bias, HAS_BIAS, SOFTPLUS, HAS_LIMIT, lo, hi), 0.0)
    A = tl.load(A_ptr + offs_h, mask=mh, other=0.0).to(tl.float32)
    out = (((b64 * H + offs_h) * NCHUNKS + c) * CHUNK)[None, :] + offs[:, None]  # (b, h, c, Q) rows
    tl.store(dtp_ptr + out, dtq, mask=mh[None, :])
    tl.store(acs_ptr + out, tl.cumsum(dtq * A[None, :], 0), mask=mh[None, :])


@triton.jit
def state_program(H, R, NPB, NNB, BP: tl.constexpr, BN: tl.constexpr):
    """(b, h, g, p offsets, n offsets) of this program of a sequential state kernel: one program per
    (batch, head, block of p, block of n) on a 1-D grid, (p, n) blocks fastest, so that the blocks of
    one head walk its chunks side by side."""
    pid_bh = tl.program_id(0) // (NPB * NNB)
    pid_p = (tl.program_id(0) // NNB) % NPB
    pid_n = tl.program_id(0) % NNB
    h = pid_bh % H
    return pid_bh // H, h, h // R, pid_p * BP + tl.arange(0, BP), pid_n * BN + tl.arange(0, BN)


@triton.jit
def add_state_block(S, v_base, sv_l, sv_p, m_base, sm_l, sm_n, offs_k, vk, w, offs_p, offs_n, mp, mn,
                    DOT: tl.constexpr):
    """S + (v_k o w)^T m_k over one block of times offs_k (32-bit, from v_base and m_base, which point
    at the chunk's start): v (x or dy) is loaded transposed, so that the dot's left operand needs no
    transpose in registers; m is B or C."""
    vT = tl.load(v_base + offs_k[None, :] * sv_l + offs_p[:, None] * sv_p,
                 mask=vk[None, :] & mp[:, None], other=0.0)  # (BP, BK)
    m = tl.load(m_base + offs_k[:, None] * sm_l + offs_n[None, :] * sm_n,
                mask=vk[:, None] & mn[None, :], other=0.0)  # (BK, BN)
    return tl.dot((vT.to(tl.float32) * w[None, :]).to(DOT), m.to(DOT), S)  # (BP, BN)


@triton.jit
def _state_fwd_kernel(
    x_ptr, B_ptr, seq_ptr, init_ptr, dtp_ptr, acs_ptr, states_ptr, final_ptr,
    L, H, P, N, R, NCHUNKS, NPB, NNB,
    sx_b, sx_l, sx_h, sx_p,
    sB_b, sB_l, sB_g, sB_n,
    sseq_b, sseq_l,
    si_b, si_h, si_p, si_n,
    CHUNK: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr, DOT: tl.constexpr,
):
    b, h, g, offs_p, offs_n = state_program(H, R, NPB, NNB, BP, BN)
    b64 = b.to(tl.int64)
    mp = offs_p < P
    mn = offs_n < N
    mpn = mp[:, None] & mn[None, :]
    x_base = x_ptr + b64 * sx_b + h * sx_h
    B_base = B_ptr + b64 * sB_b + g * sB_g
    seq_base = seq_ptr + b64 * sseq_b

    if HAS_INIT:
        S = tl.load(init_ptr + b64 * si_b + h * si_h + offs_p[:, None] * si_p + offs_n[None, :] * si_n,
                    mask=mpn, other=0.0).to(tl.float32)  # (BP, BN)
    else:
        S = tl.zeros((BP, BN), dtype=tl.float32)
    total = 0.0  # loop-carried, as seq_last: set at each chunk's first block
    if HAS_SEQ:
        prev_seq = tl.load(seq_base)  # the initial state belongs to the document at position 0
        seq_last = prev_seq
    # One flat loop over (chunk, K block), so that the pipeliner prefetches across chunk boundaries.
    # At each chunk's first block the running state is stored (the state entering the chunk) and
    # decayed over the chunk; the chunk's own state, sum_j exp(total - acs_j) dt_j x_j (outer) B_j,
    # then accumulates straight into it.
    NK: tl.constexpr = CHUNK // BK
    for it in range(NCHUNKS * NK):
        c = it // NK
        kk = it % NK
        t0 = c * CHUNK
        row = ((b64 * H + h) * NCHUNKS + c) * CHUNK
        if kk == 0:
            total = tl.load(acs_ptr + row + CHUNK - 1)
            if HAS_SEQ:
                seq_last = tl.load(seq_base + (tl.minimum(t0 + CHUNK, L) - 1).to(tl.int64) * sseq_l)
            st = ((b64 * NCHUNKS + c) * H + h) * P * N
            tl.store(states_ptr + st + offs_p[:, None] * N + offs_n[None, :],
                     S.to(states_ptr.dtype.element_ty), mask=mpn)
            decay = tl.exp(total)
            if HAS_SEQ:
                # The carried state survives the chunk only if the chunk ends in the document it entered.
                decay = tl.where(seq_last == prev_seq, decay, 0.0)
                prev_seq = seq_last
            S = S * decay
        offs_k = kk * BK + tl.arange(0, BK)
        vk = offs_k < L - t0
        t64 = t0.to(tl.int64)
        wk = tl.exp(total - tl.load(acs_ptr + row + offs_k)) * tl.load(dtp_ptr + row + offs_k)
        if HAS_SEQ:
            seqk = tl.load(seq_base + t64 * sseq_l + offs_k * sseq_l, mask=vk, other=0)
            wk = tl.where(seqk == seq_last, wk, 0.0)  # only the last token's document carries on
        S = add_state_block(S, x_base + t64 * sx_l, sx_l, sx_p, B_base + t64 * sB_l, sB_l, sB_n, offs_k, vk, wk,
                            offs_p, offs_n, mp, mn, DOT)
    tl.store(final_ptr + (b64 * H + h) * P * N + offs_p[:, None] * N + offs_n[None, :], S, mask=mpn)


@triton.jit
def _scan_fwd_kernel(
    x_ptr, z_ptr, C_ptr, D_ptr, seq_ptr, dtp_ptr, acs_ptr, cb_ptr, states_ptr, out_ptr, ypre_ptr,
    L, H, P, N, R, G, NCHUNKS,
    sx_b, sx_l, sx_h, sx_p,
    sz_b, sz_l, sz_h, sz_p,
    sC_b, sC_l, sC_g, sC_n,
    sseq_b, sseq_l,
    so_b, so_l, so_h, so_p,
    CHUNK: tl.constexpr, BM: tl.constexpr, BLK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HB: tl.constexpr, HAS_D: tl.constexpr, D_HP: tl.constexpr, HAS_Z: tl.constexpr,
    STORE_YPRE: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
):
    # One program: HB heads of one group, one chunk, one block of BM rows. The heads run one after
    # the other so that the group's C rows and CB tiles, loaded by the first, come from L1/L2 after.
    # 1-D grid, row blocks fastest: the row blocks of one chunk and head share its x and state in L2
    NM: tl.constexpr = CHUNK // BM
    pid = tl.program_id(0) // NM  # (((b * NCHUNKS) + c) * G + g) * (R // HB) + head block
    m = tl.program_id(0) % NM
    nhb = R // HB
    hb = pid % nhb
    g = (pid // nhb) % G
    c = (pid // (nhb * G)) % NCHUNKS
    b = pid // (nhb * G * NCHUNKS)
    b64 = b.to(tl.int64)
    t0 = c * CHUNK
    t64 = t0.to(tl.int64)
    # 64-bit math stays in the scalar chunk-start pointers; offsets inside a chunk fit in 32 bits
    # (the launch checks chunk_span), which keeps the tiles' address math 32-bit.
    offs_m = m * BM + tl.arange(0, BM)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    rem = L - t0  # rows of this chunk inside the sequence
    vm = offs_m < rem
    mp = offs_p < P
    mn = offs_n < N
    mrow = vm[:, None] & mp[None, :]
    Cm = tl.load(C_ptr + b64 * sC_b + g * sC_g + t64 * sC_l + offs_m[:, None] * sC_l + offs_n[None, :] * sC_n,
                 mask=vm[:, None] & mn[None, :], other=0.0).to(DOT)  # (BM, BN), shared by the heads
    if HAS_SEQ:
        seq_base = seq_ptr + b64 * sseq_b + t64 * sseq_l
        seq_m = tl.load(seq_base + offs_m * sseq_l, mask=vm, other=-1)
        prev_seq = tl.load(seq_ptr + b64 * sseq_b + tl.maximum(t64 - 1, 0) * sseq_l)
    cb_base = cb_ptr + ((b64 * NCHUNKS + c) * G + g) * CHUNK * CHUNK
    cb_row = offs_m[:, None] * CHUNK

    for hh in range(HB):
        h = g * R + hb * HB + hh
        row = ((b64 * H + h) * NCHUNKS + c) * CHUNK
        acs_m = tl.load(acs_ptr + row + offs_m)  # (BM)
        x_base = x_ptr + b64 * sx_b + h * sx_h + t64 * sx_l

        # Off-diagonal tiles (j < m * BM <= i) factor exactly: exp(acs_i - acs_j) =
        # exp(acs_i - acs_r) * exp(acs_r - acs_j), with r = m * BM - 1 the last column before the
        # row block. Both factors are <= 1 (acs falls along the chunk), so neither overflows, and
        # where one underflows the true product is smaller still. The column factor (with dt) scales
        # C.B; the row factor is applied once to the sum, which starts from the incoming state,
        # exp(acs_r) C_i . S_in: no exp per score and x feeds the tensor cores as loaded.
        acs_r = tl.where(m > 0, tl.load(acs_ptr + row + tl.maximum(m * BM - 1, 0)), 0.0)
        st = ((b64 * NCHUNKS + c) * H + h) * P * N
        SinT = tl.load(states_ptr + st + offs_n[:, None] + offs_p[None, :] * N,
                       mask=mn[:, None] & mp[None, :], other=0.0)  # (BN, BP)
        acc = tl.dot(Cm, SinT.to(DOT))  # (BM, BP)
        if HAS_SEQ:  # the state reaches only rows still in the document it came from
            acc = acc * tl.where(seq_m == prev_seq, tl.exp(acs_r), 0.0)[:, None]
        else:
            acc = acc * tl.exp(acs_r)
        for j0 in range(0, m * BM, BLK):
            offs_j = j0 + tl.arange(0, BLK)
            vj = offs_j < rem
            w = tl.load(dtp_ptr + row + offs_j) * tl.exp(acs_r - tl.load(acs_ptr + row + offs_j))
            sc = tl.load(cb_base + cb_row + offs_j[None, :]) * w[None, :]  # (BM, BLK)
            if HAS_SEQ:
                seq_j = tl.load(seq_base + offs_j * sseq_l, mask=vj, other=-2)
                sc = tl.where(seq_m[:, None] == seq_j[None, :], sc, 0.0)
            xj = tl.load(x_base + offs_j[:, None] * sx_l + offs_p[None, :] * sx_p,
                         mask=vj[:, None] & mp[None, :], other=0.0)  # (BLK, BP)
            acc += tl.dot(sc.to(DOT), xj.to(DOT))
        acc = acc * tl.exp(acs_m - acs_r)[:, None]

        # Diagonal block, one (BM, BM) tile: exp per score, causal mask. Its x rows are the block's
        # own, so the same load serves the D term.
        mask = offs_m[None, :] <= offs_m[:, None]
        if HAS_SEQ:
            mask = mask & (seq_m[:, None] == seq_m[None, :])
        # exp of -inf where masked: no inf * 0, and no overflow above the diagonal
        decay = tl.exp(tl.where(mask, acs_m[:, None] - acs_m[None, :], float("-inf")))
        sc = tl.load(cb_base + cb_row + offs_m[None, :]) * decay
        xm = tl.load(x_base + offs_m[:, None] * sx_l + offs_p[None, :] * sx_p, mask=mrow, other=0.0)  # (BM, BP)
        acc += tl.dot((sc * tl.load(dtp_ptr + row + offs_m)[None, :]).to(DOT), xm.to(DOT))
        if HAS_D:
            if D_HP:
                Dv = tl.load(D_ptr + h * P + offs_p, mask=mp, other=0.0).to(tl.float32)
                acc += xm.to(tl.float32) * Dv[None, :]
            else:
                acc += xm.to(tl.float32) * tl.load(D_ptr + h).to(tl.float32)
        o_base = b64 * so_b + h * so_h + t64 * so_l
        o_tile = offs_m[:, None] * so_l + offs_p[None, :] * so_p
        if HAS_Z:
            if STORE_YPRE:  # kept for the z-gate gradient
                tl.store(ypre_ptr + o_base + o_tile, acc.to(ypre_ptr.dtype.element_ty), mask=mrow)
            zm = tl.load(z_ptr + b64 * sz_b + h * sz_h + t64 * sz_l + offs_m[:, None] * sz_l + offs_p[None, :] * sz_p,
                         mask=mrow, other=0.0).to(tl.float32)
            acc = acc * zm * tl.sigmoid(zm)
        tl.store(out_ptr + o_base + o_tile, acc.to(out_ptr.dtype.element_ty), mask=mrow)


def chunk_span(t: torch.Tensor, chunk: int) -> int:
    """Largest element offset inside one (batch, chunk) slab of a (b, l, ...) tensor (torch strides
    are never negative). Plain loop: it runs on every eager call."""
    shape, stride = t.shape, t.stride()
    span = (min(chunk, shape[1]) - 1) * stride[1]
    for d in range(2, len(shape)):
        span += (shape[d] - 1) * stride[d]
    return span


def contiguous_if_spread(t: torch.Tensor | None, chunk: int) -> torch.Tensor | None:
    """t, or a contiguous copy of it where a view spreads one (batch, chunk) slab past the kernels'
    32-bit offsets (a huge time or head stride); a contiguous tensor spans chunk x its row."""
    return t.contiguous() if t is not None and chunk_span(t, chunk) >= 2**31 else t


def check_chunk_offsets(chunk: int, **tensors) -> None:
    """The kernels address inside a (batch, chunk) slab with 32-bit offsets (64-bit pointers to its
    start): each (b, l, ...) tensor's largest offset inside one must stay below 2^31."""
    for name, t in tensors.items():
        span = chunk_span(t, chunk) if t is not None else 0
        if span >= 2**31:
            raise ValueError(f"ssd: {name} (shape {tuple(t.shape)}, strides {t.stride()}) spans "
                             f"{span} elements inside one chunk of {chunk}, past the "
                             "kernels' 32-bit offsets: pass a contiguous tensor or a smaller chunk")


def _seq_args(seq_idx, x):
    if seq_idx is None:
        return x, 0, 0  # any pointer; never read (HAS_SEQ=False)
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def ssd_blocks(chunk: int, p: int, n: int) -> tuple[int, int, int]:
    """(BLK, BP, BN): row/column tile inside a chunk, padded head dim and state dim."""
    return min(LAUNCH["ssd_blk"], chunk), pow2_at_least_16(p), pow2_at_least_16(n)


def heads_per_program(heads_per_group: int, want: int) -> int:
    """Largest divisor of heads_per_group that is <= want."""
    return max(d for d in range(1, min(want, heads_per_group) + 1) if heads_per_group % d == 0)


def state_blocks(bp: int, bn: int, key: str = "state_blocks") -> tuple[int, int]:
    """(p block, n block) of the sequential state kernels.

    They walk the chunks in order, one program per (batch, head, p block, n block): small blocks
    make many small programs, so that enough of them are resident per SM to hide each step's latency.
    """
    return min(bp, LAUNCH[key]["bp"]), min(bn, LAUNCH[key]["bn"])


def chunk_states_fwd(x, dt, A, B, dt_bias, dt_softplus, dt_limit, seq_idx, initial_states, chunk):
    """Launches the dt and state kernels. Returns (dtp, acs, states, final).

    dtp, acs: (b, h, c, Q) fp32 processed dt and its in-chunk cumsum of dt * A (0 / flat past l);
    states: (b, c, h, p, n) entering each chunk, in x's dtype; final: (b, h, p, n) fp32.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = triton.cdiv(l, chunk)
    BLK, BP, BN = ssd_blocks(chunk, p, n)
    dev = x.device
    dtp = torch.empty(b, h, nc, chunk, device=dev, dtype=torch.float32)
    acs = torch.empty_like(dtp)
    states = torch.empty(b, nc, h, p, n, device=dev, dtype=x.dtype)
    final = torch.empty(b, h, p, n, device=dev, dtype=torch.float32)
    DOT = dot_dtype(x.dtype)
    lo, hi, has_limit = dt_limit_args(dt_limit)
    seq, ss_b, ss_l = _seq_args(seq_idx, x)
    init = initial_states if initial_states is not None else x
    si = initial_states.stride() if initial_states is not None else (0, 0, 0, 0)
    bp, bn = state_blocks(BP, BN)
    npb, nnb = triton.cdiv(p, bp), triton.cdiv(n, bn)
    bh = min(LAUNCH["dt_cumsum"]["BH"], triton.next_power_of_2(h))
    _dt_cumsum_kernel[(b * nc * triton.cdiv(h, bh),)](
        dt, A, dt_bias if dt_bias is not None else A, dtp, acs,
        l, h, nc, lo, hi, *dt.stride(),
        CHUNK=chunk, BH=bh, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_limit,
        **launch("dt_cumsum"),
    )
    _state_fwd_kernel[(b * h * npb * nnb,)](
        x, B, seq, init, dtp, acs, states, final,
        l, h, p, n, h // g, nc, npb, nnb,
        *x.stride(), *B.stride(), ss_b, ss_l, *si,
        CHUNK=chunk, BK=BLK, BP=bp, BN=bn,
        HAS_SEQ=seq_idx is not None, HAS_INIT=initial_states is not None, DOT=DOT,
        **launch("state_fwd"),
    )
    return dtp, acs, states, final


def cb_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the stored C.B for inputs of ``dtype`` (LAUNCH["cb_dtype"])."""
    return dtype if LAUNCH["cb_dtype"] == "input" else torch.float32


def chunk_cb(B, C, chunk):
    """CB = C B^T per chunk and group: (b, c, g, Q, Q), fp32 or B's dtype (LAUNCH["cb_dtype"]).

    Every head of the group reads it (128 heads per group at Bamba's shape): in bf16 that traffic halves,
    and its readers round the scores to the dot dtype anyway."""
    b, l, g, n = B.shape
    nc = triton.cdiv(l, chunk)
    BLK, _, BN = ssd_blocks(chunk, 16, n)
    cb = torch.empty(b, nc, g, chunk, chunk, device=B.device, dtype=cb_dtype(B.dtype))
    nb = chunk // BLK
    _cb_kernel[(b * nc * g * nb * nb,)](
        B, C, cb, l, g, n, nc, *B.stride(), *C.stride(),
        CHUNK=chunk, BLK=BLK, BN=BN, DOT=dot_dtype(B.dtype), **launch("cb"),
    )
    return cb


def ssd_fwd(x, dt, A, B, C, chunk, D, z, dt_bias, dt_softplus, dt_limit, seq_idx, initial_states,
            store_ypre):
    """Forward pass. Returns (out (b, l, h, p) x.dtype, final (b, h, p, n) fp32, ypre or None, chunk_states).

    ypre is y before the z gate, kept only when z is given and ``store_ypre``. chunk_states =
    (dtp, acs, states, cb): ``chunk_states_fwd``'s first three and ``chunk_cb``'s C.B, what the backward
    would otherwise recompute (at Bamba-9B's shape 9.5 KB per token per layer, against one state pass's
    time and a C.B launch).
    """
    check_chunk_offsets(chunk, x=x, dt=dt, z=z, B=B, C=C, seq_idx=seq_idx)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = triton.cdiv(l, chunk)
    BLK, BP, BN = ssd_blocks(chunk, p, n)
    dtp, acs, states, final = chunk_states_fwd(x, dt, A, B, dt_bias, dt_softplus, dt_limit, seq_idx,
                                               initial_states, chunk)
    cb = chunk_cb(B, C, chunk)
    out = torch.empty(b, l, h, p, device=x.device, dtype=x.dtype)
    ypre = torch.empty_like(out) if (z is not None and store_ypre) else None
    seq, ss_b, ss_l = _seq_args(seq_idx, x)
    zz = z if z is not None else x
    BM = min(LAUNCH["scan_fwd"]["BM"], chunk)
    BLK = min(BLK, BM)  # the diagonal block is whole tiles
    HB = heads_per_program(h // g, LAUNCH["scan_fwd"]["HB"])
    _scan_fwd_kernel[(b * nc * h // HB * (chunk // BM),)](
        x, zz, C, D if D is not None else A, seq, dtp, acs, cb, states, out,
        ypre if ypre is not None else out,
        l, h, p, n, h // g, g, nc,
        *x.stride(), *zz.stride(), *C.stride(), ss_b, ss_l, *out.stride(),
        CHUNK=chunk, BM=BM, BLK=BLK, BP=BP, BN=BN, HB=HB,
        HAS_D=D is not None, D_HP=D is not None and D.dim() == 2, HAS_Z=z is not None,
        STORE_YPRE=ypre is not None, HAS_SEQ=seq_idx is not None, DOT=dot_dtype(x.dtype),
        **launch("scan_fwd"),
    )
    return out, final, ypre, (dtp, acs, states, cb)
