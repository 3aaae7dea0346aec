"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hybrid_train.ops.dispatch import interpreting

# Launch parameters per kernel, measured on an H100 (scripts/bench_kernels.py --sweep); a dict so the
# benchmark can try variants in one process. Keys are kernel names without the leading underscore.
LAUNCH: dict = {
    "ssd_blk": 64,  # tile of rows / columns inside an SSD chunk (tests lower it to get several per chunk)
    "cb": dict(num_warps=4),
    "dt_cumsum": dict(num_warps=4, BH=16),
    "state_fwd": dict(num_warps=4, num_stages=3),
    # one stage: x feeds the tensor cores as loaded, and a second buffer would cost residency
    "scan_fwd": dict(num_warps=4, num_stages=1, maxnreg=128, BM=64, HB=1),
    "cb_dtype": "input",  # C.B per chunk kept in the inputs' dtype ("input") or in "fp32"
    # 128 registers (a few spills) let all b x h x 2 programs be resident at once at Bamba's shape
    "state_bwd": dict(num_warps=4, maxnreg=128),
    "dx": dict(num_warps=4, num_stages=1),
    "dcb": dict(num_warps=4, num_stages=1),
    "dcb_programs": 12 * 132,  # the dCB kernel splits each group's heads until about this many programs
    "dbc_state": dict(num_warps=8),
    "dbc_programs": 128,  # likewise for the dB/dC-state kernel (at Bamba's shape: no split)
    "dt_bwd": dict(num_warps=1),  # one warp per (batch, chunk, head): many resident programs
    "state_blocks": dict(bp=64, bn=128),  # forward
    "state_bwd_blocks": dict(bp=64, bn=64),
}


def launch(name: str) -> dict:
    """Triton launch options (num_warps, num_stages, maxnreg) for a kernel, from LAUNCH."""
    return {k: v for k, v in LAUNCH[name].items() if k in ("num_warps", "num_stages", "maxnreg")}


TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype):
    """Operand dtype for tl.dot: the input dtype on the GPU (tensor cores, fp32 accumulation).

    Under TRITON_INTERPRET the operands go through fp32 instead: the interpreter's bf16 dot returns
    garbage (triton 3.9), and fp32 on the CPU costs nothing extra.
    """
    if interpreting():
        return tl.float32
    return TL_DTYPE[dtype]


def pow2_at_least_16(v: int) -> int:
    """tl.dot needs every dim >= 16 and tl.arange powers of two."""
    return max(16, triton.next_power_of_2(v))


def dt_limit_args(dt_limit) -> tuple[float, float, bool]:
    """(lo, hi, has_limit) for ``process_dt``: no clamp for (0, inf), and an infinite hi passed as the
    largest float32-range number (a kernel's float argument)."""
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    return lo, hi if hi != float("inf") else 3.0e38, (lo, hi) != (0.0, float("inf"))


@triton.jit
def softplus(v):
    # log(1 + e^v), and v itself above 20: torch's softplus threshold, the one mamba_ssm uses.
    return tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))


@triton.jit
def process_dt(raw, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, lo, hi):
    """Raw dt -> dt: + bias, softplus, clamp to [lo, hi] (only when a limit other than (0, inf) is set)."""
    v = raw
    if HAS_BIAS:
        v = v + bias
    if SOFTPLUS:
        v = softplus(v)
    if HAS_LIMIT:
        v = tl.minimum(tl.maximum(v, lo), hi)
    return v


def block_table(sizes: tuple[int, ...], block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, block within the tensor) of every block of tensors of these sizes, as int32 tensors on device,
    for a kernel that walks many tensors in one launch: the same every step, so built once per stream (a
    table is then only read on the stream whose allocator holds it: the optimizer may step on a side stream,
    hybrid_train/train/overlap.py)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    return _block_table(sizes, block, device, stream)


# Room for every group of a step: a model's small tensors, stepped per module (32 blocks) and per kind.
@functools.lru_cache(maxsize=512)
def _block_table(sizes: tuple[int, ...], block: int, device: torch.device,
                 stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.tensor([triton.cdiv(n, block) for n in sizes])
    tensor = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    first = torch.cumsum(counts, 0) - counts
    index = torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)
    return tensor.to(device, torch.int32), index.to(device, torch.int32)


def device_rows(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """A table of int64 rows (addresses, sizes) on device: on a GPU through a pinned copy, queued, so the
    host does not wait."""
    table = torch.tensor(rows, dtype=torch.int64)
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table
