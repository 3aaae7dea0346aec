"""causal_conv1d against F.conv1d and a per-document F.conv1d reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_train.ops import causal_conv1d
from reference import conv1d_reference

F64 = torch.float64


def make(seed, b, l, c, k, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, c, generator=gen, dtype=F64).to(dtype).requires_grad_(True)
    w = (torch.randn(c, k, generator=gen, dtype=F64) * 0.5).to(dtype).requires_grad_(True)
    bias = torch.randn(c, generator=gen, dtype=F64).to(dtype).requires_grad_(True)
    return x, w, bias


def seq_from_starts(l, starts_per_row):
    rows = []
    for starts in starts_per_row:
        flags = torch.zeros(l, dtype=torch.int32)
        flags[[s for s in starts if s > 0]] = 1
        rows.append(torch.cumsum(flags, 0, dtype=torch.int32))
    return torch.stack(rows)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("l", [1, 3, 37])
def test_matches_torch_conv1d(k, l):
    b, c = 2, 6
    x, w, bias = make(k * 100 + l, b, l, c, k)
    out = causal_conv1d(x, w, bias)
    # F.conv1d is a cross-correlation: with k - 1 zeros on the left, output t sees x[t-k+1 .. t]
    ref = F.conv1d(x.transpose(1, 2), w.unsqueeze(1), bias, padding=k - 1, groups=c)[..., :l]
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-12, atol=1e-12)
    assert out.shape == (b, l, c) and out.dtype == F64


def test_nn_conv1d_weight_layout():
    b, l, c, k = 2, 20, 5, 4
    x, w, bias = make(3, b, l, c, k)
    torch.testing.assert_close(causal_conv1d(x, w.unsqueeze(1), bias), causal_conv1d(x, w, bias))
    conv = torch.nn.Conv1d(c, c, k, groups=c, padding=k - 1, dtype=F64)
    with torch.no_grad():
        conv.weight.copy_(w.unsqueeze(1))
        conv.bias.copy_(bias)
        ref = conv(x.transpose(1, 2))[..., :l].transpose(1, 2)
    torch.testing.assert_close(causal_conv1d(x, conv.weight, conv.bias), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_documents_and_gradients(activation):
    b, l, c, k = 2, 30, 6, 4
    x, w, bias = make(5, b, l, c, k)
    # documents of length 1, 2 and 3 (shorter than the kernel) as well as longer ones
    seq_idx = seq_from_starts(l, [[0, 1, 3, 6, 20], [0, 12, 13, 29]])
    out = causal_conv1d(x, w, bias, seq_idx=seq_idx, activation=activation)
    ref = conv1d_reference(x, w, bias, seq_idx=seq_idx, activation=activation)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # masking must matter for this input
    assert not torch.allclose(out, causal_conv1d(x, w, bias, activation=activation))

    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    grads = torch.autograd.grad((out * gy).sum(), [x, w, bias])
    grads_ref = torch.autograd.grad((ref * gy).sum(), [x, w, bias])
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)


def test_silu_and_no_bias():
    b, l, c, k = 1, 16, 4, 3
    x, w, _ = make(9, b, l, c, k)
    out = causal_conv1d(x, w, activation="silu")
    ref = conv1d_reference(x, w, activation="silu")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        causal_conv1d(x, w, activation="relu")


def test_bf16_keeps_dtype():
    b, l, c, k = 2, 33, 8, 4
    x, w, bias = make(13, b, l, c, k, dtype=torch.bfloat16)
    seq_idx = seq_from_starts(l, [[0, 10], [0, 32]])
    out = causal_conv1d(x, w, bias, seq_idx=seq_idx, activation="silu")
    assert out.dtype == torch.bfloat16
    ref = conv1d_reference(x, w, bias, seq_idx=seq_idx, activation="silu")
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    (gx,) = torch.autograd.grad(out.float().sum(), [x])
    assert gx.dtype == torch.bfloat16 and torch.isfinite(gx.float()).all()
