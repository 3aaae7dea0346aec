"""ssd_chunk_scan against the sequential float64 recurrence in tests/reference.py."""

from __future__ import annotations

import math

import pytest
import torch

from hybrid_train.ops import ssd_chunk_scan
from reference import ssd_reference

F64 = torch.float64


def seq_from_starts(l: int, starts_per_row: list[list[int]], first_id: int = 3) -> torch.Tensor:
    """(b, l) int32 document ids, a new document at each listed start (ids need not start at 0)."""
    rows = []
    for starts in starts_per_row:
        flags = torch.zeros(l, dtype=torch.int32)
        flags[[s for s in starts if s > 0]] = 1
        rows.append(first_id + torch.cumsum(flags, 0, dtype=torch.int32))
    return torch.stack(rows)


def make_inputs(seed, b, l, h, p, g, n, *, D=None, z=False, dt_bias=False, softplus=False,
                init=False, signed_dt=False, dtype=F64):
    """Random leaf tensors (requires_grad) for one SSD call; never all zeros."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype)

    t = {
        "x": rnd(b, l, h, p),
        "A": -torch.exp(torch.empty(h, dtype=F64).uniform_(math.log(0.3), math.log(4.0), generator=gen)),
        "B": rnd(b, l, g, n, scale=0.5),
        "C": rnd(b, l, g, n, scale=0.5),
    }
    if softplus:
        # raw dt around inverse-softplus of ~0.1..0.7, as after the usual dt_bias init
        t["dt"] = rnd(b, l, h, scale=0.7) - 1.0
    else:
        lo = -0.1 if signed_dt else 0.02
        t["dt"] = (torch.rand(b, l, h, generator=gen, dtype=F64) * 0.5 + lo).to(dtype)
    if dt_bias:
        t["dt_bias"] = rnd(h, scale=0.5)
    if D == "h":
        t["D"] = rnd(h)
    elif D == "hp":
        t["D"] = rnd(h, p)
    if z:
        t["z"] = rnd(b, l, h, p)
    if init:
        t["initial_states"] = rnd(b, h, p, n, scale=0.5)
    for k in t:
        if k == "A" and dtype != F64:
            t[k] = t[k].float()
        t[k] = t[k].detach().requires_grad_(True)
    return t


def run_both(t, chunk, seq_idx=None, softplus=False, dt_limit=(0.0, math.inf)):
    """Returns ((y, final) fast, (y, final) reference) on the same leaves."""
    kw = {k: v for k, v in t.items() if k not in ("x", "dt", "A", "B", "C")}
    fast = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, dt_softplus=softplus,
                          dt_limit=dt_limit, seq_idx=seq_idx, return_final_states=True, **kw)
    ref = ssd_reference(t["x"], t["dt"], t["A"], t["B"], t["C"], dt_softplus=softplus,
                        dt_limit=dt_limit, seq_idx=seq_idx, **kw)
    return fast, ref


def grads_of(outputs, leaves, seed):
    """Gradients of a random linear functional of (y, final_state) w.r.t. every leaf."""
    y, final = outputs
    gen = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=gen, dtype=F64).to(y.dtype)
    wf = torch.randn(final.shape, generator=gen, dtype=F64).to(final.dtype)
    loss = (y.to(F64) * wy.to(F64)).sum() + (final.to(F64) * wf.to(F64)).sum()
    return torch.autograd.grad(loss, leaves)


CASES = {
    # name: (l, chunk, b, h, p, g, n, seq starts per row or None, options)
    "plain": (64, 16, 2, 4, 8, 1, 8, None, {}),
    "ragged_len_groups": (45, 16, 2, 4, 8, 2, 8, None, dict(D="h", z=True, init=True)),
    "shorter_than_chunk": (7, 16, 2, 2, 4, 1, 6, None,
                           dict(D="hp", init=True, softplus=True, dt_bias=True)),
    # a boundary exactly on a chunk boundary (32), a one-token document (32), documents spanning
    # several chunks, and a document that ends inside the padded last chunk
    "documents": (100, 16, 2, 6, 4, 2, 8, [[0, 32, 33, 70], [0, 5, 48, 95]],
                  dict(D="hp", z=True, softplus=True, dt_bias=True, init=True,
                       dt_limit=(0.05, 0.8))),
    # long documents over small chunks; last row ends with a one-token document
    "documents_long": (90, 8, 2, 4, 4, 4, 4, [[0, 40], [0, 8, 64, 89]],
                       dict(D="h", softplus=True, dt_bias=True, init=True)),
    # lower dt limit > 0 with a ragged length: padded steps must not pick up dt = 0.1
    "dt_limit_ragged": (50, 32, 1, 2, 4, 1, 4, None,
                        dict(softplus=True, dt_bias=True, dt_limit=(0.1, 0.6), init=True)),
    # dt_limit left at (0, inf) means no clamp at all: negative dt passes through, with gradient
    "unclamped_negative_dt": (30, 8, 1, 2, 4, 1, 4, None, dict(signed_dt=True, D="h")),
    "first_doc_inside_chunk": (40, 16, 1, 2, 4, 1, 4, [[0, 3, 16, 17]], dict(init=True, z=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_sequential_recurrence_fp64(name):
    l, chunk, b, h, p, g, n, starts, opts = CASES[name]
    opts = dict(opts)
    dt_limit = opts.pop("dt_limit", (0.0, math.inf))
    seed = sum(map(ord, name))
    t = make_inputs(seed, b, l, h, p, g, n, **opts)
    seq_idx = None if starts is None else seq_from_starts(l, starts)

    fast, ref = run_both(t, chunk, seq_idx, opts.get("softplus", False), dt_limit)
    assert fast[0].dtype == F64 and fast[0].shape == (b, l, h, p)
    assert fast[1].shape == (b, h, p, n)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-10, atol=1e-10)

    leaves = list(t.values())
    g_fast = grads_of(fast, leaves, seed + 1)
    g_ref = grads_of(ref, leaves, seed + 1)
    for key, a, r in zip(t, g_fast, g_ref):
        assert torch.count_nonzero(r) > 0, f"reference gradient of {key} is all zero"
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad {key}: {m}")


def test_documents_do_not_interact():
    """Changing one document's inputs leaves the other documents' outputs unchanged."""
    l, b, h, p, g, n = 48, 1, 2, 4, 1, 4
    t = make_inputs(7, b, l, h, p, g, n, init=True)
    seq_idx = seq_from_starts(l, [[0, 16, 30]])
    x2 = t["x"].detach().clone()
    x2[:, 16:30] += 1.0
    args = dict(seq_idx=seq_idx, initial_states=t["initial_states"], return_final_states=True)
    y1, f1 = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, **args)
    y2, f2 = ssd_chunk_scan(x2, t["dt"], t["A"], t["B"], t["C"], 8, **args)
    assert torch.equal(y1[:, :16], y2[:, :16]) and torch.equal(y1[:, 30:], y2[:, 30:])
    assert torch.equal(f1, f2)
    assert not torch.allclose(y1[:, 16:30], y2[:, 16:30])


def test_chunk_size_does_not_change_result():
    l, b, h, p, g, n = 77, 2, 4, 4, 2, 8
    t = make_inputs(11, b, l, h, p, g, n, D="h", z=True, dt_bias=True, softplus=True, init=True)
    seq_idx = seq_from_starts(l, [[0, 16, 50], [0, 31]])
    kw = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True, seq_idx=seq_idx,
              initial_states=t["initial_states"], return_final_states=True)
    outs = [ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], q, **kw) for q in (1, 4, 16, 64, 128)]
    for y, f in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f, outs[0][1], rtol=1e-12, atol=1e-12)


def test_fp32_inputs():
    l, b, h, p, g, n = 70, 2, 4, 8, 2, 16
    t = make_inputs(21, b, l, h, p, g, n, D="h", z=True, dt_bias=True, softplus=True, init=True,
                    dtype=torch.float32)
    seq_idx = seq_from_starts(l, [[0, 32], [0, 10, 50]])
    fast, ref = run_both(t, 32, seq_idx, softplus=True)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.float32
    torch.testing.assert_close(fast[0].double(), ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[1].double(), ref[1], rtol=1e-4, atol=1e-4)
    leaves = list(t.values())
    for key, a, r in zip(t, grads_of(fast, leaves, 5), grads_of(ref, leaves, 5)):
        assert a.dtype == t[key].dtype
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-3, atol=1e-3, msg=lambda m: f"grad {key}: {m}")


def test_bf16_inputs():
    l, b, h, p, g, n = 70, 2, 4, 8, 1, 16
    t = make_inputs(31, b, l, h, p, g, n, D="h", z=True, dt_bias=True, softplus=True, init=True,
                    dtype=torch.bfloat16)
    # parameters stay fp32, as in a mixed-precision model
    for key in ("A", "D", "dt_bias", "initial_states"):
        t[key] = t[key].detach().float().requires_grad_(True)
    seq_idx = seq_from_starts(l, [[0, 40], [0, 20]])
    fast, ref = run_both(t, 32, seq_idx, softplus=True)
    assert fast[0].dtype == torch.bfloat16 and fast[1].dtype == torch.float32
    # fp32 math on the same (bf16-valued) inputs: the error is the final rounding to bf16
    torch.testing.assert_close(fast[0].double(), ref[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fast[1].double(), ref[1], rtol=1e-4, atol=1e-4)
    y = fast[0]
    (gx,) = torch.autograd.grad((y.float() ** 2).sum(), [t["x"]])
    (gx_ref,) = torch.autograd.grad((ref[0] ** 2).sum(), [t["x"]])
    assert gx.dtype == torch.bfloat16
    torch.testing.assert_close(gx.double(), gx_ref.double(), rtol=3e-2, atol=5e-2)


def test_strong_decay_is_finite_and_correct():
    """|A| dt up to ~hundreds per step over 128-token chunks: log-decays reach -1e4 and below.

    The subtract-two-cumsums form overflows here (exp of large positive numbers above the
    diagonal) and gives NaN gradients; the masked-increment form stays finite and exact.
    """
    l, b, h, p, g, n = 256, 1, 4, 4, 1, 8
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(b, l, h, p, generator=gen).requires_grad_(True)
    dt = (torch.randn(b, l, h, generator=gen) + 2.0).requires_grad_(True)
    A = (-torch.exp(torch.empty(h).uniform_(2.0, 5.0, generator=gen))).requires_grad_(True)
    B = torch.randn(b, l, g, n, generator=gen).requires_grad_(True)
    C = torch.randn(b, l, g, n, generator=gen).requires_grad_(True)
    y, final = ssd_chunk_scan(x, dt, A, B, C, 128, dt_softplus=True, return_final_states=True)
    leaves64 = [v.detach().double().requires_grad_(True) for v in (x, dt, A, B, C)]
    y_ref, final_ref = ssd_reference(*leaves64, dt_softplus=True)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(y.sum() + final.sum(), [x, dt, A, B, C])
    for gr in grads:
        assert torch.isfinite(gr).all()
    grads_ref = torch.autograd.grad(y_ref.sum() + final_ref.sum(), leaves64)
    for gr, gr_ref in zip(grads, grads_ref):
        torch.testing.assert_close(gr.double(), gr_ref, rtol=1e-3, atol=1e-3)
