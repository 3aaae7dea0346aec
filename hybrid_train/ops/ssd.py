"""Chunked SSD scan (Mamba-2 "state space duality") in plain PyTorch.

``ssd_chunk_scan_torch`` is the reference implementation and the CPU path; ``ssd_chunk_scan`` dispatches
to the Triton kernels (hybrid_train/ops/triton/ssd_fwd.py, ssd_bwd.py) behind the same signature,
registered as torch.library custom ops so that torch.compile traces through them.

Per head, with state S_t (p x n) and scalar decay a_t = exp(dt_t * A):

    S_t = a_t * S_{t-1} + dt_t * x_t (outer) B_t
    y_t = S_t C_t + D x_t                    (then y_t *= silu(z_t) when z is given)

The sequence is cut into chunks of Q tokens. Inside a chunk the recurrence is unrolled into an
attention-like quadratic form (C_i . B_j) * exp(sum of dA over (j, i]) — matmuls instead of a scan.
Across chunks only the (p x n) states travel, in a short loop over chunks.

Notation in the shape comments: b batch, l length, c chunks, q/i/j positions in a chunk (Q of them),
h heads = g groups x r heads per group, p head dim, n state dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from hybrid_train.ops.dispatch import KERNEL_DTYPES, kernels_mode, use_triton
from hybrid_train.ops.library import kernel_op

__all__ = ["ssd_chunk_scan", "ssd_chunk_scan_torch"]


def _segsum(dA: torch.Tensor) -> torch.Tensor:
    """Stable segment sums over the last dim: out[..., i, j] = sum(dA[..., j+1 : i+1]) for i >= j.

    Built as a cumsum of masked increments rather than cumsum[i] - cumsum[j]: the difference of two
    large negative prefix sums loses precision, and for i < j it is large and positive, so exp()
    overflows and the masked-out infs turn into NaN gradients. Here every entry is a sum of the
    increments it actually spans; entries with i < j come out as 0 and are masked by the caller.
    """
    q = dA.shape[-1]
    strict_lower = torch.ones(q, q, dtype=torch.bool, device=dA.device).tril(-1)
    # inc[..., i, j] = dA[..., i] where i > j, else 0
    inc = dA.unsqueeze(-1) * strict_lower  # (..., q, q)
    return torch.cumsum(inc, dim=-2)  # (..., q, q)


def _process_dt(dt, dt_bias, dt_softplus, dt_limit):
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20, the same as the fused kernels
    # The fused kernels clamp only when a limit is set; a clamp at (0, inf) would also zero the
    # gradient of negative dt when softplus is off.
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def ssd_chunk_scan_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
):
    """Mamba-2 SSD scan in plain PyTorch (reference); arguments as ``ssd_chunk_scan``."""
    return _ssd_reference(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, seq_idx,
                          initial_states, return_final_states)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
):
    """Mamba-2 SSD scan; same arguments and meaning as mamba_ssm's ``mamba_chunk_scan_combined``.

    Runs the Triton kernels or the PyTorch reference as hybrid_train.ops.dispatch decides (Triton
    for CUDA tensors under ``auto``). The Triton path takes bf16/fp16/fp32 inputs (fp32 math), a
    power-of-two chunk_size in [16, 256], head and state dims up to 256; other cases run the
    reference under ``auto`` and raise under ``triton``. Its decay factorings assume A <= 0 and a
    processed dt >= 0 (softplus gives that); a signed dt may overflow there, not in the reference.

    Args:
        x: (b, l, h, p) inputs.
        dt: (b, l, h) raw step sizes; ``dt_bias`` (h) is added, then softplus if ``dt_softplus``,
            then a clamp to ``dt_limit`` unless it is (0, inf).
        A: (h) decay rates (negative).
        B, C: (b, l, g, n) input/output projections; head i uses group i // (h // g).
        chunk_size: Q, the chunk length. Any l works (padded internally).
        D: (h) or (h, p) skip connection, added before the z gate.
        z: (b, l, h, p) gate: the output is multiplied by silu(z).
        seq_idx: (b, l) int document index, nondecreasing along l. No state crosses a change of
            document; ``initial_states`` feed the document at position 0 only.
        initial_states: (b, h, p, n) state before the first token.
        return_final_states: also return the state after the last token (of its document).

    Returns:
        y (b, l, h, p) in x's dtype; with ``return_final_states`` also the final state
        (b, h, p, n) in fp32 (fp64 when x is fp64).
    """
    if use_triton(x, op="ssd"):
        reason = triton_unsupported(x, B, chunk_size)
        if reason is None:
            return _ssd_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, seq_idx,
                               initial_states, return_final_states)
        if kernels_mode() == "triton":
            raise ValueError(f"ssd_chunk_scan: the Triton kernels do not cover this call: {reason}")
    return _ssd_reference(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, seq_idx,
                          initial_states, return_final_states)


def _ssd_reference(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, seq_idx,
                   initial_states, return_final_states):
    b, l, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    assert dt.shape == (b, l, h) and A.shape == (h,), "dt must be (b, l, h) and A (h)"
    assert B.shape == (b, l, g, n) and C.shape == (b, l, g, n), "B and C must be (b, l, g, n)"
    assert h % g == 0, "n_groups must divide n_heads"
    out_dtype = x.dtype
    # fp32 math for bf16/fp16/fp32 inputs; fp64 stays fp64 so tests can use tight tolerances.
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    Q = chunk_size

    # dt is finalised before padding, so padded steps keep dt = 0 whatever dt_limit says:
    # decay exp(0) = 1 and no input, which leaves the final state untouched.
    dt = _process_dt(dt.to(cdt), None if dt_bias is None else dt_bias.to(cdt), dt_softplus, dt_limit)
    xf, Bf, Cf, Af = x.to(cdt), B.to(cdt), C.to(cdt), A.to(cdt)
    if seq_idx is None:
        seq = torch.zeros(b, l, dtype=torch.int32, device=x.device)
    else:
        seq = seq_idx

    pad = (-l) % Q
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
        # Padding belongs to the last token's document, so it never resets the final state.
        seq = torch.cat([seq, seq[:, -1:].expand(b, pad)], dim=1)

    # Split heads into (group, head-in-group) so B and C are never copied per head.
    xc = rearrange(xf, "b (c q) (g r) p -> b c q g r p", q=Q, g=g)  # (b, c, q, g, r, p)
    dtc = rearrange(dt, "b (c q) (g r) -> b c q g r", q=Q, g=g)  # (b, c, q, g, r)
    Bc = rearrange(Bf, "b (c q) g n -> b c q g n", q=Q)  # (b, c, q, g, n)
    Cc = rearrange(Cf, "b (c q) g n -> b c q g n", q=Q)  # (b, c, q, g, n)
    seqc = rearrange(seq, "b (c q) -> b c q", q=Q)  # (b, c, q)
    Ag = rearrange(Af, "(g r) -> g r", g=g)  # (g, r)

    dA = rearrange(dtc * Ag, "b c q g r -> b c g r q")  # (b, c, g, r, q)
    dA_cs = torch.cumsum(dA, dim=-1)  # (b, c, g, r, q): log-decay from chunk start to token i
    xdt = xc * dtc.unsqueeze(-1)  # (b, c, q, g, r, p)

    # Document of the state entering each chunk: that of the previous chunk's last token; the
    # initial state belongs to the document at position 0.
    prev_seq = torch.cat([seq[:, :1], seqc[:, :-1, -1]], dim=1)  # (b, c)

    # 1. Intra-chunk (diagonal blocks): y_i += sum_{j<=i, same doc} (C_i.B_j) exp(dA(j, i]) dt_j x_j.
    # Masking multiplies by zero (torch.where) instead of putting -inf in log space, so nothing
    # infinite is ever created and the masked entries get exactly zero gradient.
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()  # (q, q)
    same_doc = seqc.unsqueeze(-1) == seqc.unsqueeze(-2)  # (b, c, q, q)
    mask = (causal & same_doc)[:, :, None, None]  # (b, c, 1, 1, q, q)
    L = torch.where(mask, torch.exp(_segsum(dA)), 0.0)  # (b, c, g, r, q, q)
    CB = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)  # (b, c, g, q, q), shared by the r heads
    scores = CB.unsqueeze(3) * L  # (b, c, g, r, q, q)
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", scores, xdt)  # (b, c, q, g, r, p)

    # 2. State each chunk produces on its own, at its last token. The last row of L is exactly the
    # decay from token j to the chunk end, already masked to the last token's document.
    decay_to_end = rearrange(L[..., -1, :], "b c g r q -> b c q g r")  # (b, c, q, g, r)
    chunk_states = torch.einsum(
        "bcjgrp,bcjgn->bcgrpn", xdt * decay_to_end.unsqueeze(-1), Bc
    )  # (b, c, g, r, p, n)

    # 3. Pass states between chunks. The carried state survives a chunk only if the chunk ends in
    # the same document it came from (seq_idx is nondecreasing, so nothing changed in between).
    keep = (seqc[:, :, -1] == prev_seq).to(cdt)  # (b, c)
    chunk_decay = torch.exp(dA_cs[..., -1]) * keep[:, :, None, None]  # (b, c, g, r)
    if initial_states is None:
        state = xf.new_zeros(b, g, h // g, p, n)  # (b, g, r, p, n)
    else:
        state = rearrange(initial_states.to(cdt), "b (g r) p n -> b g r p n", g=g)  # (b, g, r, p, n)
    states_in = []
    for c in range(xc.shape[1]):
        states_in.append(state)
        state = chunk_decay[:, c, :, :, None, None] * state + chunk_states[:, c]  # (b, g, r, p, n)
    states_in = torch.stack(states_in, dim=1)  # (b, c, g, r, p, n)

    # 4. Contribution of the incoming state to each token: exp(dA[0, i]) C_i . S_in, for tokens
    # still in the incoming state's document.
    in_doc = (seqc == prev_seq.unsqueeze(-1))[:, :, None, None]  # (b, c, 1, 1, q)
    decay_in = torch.where(in_doc, torch.exp(dA_cs), 0.0)  # (b, c, g, r, q)
    y_off = torch.einsum("bcign,bcgrpn->bcigrp", Cc, states_in)  # (b, c, q, g, r, p)
    y = y + y_off * rearrange(decay_in, "b c g r q -> b c q g r").unsqueeze(-1)  # (b, c, q, g, r, p)

    y = rearrange(y, "b c q g r p -> b (c q) (g r) p")[:, :l]  # (b, l, h, p)
    if D is not None:
        Dh = D.to(cdt) if D.dim() == 2 else D.to(cdt).unsqueeze(-1)  # (h, p) or (h, 1)
        y = y + x.to(cdt) * Dh
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(out_dtype)

    if return_final_states:
        return y, rearrange(state, "b g r p n -> b (g r) p n")  # (b, h, p, n)
    return y


# ---- Triton path: custom ops (hybrid_train/ops/library.py), so torch.compile traces through without graph breaks ----


def triton_unsupported(x: torch.Tensor, B: torch.Tensor, chunk_size: int) -> str | None:
    """None when the Triton kernels cover the call, else why not."""
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} (bf16, fp16 and fp32 are covered; fp64 is reference-only)"
    if chunk_size < 16 or chunk_size > 256 or chunk_size & (chunk_size - 1):
        return f"chunk_size={chunk_size} (a power of two in [16, 256] is covered)"
    if x.shape[-1] > 256 or B.shape[-1] > 256:
        return f"head dim {x.shape[-1]} / state dim {B.shape[-1]} (up to 256 is covered)"
    if x.shape[2] % B.shape[2]:
        return "n_groups must divide n_heads"
    return None


def _ssd_fwd_fake(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_lo, dt_hi, seq_idx,
                  initial_states, store_ypre):
    b, l, h, p = x.shape
    final = x.new_empty(b, h, p, B.shape[-1], dtype=torch.float32)
    ypre = x.new_empty(x.shape) if (z is not None and store_ypre) else x.new_empty(0)
    return (x.new_empty(x.shape), final, ypre, *chunk_states_like(x, B, chunk_size))


def chunk_states_like(x: torch.Tensor, B: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, ...]:
    """Empty (dtp, acs, states, cb) shaped as the SSD forward saves them for its backward."""
    from hybrid_train.ops.triton.ssd_fwd import cb_dtype

    b, l, h, p = x.shape
    g = B.shape[-2]
    nc = -(-l // chunk_size)
    dtp = x.new_empty(b, h, nc, chunk_size, dtype=torch.float32)
    cb = B.new_empty(b, nc, g, chunk_size, chunk_size, dtype=cb_dtype(B.dtype))
    return dtp, torch.empty_like(dtp), x.new_empty(b, nc, h, p, B.shape[-1]), cb


def _ssd_bwd_fake(dout, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_lo, dt_hi, seq_idx,
                  initial_states, ypre, dfinal, dtp, acs, states, cb):
    like = [x, dt, A, B, C, D, z, dt_bias, initial_states]
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)
            for t in like]


def _ssd_setup_context(ctx, inputs, output):
    (x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_lo, dt_hi, seq_idx, initial_states,
     store_ypre) = inputs
    _, _, ypre, *chunk_states = output
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states,
                          ypre if z is not None else None, *chunk_states)
    ctx.args = (chunk_size, dt_softplus, dt_lo, dt_hi)


def _ssd_backward(ctx, dout, dfinal, *_no_grads):
    x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states, ypre, *chunk_states = ctx.saved_tensors
    chunk_size, dt_softplus, dt_lo, dt_hi = ctx.args
    if dout is None:
        dout = torch.zeros_like(x)
    grads = _ssd_bwd_op(dout, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_lo, dt_hi,
                        seq_idx, initial_states, ypre, dfinal, *chunk_states)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = grads
    present = lambda g, t: g if t is not None else None  # noqa: E731
    return (dx, ddt, dA, dB, dC, None, present(dD, D), present(dz, z), present(ddt_bias, dt_bias),
            None, None, None, None, present(dinit, initial_states), None)


@kernel_op("hybrid_train::ssd_chunk_scan_fwd", _ssd_fwd_fake, _ssd_setup_context, _ssd_backward)
def _ssd_fwd_op(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    chunk_size: int, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor], dt_softplus: bool, dt_lo: float, dt_hi: float,
    seq_idx: Optional[torch.Tensor], initial_states: Optional[torch.Tensor], store_ypre: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (b, l, h, p), final state (b, h, p, n) fp32, y before the z gate or an empty tensor,
    then dtp, acs, states, cb: what the backward takes from the forward)."""
    from hybrid_train.ops.triton.ssd_fwd import ssd_fwd

    out, final, ypre, chunk_states = ssd_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus,
                                             (dt_lo, dt_hi), seq_idx, initial_states, store_ypre)
    return out, final, ypre if ypre is not None else x.new_empty(0), *chunk_states


@kernel_op("hybrid_train::ssd_chunk_scan_bwd", _ssd_bwd_fake)
def _ssd_bwd_op(
    dout: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, chunk_size: int, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor], dt_softplus: bool, dt_lo: float, dt_hi: float,
    seq_idx: Optional[torch.Tensor], initial_states: Optional[torch.Tensor],
    ypre: Optional[torch.Tensor], dfinal: Optional[torch.Tensor],
    dtp: torch.Tensor, acs: torch.Tensor, states: torch.Tensor, cb: torch.Tensor,
) -> list[torch.Tensor]:
    """[dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit]; empty tensors for absent inputs."""
    from hybrid_train.ops.triton.ssd_bwd import ssd_bwd

    grads = ssd_bwd(dout, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, (dt_lo, dt_hi),
                    seq_idx, initial_states, ypre, dfinal, (dtp, acs, states, cb))
    return [g if g is not None else x.new_empty(0) for g in grads]


def _ssd_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, seq_idx,
                initial_states, return_final_states):
    b, l, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    assert dt.shape == (b, l, h) and A.shape == (h,), "dt must be (b, l, h) and A (h)"
    assert B.shape == (b, l, g, n) and C.shape == (b, l, g, n), "B and C must be (b, l, g, n)"
    if D is not None:
        assert D.shape in ((h,), (h, p)), "D must be (h) or (h, p)"
        D = D.contiguous()
    if dt_bias is not None:
        dt_bias = dt_bias.contiguous()
    if seq_idx is not None:
        assert seq_idx.shape == (b, l), "seq_idx must be (b, l)"
    # The kernels address inside a (batch, chunk) slab with 32-bit offsets: a view that spreads one over
    # 2^31 elements (a huge time or head stride) is copied.
    from hybrid_train.ops.triton.ssd_fwd import contiguous_if_spread

    x, dt, z, B, C, seq_idx = (contiguous_if_spread(t, chunk_size) for t in (x, dt, z, B, C, seq_idx))
    # y before the z gate is only worth keeping when a backward can follow.
    store_ypre = z is not None and torch.is_grad_enabled()
    out, final, *_ = _ssd_fwd_op(x, dt, A.contiguous(), B, C, int(chunk_size), D, z, dt_bias, bool(dt_softplus),
                                 float(dt_limit[0]), float(dt_limit[1]), seq_idx, initial_states, store_ypre)
    if return_final_states:
        return out, final
    return out
