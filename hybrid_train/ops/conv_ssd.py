"""The Mamba-2 mixer's middle: causal conv1d + SiLU on x, B and C, then the SSD scan, as one op.

Unfused, autograd keeps both the conv inputs (for the conv backward) and the conv outputs (for the SSD
backward): at Bamba-9B width that is 8448 channels per token per layer twice. The fused op keeps only
the conv inputs; its backward recomputes the conv outputs (one cheap depthwise pass) before the SSD
backward, then runs the conv backward on the SSD's input gradients.

``conv_ssd_scan`` runs the fused Triton op when hybrid_train.ops.dispatch enables ``mixer`` (and the
``ssd`` and ``conv1d`` kernels it is made of) and the SSD kernels cover the call; otherwise the plain
sequence ``causal_conv1d`` x 3 -> ``ssd_chunk_scan``, each of which dispatches on its own.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from hybrid_train.ops.conv1d import causal_conv1d
from hybrid_train.ops.dispatch import use_triton
from hybrid_train.ops.library import kernel_op
from hybrid_train.ops.ssd import chunk_states_like, ssd_chunk_scan, triton_unsupported

__all__ = ["conv_ssd_scan"]


def conv_ssd_scan(
    x: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[torch.Tensor | None],
    dt: torch.Tensor,
    A: torch.Tensor,
    chunk_size: int,
    head_dim: int,
    d_state: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """ssd_chunk_scan(silu(conv(x)), dt, A, silu(conv(B)), silu(conv(C)), ...) without keeping the conv outputs.

    Args:
        x: (b, l, h*p) SSD input before its conv; heads of ``head_dim`` channels.
        B, C: (b, l, g*n) before their convs; groups of ``d_state`` channels.
        conv_weights: the depthwise conv kernels of x, B and C, each (c, k) or (c, 1, k).
        conv_biases: their biases, each (c) or None.
        dt, A, chunk_size, D, dt_bias, dt_softplus, dt_limit, seq_idx: as ``ssd_chunk_scan``; seq_idx
            also masks the conv taps across documents.

    Returns:
        y (b, l, h*p) in x's dtype.
    """
    b, l, _ = x.shape
    assert x.shape[-1] % head_dim == 0 and B.shape[-1] % d_state == 0, "x / B channels must be heads / groups"
    assert C.shape == B.shape, "B and C must have the same shape"
    xh = x.unflatten(-1, (-1, head_dim))  # (b, l, h, p)
    Bg = B.unflatten(-1, (-1, d_state))  # (b, l, g, n)
    # The fused op runs the conv1d and SSD kernels: forcing either to the reference turns it off too.
    if (triton_unsupported(xh, Bg, chunk_size) is None  # dtype, chunk and sizes, as the SSD kernels
            and all(use_triton(x, op=op) for op in ("mixer", "ssd", "conv1d"))):
        ws = [(w.squeeze(1) if w.dim() == 3 else w).contiguous() for w in conv_weights]  # (c, k) each
        return _conv_ssd_op(
            _unit(x), _unit(B), _unit(C), ws[0], conv_biases[0], ws[1], conv_biases[1], ws[2], conv_biases[2],
            dt, A.contiguous(), D.contiguous() if D is not None else None,
            dt_bias.contiguous() if dt_bias is not None else None, seq_idx,
            int(chunk_size), int(head_dim), int(d_state), bool(dt_softplus), float(dt_limit[0]), float(dt_limit[1]),
        )[0]
    xc, Bc, Cc = (causal_conv1d(u, w, bias, seq_idx, "silu")
                  for u, w, bias in zip((x, B, C), conv_weights, conv_biases))
    y = ssd_chunk_scan(
        xc.unflatten(-1, (-1, head_dim)),  # (b, l, h, p)
        dt, A,
        Bc.unflatten(-1, (-1, d_state)),  # (b, l, g, n)
        Cc.unflatten(-1, (-1, d_state)),
        chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, seq_idx=seq_idx,
    )
    return y.reshape(b, l, -1)  # (b, l, h*p)


def _unit(t: torch.Tensor) -> torch.Tensor:
    """The conv kernels read channels as the contiguous dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- Triton path: custom ops (hybrid_train/ops/library.py), so torch.compile traces through without graph breaks ----


def _convs(x, B, C, wx, bx, wB, bB, wC, bC, seq_idx):
    from hybrid_train.ops.triton.conv1d import conv1d_fwd

    return [conv1d_fwd(u, w, bias, seq_idx, True) for u, w, bias in ((x, wx, bx), (B, wB, bB), (C, wC, bC))]


def _conv_ssd_fake(x, B, C, wx, bx, wB, bB, wC, bC, dt, A, D, dt_bias, seq_idx, chunk_size, head_dim, d_state,
                   dt_softplus, dt_lo, dt_hi):
    return (x.new_empty(x.shape),
            *chunk_states_like(x.unflatten(-1, (-1, head_dim)), B.unflatten(-1, (-1, d_state)), chunk_size))


def _conv_ssd_bwd_fake(dy, x, B, C, wx, bx, wB, bB, wC, bC, dt, A, D, dt_bias, seq_idx, chunk_size, head_dim,
                       d_state, dt_softplus, dt_lo, dt_hi, dtp, acs, states, cb):
    like = [x, B, C, wx, bx, wB, bB, wC, bC, dt, A, D, dt_bias]
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)
            for t in like]


_N_TENSORS = 14  # x, B, C, wx, bx, wB, bB, wC, bC, dt, A, D, dt_bias, seq_idx; then the scalar arguments


def _conv_ssd_setup(ctx, inputs, output):
    # the conv inputs, never the conv outputs; and the scan's chunk states
    ctx.save_for_backward(*inputs[:_N_TENSORS], *output[1:])
    ctx.args = inputs[_N_TENSORS:]


def _conv_ssd_backward(ctx, dy, *_no_grads):
    tensors = ctx.saved_tensors  # once: under activation checkpointing a second unpack is an error
    saved, chunk_states = tensors[:_N_TENSORS], tensors[_N_TENSORS:]
    grads = _conv_ssd_bwd_op(dy, *saved, *ctx.args, *chunk_states)
    # one gradient per tensor input but seq_idx, in order; None for absent optional inputs
    return (*(g if t is not None else None for g, t in zip(grads, saved)), *(None,) * (1 + len(ctx.args)))


@kernel_op("hybrid_train::conv_ssd_fwd", _conv_ssd_fake, _conv_ssd_setup, _conv_ssd_backward)
def _conv_ssd_op(
    x: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    wx: torch.Tensor, bx: Optional[torch.Tensor], wB: torch.Tensor, bB: Optional[torch.Tensor],
    wC: torch.Tensor, bC: Optional[torch.Tensor],
    dt: torch.Tensor, A: torch.Tensor, D: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
    seq_idx: Optional[torch.Tensor], chunk_size: int, head_dim: int, d_state: int,
    dt_softplus: bool, dt_lo: float, dt_hi: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (b, l, h*p), then the scan's dtp, acs, states, cb for the backward); the conv outputs live
    only inside this call."""
    from hybrid_train.ops.triton.ssd_fwd import ssd_fwd

    b, l, _ = x.shape
    xc, Bc, Cc = _convs(x, B, C, wx, bx, wB, bB, wC, bC, seq_idx)
    y, _, _, chunk_states = ssd_fwd(xc.view(b, l, -1, head_dim), dt, A, Bc.view(b, l, -1, d_state),
                                    Cc.view(b, l, -1, d_state), chunk_size, D, None, dt_bias, dt_softplus,
                                    (dt_lo, dt_hi), seq_idx, None, False)
    return y.view(b, l, -1), *chunk_states


@kernel_op("hybrid_train::conv_ssd_bwd", _conv_ssd_bwd_fake)
def _conv_ssd_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    wx: torch.Tensor, bx: Optional[torch.Tensor], wB: torch.Tensor, bB: Optional[torch.Tensor],
    wC: torch.Tensor, bC: Optional[torch.Tensor],
    dt: torch.Tensor, A: torch.Tensor, D: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
    seq_idx: Optional[torch.Tensor], chunk_size: int, head_dim: int, d_state: int,
    dt_softplus: bool, dt_lo: float, dt_hi: float, dtp: torch.Tensor, acs: torch.Tensor, states: torch.Tensor,
    cb: torch.Tensor,
) -> list[torch.Tensor]:
    """[dx, dB, dC, dwx, dbx, dwB, dbB, dwC, dbC, ddt, dA, dD, ddt_bias]; empty tensors for absent inputs."""
    from hybrid_train.ops.triton.conv1d import conv1d_bwd
    from hybrid_train.ops.triton.ssd_bwd import ssd_bwd

    b, l, _ = x.shape
    xc, Bc, Cc = _convs(x, B, C, wx, bx, wB, bB, wC, bC, seq_idx)
    dxc, ddt, dA, dBc, dCc, dD, _, ddt_bias, _ = ssd_bwd(
        dy.reshape(b, l, -1, head_dim), xc.view(b, l, -1, head_dim), dt, A, Bc.view(b, l, -1, d_state),
        Cc.view(b, l, -1, d_state), chunk_size, D, None, dt_bias, dt_softplus, (dt_lo, dt_hi), seq_idx, None, None,
        None, (dtp, acs, states, cb))
    del xc, Bc, Cc  # free the recomputed conv outputs before the conv backward allocates
    d_in, d_conv = [], []
    for dout, u, w, bias in ((dxc, x, wx, bx), (dBc, B, wB, bB), (dCc, C, wC, bC)):
        du, dw, db = conv1d_bwd(_unit(dout.reshape(b, l, -1)), u, w, bias, seq_idx, True)
        d_in.append(du)
        d_conv += [dw.to(w.dtype), db.to(bias.dtype) if bias is not None else x.new_empty(0)]
    # a fresh empty tensor per absent input: outputs of a custom op may not alias each other
    return [*d_in, *d_conv, ddt, dA, dD if D is not None else x.new_empty(0),
            ddt_bias if dt_bias is not None else x.new_empty(0)]

