"""gated_rms_norm against an explicit per-group float64 reference."""

from __future__ import annotations

import pytest
import torch

from hybrid_train.ops import gated_rms_norm
from reference import gated_norm_reference

F64 = torch.float64


def make(seed, shape, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_(True)
    z = torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_(True)
    w = (1.0 + 0.3 * torch.randn(shape[-1], generator=gen, dtype=F64)).to(dtype).requires_grad_(True)
    return x, z, w


@pytest.mark.parametrize("group_size", [None, 8, 24])
@pytest.mark.parametrize("gated", [True, False])
def test_matches_reference(group_size, gated):
    x, z, w = make(1 if gated else 2, (2, 5, 48))
    z = z if gated else None
    out = gated_rms_norm(x, z, w, eps=1e-5, group_size=group_size)
    ref = gated_norm_reference(x, z, w, eps=1e-5, group_size=group_size)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    leaves = [x, w] + ([z] if gated else [])
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    for a, r in zip(torch.autograd.grad((out * gy).sum(), leaves),
                    torch.autograd.grad((ref * gy).sum(), leaves)):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)


def test_group_size_none_is_one_group():
    x, z, w = make(4, (3, 32))
    torch.testing.assert_close(gated_rms_norm(x, z, w), gated_rms_norm(x, z, w, group_size=32))
    # and grouping really changes the statistics
    assert not torch.allclose(gated_rms_norm(x, z, w), gated_rms_norm(x, z, w, group_size=8))


def test_gate_applied_before_norm():
    """norm_before_gate=False: rmsnorm(x * silu(z)), not rmsnorm(x) * silu(z)."""
    x, z, w = make(5, (4, 16))
    out = gated_rms_norm(x, z, w, eps=0.0, group_size=8)
    gate_after = gated_rms_norm(x, None, w, eps=0.0, group_size=8) * torch.nn.functional.silu(z)
    assert not torch.allclose(out, gate_after)
    # with eps = 0, each group of the output has unit RMS before the weight
    normed = (out / w).unflatten(-1, (2, 8))
    torch.testing.assert_close(normed.square().mean(-1), torch.ones(4, 2, dtype=F64), rtol=1e-12, atol=1e-12)


def test_bf16_in_bf16_out():
    x, z, w = make(6, (2, 7, 64), dtype=torch.bfloat16)
    w32 = w.detach().float()
    out = gated_rms_norm(x, z, w32, group_size=16)
    assert out.dtype == torch.bfloat16
    ref = gated_norm_reference(x, z, w32, group_size=16)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
