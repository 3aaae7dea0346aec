"""Slow float64 references for the ops in hybrid_train.ops, written independently of them.

Everything here is the definition, step by step: a per-token loop for the SSD recurrence,
F.conv1d applied to each document separately, an explicit loop over norm groups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def softplus_ref(v: torch.Tensor) -> torch.Tensor:
    # log(1 + e^v), returning v itself above 20 (the convention of the fused kernels)
    return torch.where(v > 20.0, v, torch.log1p(torch.exp(torch.clamp(v, max=20.0))))


def silu_ref(v: torch.Tensor) -> torch.Tensor:
    return v / (1.0 + torch.exp(-v))


def ssd_reference(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
    dt_limit=(0.0, math.inf), seq_idx=None, initial_states=None,
):
    """Sequential SSD in float64. Returns (y (b,l,h,p), final_state (b,h,p,n))."""
    f64 = torch.float64
    x, dt, A, B, C = (t.to(f64) for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    heads_per_group = h // g
    group_of_head = torch.arange(h) // heads_per_group  # (h)

    if dt_bias is not None:
        dt = dt + dt_bias.to(f64)
    if dt_softplus:
        dt = softplus_ref(dt)
    lo, hi = dt_limit
    if not (lo == 0.0 and hi == math.inf):
        dt = torch.minimum(torch.maximum(dt, torch.full_like(dt, lo)), torch.full_like(dt, hi))

    if initial_states is not None:
        S = initial_states.to(f64)
    else:
        S = torch.zeros(b, h, p, n, dtype=f64)
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            # a new document starts from a zero state
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1]).to(f64)  # (b)
            S = S * (1.0 - new_doc)[:, None, None, None]
        Bt = B[:, t][:, group_of_head]  # (b, h, n)
        Ct = C[:, t][:, group_of_head]  # (b, h, n)
        a = torch.exp(dt[:, t] * A)  # (b, h)
        S = a[:, :, None, None] * S + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        yt = (S * Ct[:, :, None, :]).sum(-1)  # (b, h, p)
        if D is not None:
            Dd = D.to(f64)
            yt = yt + x[:, t] * (Dd[:, None] if Dd.dim() == 1 else Dd)
        if z is not None:
            yt = yt * silu_ref(z[:, t].to(f64))
        ys.append(yt)
    return torch.stack(ys, dim=1), S


def conv1d_reference(x, weight, bias=None, seq_idx=None, activation=None):
    """Depthwise causal conv via F.conv1d, run on each document on its own. Returns float64."""
    x = x.to(torch.float64)
    b, l, c = x.shape
    w = weight.reshape(c, 1, -1).to(torch.float64)
    k = w.shape[-1]
    bias = None if bias is None else bias.to(torch.float64)
    rows = []
    for bi in range(b):
        if seq_idx is None:
            bounds = [(0, l)]
        else:
            s = seq_idx[bi].tolist()
            starts = [0] + [t for t in range(1, l) if s[t] != s[t - 1]]
            bounds = list(zip(starts, starts[1:] + [l]))
        pieces = []
        for s0, s1 in bounds:
            seg = x[bi, s0:s1].t()[None]  # (1, c, len)
            out = F.conv1d(seg, w, bias, padding=k - 1, groups=c)[..., : s1 - s0]
            pieces.append(out[0].t())
        rows.append(torch.cat(pieces, dim=0))
    out = torch.stack(rows)
    if activation == "silu":
        out = silu_ref(out)
    return out


def gated_norm_reference(x, z, weight, eps=1e-5, group_size=None):
    """rmsnorm(x * silu(z)) per group, times weight, in float64."""
    x = x.to(torch.float64)
    if z is not None:
        x = x * silu_ref(z.to(torch.float64))
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    out = torch.empty_like(x)
    for g0 in range(0, d, gs):
        part = x[..., g0 : g0 + gs]
        rms = torch.sqrt((part * part).sum(-1, keepdim=True) / gs + eps)
        out[..., g0 : g0 + gs] = part / rms
    return out * weight.to(torch.float64)


def assert_split_master_step_is_the_fp32_step(shapes, device, moments=torch.float32, steps: int = 3) -> None:
    """Clipped Triton AdamW steps (bf16 gradients) of split fp32 masters against the same steps of fp32
    parameters: after each, the halves are split_fp32 of what the fp32 parameter stepped to, which then
    goes on from their join as the split master does (the join differs at ties that round down)."""
    from hybrid_train.ops.fp32_halves import join_fp32, split_fp32
    from hybrid_train.ops.triton.adamw import adamw_steps

    halves = [split_fp32(torch.randn(s, device=device)) for s in shapes]
    plain = [join_fp32(*h) for h in halves]
    states = [[(torch.zeros(s, dtype=moments, device=device), torch.zeros(s, dtype=moments, device=device),
                torch.zeros((), device=device)) for s in shapes] for _ in range(2)]
    scale, skip = torch.tensor(3.0, device=device), torch.zeros((), device=device)
    for _ in range(steps):
        grads = [torch.randn(s, device=device).bfloat16() for s in shapes]
        for run, params in enumerate((plain, halves)):
            items = []
            for i, (param, grad, (m, v, step)) in enumerate(zip(params, grads, states[run])):
                step += 1
                high, low = param if run else (param, None)
                items.append((high, grad, m, v, step, low, i))
            adamw_steps(items, scale, skip, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
        for p, (high, low) in zip(plain, halves):
            expected_high, expected_low = split_fp32(p)
            assert torch.equal(high, expected_high) and torch.equal(low, expected_low)
            p.copy_(join_fp32(high, low))
    for (m0, v0, _), (m1, v1, _) in zip(*states):
        assert torch.equal(m0, m1) and torch.equal(v0, v1)
