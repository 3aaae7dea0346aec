"""The AdamW step in Triton: read parameter, gradient and both moments once, write
parameter and moments once (28 bytes per fp32 parameter), the clip and the non-finite skip taken from
device scalars so that nothing is read back to the host.

The step count is a device scalar per tensor, already advanced by the caller (and advanced back when
the step is skipped), as torch's fused AdamW keeps it.

A split fp32 master (`low` given: hybrid_train/train/precision.py) is a bf16 parameter, the weight that
forward and backward use (the master rounded to nearest even, as autocast casts it), plus the int16 `low`
holding what the fp32 value has beyond it: the step rebuilds the fp32 value, updates it, and writes both
halves back (8 bytes instead of the 10 of an fp32 parameter with a bf16 copy beside it).
hybrid_train/ops/fp32_halves.py is the same arithmetic in PyTorch.

Moments held in bf16 (`optim.moment_dtype=bfloat16`: 20 bytes per fp32 parameter instead of 28) are
computed in fp32 and stored stochastically rounded: to the bf16 value above or below with the
probabilities that make the stored value exact in expectation. Rounding to nearest would drop every
EMA change smaller than half a bf16 ulp (2^-9 relative): with beta2 = 0.999 the second moment could no
longer decay. The random bits are a hash of the element's index, the tensor's index in the optimizer
and its step count, so a run and its resume round alike, with no generator state to checkpoint.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid_train.ops.triton.common import TL_DTYPE, block_table, device_rows

# 1024 elements over 4 warps: 4.10 TB/s on an H200 at 9B width, against 3.96 for 4096 over 8 (BENCHMARKS.md).
# Triton's CPU interpreter runs each program in numpy, so there fewer, larger programs are faster.
BLOCK, NUM_WARPS = 1024, 4
INTERPRETER_BLOCK = 4096


@triton.jit
def _bf16_bits(bits):
    """The bf16 bits (in a uint32) of fp32 `bits`, rounded to nearest even by bit arithmetic: what the GPU's
    conversion does, and what Triton's CPU interpreter (which truncates) then does too. NaN stays NaN
    (quieted)."""
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits >> 16) | 0x40, rounded)


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x (fp32) in dtype, bf16 rounded to nearest even (`_bf16_bits`)."""
    if dtype == tl.bfloat16:
        return _bf16_bits(x.to(tl.uint32, bitcast=True)).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _hash(x):
    """A 32-bit integer hash (lowbias32): neighbouring inputs give unrelated outputs."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _stochastic_bf16(x, noise):
    """x (fp32, finite) in bf16, rounded away from zero with probability (its 16 dropped bits) / 2^16,
    else toward zero: noise holds 16 uniform random bits. A carry into the exponent is the next binade's
    value, as it should be."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + noise) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _split(bits):
    """(high, low) halves (uint32s holding 16 bits each) of fp32 `bits`: high the bf16 rounding to nearest
    even (`_bf16_bits`, autocast's), low the difference as a signed int16, which `_join` adds back. A value
    exactly halfway that rounds down would need +2^15, one more than int16 holds: it keeps 2^15 - 1, one
    fp32 ulp toward zero (1 in 131,072 values, a 2^-24 relative change, under an fp32 update's own
    rounding). NaN stays NaN (quieted)."""
    high = _bf16_bits(bits)
    low = bits & 0xFFFF
    return high, tl.where((low == 0x8000) & (high == bits >> 16), 0x7FFF, low)


@triton.jit
def _join(high, low):
    """The fp32 value whose halves are `high` (bf16) and `low` (int16)."""
    bits = (high.to(tl.uint16, bitcast=True).to(tl.uint32) << 16) + low.to(tl.int32).to(tl.uint32, bitcast=True)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, offs, mask, step_ptr, scale_ptr, tensor_index,
                 lr, beta1, beta2, eps, weight_decay,
                 HAS_SCALE: tl.constexpr, SPLIT: tl.constexpr, STOCHASTIC_MOMENTS: tl.constexpr):
    """The step of the elements `offs` of one tensor."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(scale_ptr)
    if SPLIT:
        p = _join(tl.load(p_ptr + offs, mask=mask, other=0.0), tl.load(low_ptr + offs, mask=mask, other=0))
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    step = tl.load(step_ptr).to(tl.float32)
    p = p * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)  # torch: exp_avg.lerp_(grad, 1 - beta1)
    v = v * beta2 + (1.0 - beta2) * g * g
    bias1 = 1.0 - tl.exp2(step * tl.log2(beta1))
    bias2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2)))
    p = p - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
    if SPLIT:
        high, low = _split(p.to(tl.uint32, bitcast=True))
        tl.store(p_ptr + offs, high.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        tl.store(low_ptr + offs, low.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(p_ptr + offs, _rounded(p, p_ptr.dtype.element_ty), mask=mask)
    if STOCHASTIC_MOMENTS:  # bf16 moments: the low 16 random bits round m, the high 16 v
        key = _hash(step.to(tl.uint32) * 0x9E3779B9 + tensor_index.to(tl.uint32))
        noise = _hash(offs.to(tl.uint32) ^ key)
        tl.store(m_ptr + offs, _stochastic_bf16(m, noise & 0xFFFF), mask=mask)
        tl.store(v_ptr + offs, _stochastic_bf16(v, noise >> 16), mask=mask)
    else:
        tl.store(m_ptr + offs, _rounded(m, m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, _rounded(v, v_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["tensor_index"])  # one build for every tensor's index
def _adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, scale_ptr, skip_ptr, low_ptr, n, tensor_index,
    lr, beta1, beta2, eps, weight_decay,
    BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, SPLIT: tl.constexpr, STOCHASTIC_MOMENTS: tl.constexpr,
):
    """One tensor, a block of it per program."""
    if tl.load(skip_ptr) == 0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, offs, offs < n, step_ptr, scale_ptr, tensor_index,
                     lr, beta1, beta2, eps, weight_decay, HAS_SCALE, SPLIT, STOCHASTIC_MOMENTS)


@triton.jit
def _adamw_many_kernel(
    rows_ptr, block_tensor_ptr, block_index_ptr, scale_ptr, skip_ptr,
    lr, beta1, beta2, eps, weight_decay,
    P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr,
    BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, SPLIT: tl.constexpr, STOCHASTIC_MOMENTS: tl.constexpr,
):
    """Many tensors in one launch: program i steps block block_index[i] of tensor block_tensor[i], whose
    addresses, size and index are row block_tensor[i] of `rows` (ROW int64s each)."""
    if tl.load(skip_ptr) == 0:
        pid = tl.program_id(0)
        row = rows_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * 8
        offs = tl.load(block_index_ptr + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        _adamw_block(tl.load(row).to(tl.pointer_type(P_DT)), tl.load(row + 1).to(tl.pointer_type(G_DT)),
                     tl.load(row + 2).to(tl.pointer_type(M_DT)), tl.load(row + 3).to(tl.pointer_type(M_DT)),
                     tl.load(row + 5).to(tl.pointer_type(tl.int16)), offs, offs < tl.load(row + 6),
                     tl.load(row + 4).to(tl.pointer_type(tl.float32)), scale_ptr, tl.load(row + 7),
                     lr, beta1, beta2, eps, weight_decay, HAS_SCALE, SPLIT, STOCHASTIC_MOMENTS)


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: torch.Tensor, grad_scale: torch.Tensor | None, skip: torch.Tensor, *, lr: float,
               beta1: float, beta2: float, eps: float, weight_decay: float,
               low: torch.Tensor | None = None, tensor_index: int = 0) -> None:
    """In place on contiguous tensors of one shape; step, grad_scale and skip are 0-dim float32 tensors
    on the parameter's device (skip != 0: write nothing). With `low` (int16) the parameter is the bf16
    half of a split fp32 master (module doc). bf16 moments are rounded stochastically (module doc),
    seeded by tensor_index and the step count."""
    adamw_steps([(param, grad, exp_avg, exp_avg_sq, step, low, tensor_index)], grad_scale, skip, lr=lr,
                beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)


# Tensors below this many elements are stepped together, in one launch per combination of dtypes: a
# model has hundreds of norm weights, biases, A_log, D and dt_bias vectors, and stepping each with its
# own launch took the host longer than the GPU (13 ms a step for hybrid_1b's 291 tensors on an H200).
BATCHED_BELOW = 1 << 20


def adamw_steps(items, grad_scale: torch.Tensor | None, skip: torch.Tensor, *, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float) -> None:
    """adamw_step for each (param, grad, exp_avg, exp_avg_sq, step, low or None, tensor_index) of `items`,
    all with these hyperparameters: a launch each for large tensors, one per kind for the small ones."""
    small: dict[tuple, list] = {}
    for item in items:
        param, grad, exp_avg, exp_avg_sq, step, low, tensor_index = item
        assert param.is_contiguous() and grad.is_contiguous() and exp_avg.is_contiguous() and \
            exp_avg_sq.is_contiguous() and grad.shape == param.shape, "contiguous tensors of the parameter's shape"
        assert exp_avg.dtype == exp_avg_sq.dtype, "both moments in one dtype"
        assert low is None or (param.dtype == torch.bfloat16 and low.dtype == torch.int16 and low.shape == param.shape
                               and low.is_contiguous()), "a split master: bf16 parameter, int16 low half of its shape"
        if param.numel() < BATCHED_BELOW:
            kind = (param.device, param.dtype, grad.dtype, exp_avg.dtype, low is not None)
            small.setdefault(kind, []).append(item)
            continue
        block = BLOCK if param.is_cuda else INTERPRETER_BLOCK
        _adamw_kernel[(triton.cdiv(param.numel(), block),)](
            param, grad, exp_avg, exp_avg_sq, step, grad_scale if grad_scale is not None else skip, skip,
            low if low is not None else param, param.numel(), tensor_index,
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
            BLOCK=block, HAS_SCALE=grad_scale is not None, SPLIT=low is not None,
            STOCHASTIC_MOMENTS=exp_avg.dtype == torch.bfloat16, num_warps=NUM_WARPS,
        )
    for (device, p_dtype, g_dtype, m_dtype, split), group in small.items():
        block = BLOCK if device.type == "cuda" else INTERPRETER_BLOCK
        rows = device_rows([[p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), s.data_ptr(),
                             (low if low is not None else p).data_ptr(), p.numel(), i]
                            for p, g, m, v, s, low, i in group], device)
        block_tensor, block_index = block_table(tuple(p.numel() for p, *_ in group), block, device)
        _adamw_many_kernel[(block_tensor.numel(),)](
            rows, block_tensor, block_index, grad_scale if grad_scale is not None else skip, skip,
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
            P_DT=TL_DTYPE[p_dtype], G_DT=TL_DTYPE[g_dtype], M_DT=TL_DTYPE[m_dtype],
            BLOCK=block, HAS_SCALE=grad_scale is not None, SPLIT=split,
            STOCHASTIC_MOMENTS=m_dtype == torch.bfloat16, num_warps=NUM_WARPS,
        )
