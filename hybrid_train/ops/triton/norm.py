"""Gated grouped RMSNorm, rmsnorm(x * silu(z)) * weight per group of channels, in Triton.

A program owns ROWS tokens of one group (group_size channels, padded to a power of two): forward
writes the output and 1/rms per (token, group); backward recomputes x * silu(z) from the inputs
(cheap, and saves storing it) and keeps the weight gradient of its rows in registers, written once
as a partial sum that the wrapper reduces in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_norm_fwd_kernel(
    x_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr,
    M, D, GS, NG, eps,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_Z: tl.constexpr,
):
    rb = tl.program_id(0)
    grp = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < GS
    ch = grp * GS + cols
    w = tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    for r in range(ROWS):
        row = rb.to(tl.int64) * ROWS + r
        if row < M:
            xv = tl.load(x_ptr + row * D + ch, mask=mask, other=0.0).to(tl.float32)
            if HAS_Z:
                zv = tl.load(z_ptr + row * D + ch, mask=mask, other=0.0).to(tl.float32)
                xv = xv * zv * tl.sigmoid(zv)
            rstd = 1.0 / tl.sqrt(tl.sum(xv * xv, 0) / GS + eps)
            tl.store(rstd_ptr + row * NG + grp, rstd)
            tl.store(out_ptr + row * D + ch, (xv * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_norm_bwd_kernel(
    x_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dx_ptr, dz_ptr, dwp_ptr,
    M, D, GS, NG, eps,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_Z: tl.constexpr,
):
    rb = tl.program_id(0)
    grp = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < GS
    ch = grp * GS + cols
    w = tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in range(ROWS):
        row = rb.to(tl.int64) * ROWS + r
        if row < M:
            xv = tl.load(x_ptr + row * D + ch, mask=mask, other=0.0).to(tl.float32)
            hv = xv
            if HAS_Z:
                zv = tl.load(z_ptr + row * D + ch, mask=mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(zv)
                hv = xv * zv * sig
            rstd = tl.load(rstd_ptr + row * NG + grp)
            g = tl.load(dout_ptr + row * D + ch, mask=mask, other=0.0).to(tl.float32)
            nh = hv * rstd  # normalised
            dw += g * nh
            gw = g * w
            # d/dh of h * rstd(h): rstd * (gw - nh * mean(gw * nh))
            dh = rstd * (gw - nh * (tl.sum(gw * nh, 0) / GS))
            if HAS_Z:
                tl.store(dx_ptr + row * D + ch, (dh * zv * sig).to(dx_ptr.dtype.element_ty), mask=mask)
                dsilu = sig * (1.0 + zv * (1.0 - sig))
                tl.store(dz_ptr + row * D + ch, (dh * xv * dsilu).to(dz_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(dx_ptr + row * D + ch, dh.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dwp_ptr + rb.to(tl.int64) * D + ch, dw, mask=mask)


def _rows(m: int) -> int:
    return 16 if m >= 16 * 264 else 4


def _warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def gated_norm_fwd(x, z, weight, eps, group_size, out_dtype=None):
    """x, z (m, d) contiguous; returns (out (m, d) in out_dtype (None: x.dtype), rstd (m, groups) fp32)."""
    m, d = x.shape
    ng = d // group_size
    block = triton.next_power_of_2(group_size)
    rows = _rows(m)
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    rstd = torch.empty(m, ng, device=x.device, dtype=torch.float32)
    _gated_norm_fwd_kernel[(triton.cdiv(m, rows), ng)](
        x, z if z is not None else x, weight, out, rstd, m, d, group_size, ng, eps,
        ROWS=rows, BLOCK=block, HAS_Z=z is not None, num_warps=_warps(block),
    )
    return out, rstd


def gated_norm_bwd(dout, x, z, weight, rstd, eps, group_size):
    """Returns (dx, dz or None, dweight)."""
    m, d = x.shape
    ng = d // group_size
    block = triton.next_power_of_2(group_size)
    rows = _rows(m)
    nrb = triton.cdiv(m, rows)
    dx = torch.empty_like(x)
    dz = torch.empty_like(z) if z is not None else None
    dwp = torch.empty(nrb, d, device=x.device, dtype=torch.float32)
    _gated_norm_bwd_kernel[(nrb, ng)](
        x, z if z is not None else x, weight, rstd, dout, dx, dz if dz is not None else dx, dwp,
        m, d, group_size, ng, eps, ROWS=rows, BLOCK=block, HAS_Z=z is not None, num_warps=_warps(block),
    )
    return dx, dz, dwp.sum(0).to(weight.dtype)
