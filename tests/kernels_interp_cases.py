"""The Triton kernels on CPU through Triton's interpreter, against the PyTorch references.

Runs only in a process started with TRITON_INTERPRET=1 and HYBRID_TRAIN_KERNELS=triton (set before
triton is imported): tests/test_kernels.py starts one, naming this file (its name keeps it out of the
default collection).
Shapes are small (the interpreter runs every program in numpy) but cover what the GPU shapes use:
several row/column tiles per chunk, documents (seq_idx) crossing chunk and tile boundaries,
one-token documents, ragged lengths, n_groups > 1, initial and final states, D per head and per
channel, the z gate, dt bias / softplus / limit; and the fused conv1d + SSD mixer op, alone and in a
model, with what it saves for backward.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from pathlib import Path

import pytest

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") or os.environ.get("HYBRID_TRAIN_KERNELS") != "triton":
    raise RuntimeError("run these cases through tests/test_kernels.py (TRITON_INTERPRET=1, HYBRID_TRAIN_KERNELS=triton)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from hybrid_train.model import ModelConfig, build_model  # noqa: E402
from hybrid_train.model.hybrid import Mamba2Mixer  # noqa: E402
from hybrid_train.ops import causal_conv1d, conv_ssd_scan, deterministic, gated_rms_norm, kernels_mode  # noqa: E402
from hybrid_train.ops.conv1d import causal_conv1d_torch  # noqa: E402
from hybrid_train.ops.cross_entropy import fused_linear_cross_entropy  # noqa: E402
from hybrid_train.ops.dispatch import set_kernels  # noqa: E402
from hybrid_train.ops.norm import gated_rms_norm_torch, rms_norm, rms_norm_torch  # noqa: E402
from hybrid_train.ops.ssd import ssd_chunk_scan, ssd_chunk_scan_torch  # noqa: E402
from hybrid_train.ops.triton.adamw import _rounded  # noqa: E402
from hybrid_train.ops.triton.common import LAUNCH  # noqa: E402
from reference import assert_split_master_step_is_the_fp32_step  # noqa: E402
from test_ssd import grads_of, make_inputs, seq_from_starts  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def small_tiles():
    # 16-row tiles, so that a 64-token chunk has 4 x 4 tiles (the off-diagonal paths run too), and
    # 16 x 16 state blocks, so that the state kernels split n as they do on the GPU; the forward
    # scan's 32-row blocks (16-wide tiles left of the block, one 32 x 32 diagonal tile), and two
    # heads per scan program where a group has two.
    saved = {k: LAUNCH[k] for k in ("ssd_blk", "state_blocks", "state_bwd_blocks", "scan_fwd")}
    LAUNCH.update(ssd_blk=16, state_blocks=dict(bp=16, bn=16), state_bwd_blocks=dict(bp=16, bn=16),
                  scan_fwd=dict(num_warps=4, BM=32, HB=2))
    yield
    LAUNCH.update(saved)


def rel(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def test_env_forces_triton():
    assert kernels_mode() == "triton"


SSD_CASES = {
    # name: (l, chunk, b, h, p, g, n, seq starts per row or None, options)
    # boundaries on a chunk boundary (64), on tile boundaries (16, 48), a one-token document (64),
    # a document ending in the padded last chunk; 4 x 4 tiles per chunk
    "documents_tiles": (100, 64, 2, 4, 16, 2, 32, [[0, 16, 64, 65, 90], [0, 5, 48, 99]],
                        dict(D="hp", z=True, softplus=True, dt_bias=True, init=True, dt_limit=(0.05, 0.8))),
    # one head per group, head and state dims padded to 16, 2 tiles per chunk, ragged length
    "ragged_groups": (45, 32, 2, 4, 8, 4, 8, None, dict(D="h", init=True)),
    # shorter than one chunk; unclamped negative dt passes through
    "short_negative_dt": (7, 16, 1, 2, 4, 1, 6, None, dict(signed_dt=True)),
    # whole chunks (no padding) with batch > 1 and two groups; 2 x 2 blocks of (p, n) in the state
    # kernels; B and C laid out time-major (b is not their outermost dim in memory)
    "whole_chunks_time_major_bc": (64, 32, 2, 4, 32, 2, 32, None,
                                   dict(D="h", dt_bias=True, softplus=True, init=True, time_major_bc=True)),
    # 6 heads: the dt kernel's 8-head block runs with two masked heads; a document starting mid-chunk
    "six_heads_documents": (70, 32, 1, 6, 8, 3, 16, [[0, 41]], dict(D="h", dt_bias=True, softplus=True)),
}


@pytest.mark.parametrize("name", list(SSD_CASES))
def test_ssd_matches_reference(name):
    l, chunk, b, h, p, g, n, starts, opts = SSD_CASES[name]
    opts = dict(opts)
    dt_limit = opts.pop("dt_limit", (0.0, math.inf))
    time_major_bc = opts.pop("time_major_bc", False)
    softplus = opts.get("softplus", False)
    seed = sum(map(ord, name))
    t = make_inputs(seed, b, l, h, p, g, n, dtype=torch.float32, **opts)
    if time_major_bc:  # same values, stored (l, b, g, n)
        for key in ("B", "C"):
            t[key] = t[key].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    seq_idx = None if starts is None else seq_from_starts(l, starts)
    extra = {k: v for k, v in t.items() if k not in ("x", "dt", "A", "B", "C")}
    y, final = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, dt_softplus=softplus,
                              dt_limit=dt_limit, seq_idx=seq_idx, return_final_states=True, **extra)
    t64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
    extra64 = {k: v for k, v in t64.items() if k not in ("x", "dt", "A", "B", "C")}
    y64, f64 = ssd_chunk_scan_torch(t64["x"], t64["dt"], t64["A"], t64["B"], t64["C"], chunk,
                                    dt_softplus=softplus, dt_limit=dt_limit, seq_idx=seq_idx,
                                    return_final_states=True, **extra64)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    assert rel(y, y64) < 1e-5 and rel(final, f64) < 1e-5
    g32 = grads_of((y, final), list(t.values()), seed + 1)
    g64 = grads_of((y64, f64), list(t64.values()), seed + 1)
    for key, a, r in zip(t, g32, g64):
        assert a.dtype == t[key].dtype
        assert rel(a, r) < 1e-4, f"grad {key}: {rel(a, r):.2e}"


def test_ssd_bf16_inputs_and_deterministic_backward():
    l, b, h, p, g, n = 64, 1, 2, 16, 1, 16
    t = make_inputs(5, b, l, h, p, g, n, D="h", dt_bias=True, softplus=True, init=True, dtype=torch.bfloat16)
    for key in ("A", "D", "dt_bias", "initial_states"):  # parameters stay fp32, as in the model
        t[key] = t[key].detach().float().requires_grad_(True)
    seq_idx = seq_from_starts(l, [[0, 20, 40]])
    extra = {k: v for k, v in t.items() if k not in ("x", "dt", "A", "B", "C")}
    deterministic(True)
    try:
        runs = []
        for _ in range(2):
            y, final = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 32, dt_softplus=True,
                                      seq_idx=seq_idx, return_final_states=True, **extra)
            runs.append((y, final, grads_of((y, final), list(t.values()), 3)))
    finally:
        deterministic(False)
    y, final, grads = runs[0]
    assert y.dtype == torch.bfloat16
    for a, b_ in zip(grads, runs[1][2]):
        assert torch.equal(a, b_), "backward is not bitwise reproducible"
    t64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
    extra64 = {k: v for k, v in t64.items() if k not in ("x", "dt", "A", "B", "C")}
    y64, f64 = ssd_chunk_scan_torch(t64["x"], t64["dt"], t64["A"], t64["B"], t64["C"], 32, dt_softplus=True,
                                    seq_idx=seq_idx, return_final_states=True, **extra64)
    assert rel(y, y64) < 1e-2 and rel(final, f64) < 1e-2
    for key, a, r in zip(t, grads, grads_of((y64, f64), list(t64.values()), 3)):
        assert rel(a, r) < 2e-2, f"grad {key}: {rel(a, r):.2e}"


def test_ssd_strong_decay_is_finite():
    """Log decays of -1e3 inside a chunk: masked entries never produce inf * 0."""
    gen = torch.Generator().manual_seed(4)
    b, l, h, p, n = 1, 64, 2, 16, 16
    x = torch.randn(b, l, h, p, generator=gen).requires_grad_(True)
    dt = (torch.randn(b, l, h, generator=gen) + 3.0).requires_grad_(True)
    A = torch.tensor([-40.0, -0.5]).requires_grad_(True)
    B = torch.randn(b, l, 1, n, generator=gen).requires_grad_(True)
    C = torch.randn(b, l, 1, n, generator=gen).requires_grad_(True)
    y = ssd_chunk_scan(x, dt, A, B, C, 64, dt_softplus=True)
    leaves64 = [v.detach().double().requires_grad_(True) for v in (x, dt, A, B, C)]
    y64 = ssd_chunk_scan_torch(*leaves64, 64, dt_softplus=True)
    assert torch.isfinite(y).all() and rel(y, y64) < 1e-5
    grads = torch.autograd.grad(y.sum(), [x, dt, A, B, C])
    grads64 = torch.autograd.grad(y64.sum(), leaves64)
    for a, r in zip(grads, grads64):
        assert torch.isfinite(a).all() and rel(a, r) < 1e-4


def test_ssd_unsupported_chunk_raises_under_triton():
    t = make_inputs(1, 1, 8, 2, 4, 1, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 12)


@pytest.mark.parametrize("with_seq, l", [(True, 45), (False, 45), (True, 300)])  # 300: two backward time blocks
def test_conv1d_matches_reference(with_seq, l):
    gen = torch.Generator().manual_seed(7)
    b, c, k = 2, 150, 4
    starts = [[0, 5, 6, 30], [0, 40]] if l < 256 else [[0, 5, 255, 257], [0, 254]]
    seq_idx = seq_from_starts(l, starts) if with_seq else None
    x = torch.randn(b, l, c, generator=gen).requires_grad_(True)
    w = torch.randn(c, 1, k, generator=gen).requires_grad_(True)
    bias = torch.randn(c, generator=gen).requires_grad_(True) if with_seq else None
    act = "silu" if with_seq else None
    leaves = [v for v in (x, w, bias) if v is not None]
    y = causal_conv1d(x, w, bias, seq_idx, act)
    dy = torch.randn(y.shape, generator=gen)
    grads = torch.autograd.grad(y, leaves, dy)
    l64 = [v.detach().double().requires_grad_(True) for v in leaves]
    y64 = causal_conv1d_torch(l64[0], l64[1], l64[2] if bias is not None else None, seq_idx, act)
    assert rel(y, y64) < 1e-5
    for a, r in zip(grads, torch.autograd.grad(y64, l64, dy.double())):
        assert rel(a, r) < 1e-5


@pytest.mark.parametrize("with_z", [True, False])
def test_gated_norm_matches_reference(with_z):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 37, 96, generator=gen).requires_grad_(True)
    z = torch.randn(2, 37, 96, generator=gen).requires_grad_(True) if with_z else None
    w = (1 + 0.1 * torch.randn(96, generator=gen)).requires_grad_(True)
    leaves = [v for v in (x, z, w) if v is not None]
    y = gated_rms_norm(x, z, w, 1e-5, 32 if with_z else None)
    dy = torch.randn(y.shape, generator=gen)
    grads = torch.autograd.grad(y, leaves, dy)
    l64 = [v.detach().double().requires_grad_(True) for v in leaves]
    y64 = gated_rms_norm_torch(l64[0], l64[1] if with_z else None, l64[-1], 1e-5, 32 if with_z else None)
    assert rel(y, y64) < 1e-5
    for a, r in zip(grads, torch.autograd.grad(y64, l64, dy.double())):
        assert rel(a, r) < 1e-5


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32)])
def test_block_rms_norm_kernel_matches_float64(dtypes):
    """The blocks' RMSNorm on the Triton kernel (eager): float64 values and gradients, the result in the
    dtype the reference gives (fp32 weight on bf16 activations: fp32)."""
    x_dtype, w_dtype = dtypes
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 19, 160, generator=gen).to(x_dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(160, generator=gen)).to(w_dtype).requires_grad_(True)
    y = rms_norm(x, w, 1e-5)
    assert y.dtype == rms_norm_torch(x, w, 1e-5).dtype
    dy = torch.randn(y.shape, generator=gen).to(y.dtype)
    grads = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = (v.detach().double().requires_grad_(True) for v in (x, w))
    y64 = rms_norm_torch(x64, w64, 1e-5)
    tol = 1e-5 if x_dtype == torch.float32 else 1e-2
    assert rel(y.double(), y64) < tol
    for a, r in zip(grads, torch.autograd.grad(y64, (x64, w64), dy.double())):
        assert rel(a.double(), r) < tol


def test_block_rms_norm_under_autocast_writes_the_autocast_dtype():
    """autocast_output, under bf16 autocast: the kernel's fp32 result on the fp32 residual stream comes out in
    bf16 (what every reader would cast it to): the fp32 result rounded (the interpreter truncates where a GPU
    rounds to nearest: within one bf16 ulp), float64's values; and from a bf16 output gradient the fp32 x and
    weight gradients the fp32 output gives, to the bit. Without the flag, outside autocast and for bf16
    inputs, nothing changes."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 19, 160, generator=gen).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(160, generator=gen)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rms_norm(x, w, 1e-5, autocast_output=True)
        assert rms_norm(x, w, 1e-5).dtype == torch.float32
        assert rms_norm(x.detach().bfloat16(), w.detach().bfloat16(), 1e-5, autocast_output=True).dtype == torch.bfloat16
    y32 = rms_norm(x, w, 1e-5, autocast_output=True)
    assert (y.dtype, y32.dtype) == (torch.bfloat16, torch.float32)
    assert ((y.float() - y32).abs() <= y32.abs() * 2**-7).all()
    x64, w64 = (v.detach().double().requires_grad_(True) for v in (x, w))
    y64 = rms_norm_torch(x64, w64, 1e-5)
    assert rel(y.double(), y64) < 1e-2
    dy = torch.randn(y.shape, generator=gen).bfloat16()
    grads, grads32 = torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(y32, (x, w), dy.float())
    assert all(g.dtype == torch.float32 and torch.equal(g, g32) for g, g32 in zip(grads, grads32))
    for a, r in zip(grads, torch.autograd.grad(y64, (x64, w64), dy.double())):
        assert rel(a.double(), r) < 1e-5


def test_model_gradients_with_bf16_norm_outputs_are_as_close_to_float64(monkeypatch):
    """The blocks' norms writing bf16 under autocast (not the final norm's), their readers' gradients summed
    in bf16, against the same Triton model with fp32 norm outputs (each reader casting them, the gradients
    cast back and summed in fp32): a Mamba-2 + attention model with MLPs and logits_scaling, one forward and
    backward under bf16 autocast; every parameter's gradient about as close to float64's (the PyTorch ops on
    a float64 copy)."""
    from hybrid_train.model.hybrid import RMSNorm

    cfg = mixer_cfg(d_model=64, mlp_hidden=96, logits_scaling=4.0)
    torch.manual_seed(6)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))

    def grads(m, autocast: bool) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = m(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        return {n: p.grad.double() for n, p in m.named_parameters()}

    norms = [m for m in model.modules() if isinstance(m, RMSNorm) and m.autocast_output]
    assert len(norms) == 2 * cfg.n_layers and not model.norm.autocast_output
    dtypes = []
    model.norm.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    bf16_out = grads(model, True)
    for m in norms:
        m.autocast_output = False
    fp32_out = grads(model, True)
    assert dtypes == [torch.float32, torch.float32]  # the final norm's reader divides first: fp32 either way
    monkeypatch.setenv("HYBRID_TRAIN_KERNELS", "auto")
    set_kernels("torch")
    try:
        exact = grads(copy.deepcopy(model).double(), False)
    finally:
        set_kernels("auto")
    errors = {n: (rel(bf16_out[n], g), rel(fp32_out[n], g)) for n, g in exact.items() if g.norm() > 0}
    # (the interpreter truncates the bf16 it writes, where a GPU rounds to nearest: within 1.8x here; the
    # same bound on the GPU, tests/test_gpu.py)
    assert all(b < 2 * f + 1e-3 for b, f in errors.values()), errors
    assert bf16_out.keys() == fp32_out.keys() and any(not torch.equal(bf16_out[n], fp32_out[n]) for n in bf16_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_matches_float64(dtype):
    """silu(gate) * up on the Triton kernels (eager): float64's product and input gradients, across a block
    boundary and a partial last block; only gate and up kept for backward (PyTorch also keeps the SiLU)."""
    from hybrid_train.ops.swiglu import silu_mul, silu_mul_torch
    from hybrid_train.ops.triton.swiglu import BLOCK

    gen = torch.Generator().manual_seed(7)
    gate, up, dout = (torch.randn(3, BLOCK // 4 + 7, 5, generator=gen).to(dtype) for _ in range(3))
    leaves = [gate.requires_grad_(True), up.requires_grad_(True)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = silu_mul(gate, up)
    assert type(out.grad_fn).__name__ == "_SiluMulBackward" and out.dtype == dtype
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}
    grads = torch.autograd.grad(out, leaves, dout)
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    out64 = silu_mul_torch(*l64)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(out, out64) < tol
    for a, r in zip(grads, torch.autograd.grad(out64, l64, dout.double())):
        assert a.dtype == dtype and rel(a, r) < tol



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_swiglu_kernel_matches_float64(dtype):
    """silu(gate) * up of h = [gate | up] (the experts' layout) on the kernel: float64's product, and its
    gradient written packed as h is; rows of 2 * (BLOCK + 37) take two column blocks, the second partial.
    Only h is kept."""
    from hybrid_train.ops.swiglu import silu_mul_packed, silu_mul_packed_torch
    from hybrid_train.ops.triton.swiglu import BLOCK

    gen = torch.Generator().manual_seed(8)
    width = BLOCK + 37
    h = torch.randn(2, 3, 2 * width, generator=gen).to(dtype).requires_grad_(True)
    dout = torch.randn(2, 3, width, generator=gen).to(dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = silu_mul_packed(h)
    assert type(out.grad_fn).__name__ == "_SiluMulPackedBackward" and out.dtype == dtype and out.shape[-1] == width
    assert len(saved) == 1 and saved[0].data_ptr() == h.data_ptr()
    (dh,) = torch.autograd.grad(out, h, dout)
    h64 = h.detach().double().requires_grad_(True)
    out64 = silu_mul_packed_torch(h64)
    (dh64,) = torch.autograd.grad(out64, h64, dout.double())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(out, out64) < tol and dh.dtype == dtype and dh.is_contiguous() and rel(dh, dh64) < tol


def test_grouped_experts_with_the_packed_kernel_match_the_loop():
    """The experts' grouped path (one gate-and-up matmul, the packed kernel, one down matmul) against the
    per-expert loop of PyTorch ops, in fp32: outputs and every gradient."""
    from hybrid_train.model.moe import experts_grouped, experts_loop, grouped_mm_supported

    gen = torch.Generator().manual_seed(10)
    n_experts, d, hidden = 3, 16, 24
    x = torch.randn(11, d, generator=gen, requires_grad=True)
    gate_up = (0.3 * torch.randn(n_experts, 2 * hidden, d, generator=gen)).requires_grad_(True)
    down = (0.3 * torch.randn(n_experts, d, hidden, generator=gen)).requires_grad_(True)
    counts = torch.tensor([4, 0, 7])
    assert grouped_mm_supported(x, gate_up, down)
    dout = torch.randn(11, d, generator=gen)
    out = experts_grouped(x, gate_up, down, counts)
    assert "_SiluMulPackedBackward" in _graph_nodes(out)
    ref = experts_loop(x, gate_up, down, counts)
    grads = torch.autograd.grad(out, (x, gate_up, down), dout)
    refs = torch.autograd.grad(ref, (x, gate_up, down), dout)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, refs):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)

def _graph_nodes(out: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind out."""
    names, todo, seen = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def _compiled_with_graphs(fn, *args):
    """fn(*args) under torch.compile (fullgraph), with the FX graphs dynamo hands its backend, as text."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    return torch.compile(fn, backend=capture, fullgraph=True)(*args), graphs


def test_swiglu_keeps_pytorch_ops_under_compile_and_for_broadcasts():
    """Compiled, silu_mul is left to inductor (no kernel in the traced graph), and fake tensors get
    PyTorch's ops too; inputs of two shapes take PyTorch's broadcasting ops. A second derivative through
    the kernel raises rather than coming out as zero."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hybrid_train.ops.swiglu import silu_mul, silu_mul_torch

    with FakeTensorMode():
        assert silu_mul(torch.randn(4, 8), torch.randn(4, 8)).shape == (4, 8)
    gate = torch.randn(4, 8, requires_grad=True)
    (dgate,) = torch.autograd.grad(silu_mul(gate, torch.randn(4, 8)).sum(), gate, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dgate.sum(), gate)

    gate, up = torch.randn(8, 64), torch.randn(8, 64)
    compiled, graphs = _compiled_with_graphs(lambda a, b: silu_mul(a, b), gate, up)
    assert graphs and "silu" in graphs[0] and "SiluMul" not in graphs[0]
    torch.testing.assert_close(compiled, silu_mul_torch(gate, up))
    out = silu_mul(gate, up[:1])
    assert out.grad_fn is None and torch.equal(out, silu_mul_torch(gate, up[:1]))


def test_block_rms_norm_of_tensor_parallel_dtensors_keeps_pytorch_ops(tmp_path):
    """Under tensor parallelism the blocks' norms see DTensors (a custom op has no sharding rule for
    them): rms_norm keeps the PyTorch form there, on a real one-rank gloo mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x, w = torch.randn(2, 8, 64), 1 + 0.1 * torch.randn(64)
        xd, wd = distribute_tensor(x, mesh, [Shard(1)]), distribute_tensor(w, mesh, [Replicate()])
        out = rms_norm(xd, wd, 1e-5)
        assert type(out).__name__ == "DTensor"
        torch.testing.assert_close(out.full_tensor(), rms_norm_torch(x, w, 1e-5))
    finally:
        dist.destroy_process_group()


def test_block_rms_norm_stays_in_pytorch_ops_under_compile():
    """Compiled, the norm is left to inductor (which fuses it with the residual add): no custom op in
    the traced graph; eager runs the kernel."""
    x, w = torch.randn(8, 64), torch.ones(64)
    eager = rms_norm(x, w, 1e-5)
    compiled, graphs = _compiled_with_graphs(lambda a, b: rms_norm(a + 1.0, b, 1e-5), x - 1.0, w)
    assert graphs and not any("hybrid_train" in g for g in graphs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(eager, torch.ops.hybrid_train.gated_rms_norm_fwd(x, None, w, 1e-5, 64)[0])


@pytest.mark.parametrize("how", [dict(vocab_chunk=300), dict(keep_logits=True)])  # 4 ragged chunks | kept
def test_fused_linear_cross_entropy_matches_lm_loss(how):
    from hybrid_train.train.loss import lm_loss

    gen = torch.Generator().manual_seed(9)
    t, d, v = 50, 32, 1000
    h = torch.randn(t, d, generator=gen, dtype=F64)
    w = torch.randn(v, d, generator=gen, dtype=F64) * 0.3
    labels = torch.randint(0, v, (t,), generator=gen)
    labels[3] = -100
    h32, w32 = h.float().requires_grad_(True), w.float().requires_grad_(True)
    loss, ce = fused_linear_cross_entropy(h32, w32, labels, z_loss=1e-2, **how)
    loss.backward()
    h64, w64 = h.requires_grad_(True), w.requires_grad_(True)
    ref, ce_ref = lm_loss((h64 @ w64.T)[None], labels[None], 1e-2)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 and abs(ce.item() - ce_ref.item()) < 1e-5
    assert rel(h32.grad, h64.grad) < 1e-5 and rel(w32.grad, w64.grad) < 1e-5


def test_compile_traces_custom_ops_without_graph_breaks():
    t = make_inputs(2, 1, 40, 2, 16, 1, 16, D="h", dt_bias=True, softplus=True, dtype=torch.float32)
    w = torch.randn(32, 1, 4)
    nw = torch.ones(32)
    seq_idx = seq_from_starts(40, [[0, 17]])

    def mixer(x, dt, A, B, C, D, dt_bias):
        xc = causal_conv1d(x.flatten(2), w, None, seq_idx, "silu").view_as(x)
        y = ssd_chunk_scan(xc, dt, A, B, C, 32, D=D, dt_bias=dt_bias, dt_softplus=True, seq_idx=seq_idx)
        return gated_rms_norm(y.flatten(2), x.flatten(2), nw, 1e-5, 16)

    assert_compiled_matches_eager(mixer, [t[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")])


def assert_compiled_matches_eager(fn, args):
    """fullgraph=True fails on any graph break; aot_eager also traces the backward."""
    eager = fn(*args)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    assert rel(compiled, eager) < 1e-6
    for a, b_ in zip(torch.autograd.grad(compiled.square().sum(), args),
                     torch.autograd.grad(eager.square().sum(), args)):
        assert rel(a, b_) < 1e-5


# ---- the fused Mamba-2 mixer op (conv1d + SiLU on x, B, C, then the SSD scan) ----

MIXER_CASES = {
    # name: (l, chunk, b, h, p, g, n, k, seq starts per row or None, conv bias, options)
    # documents crossing chunk and tile boundaries, a one-token document, two groups, ragged length
    "documents_groups": (45, 32, 2, 4, 8, 2, 16, 4, [[0, 5, 6, 30], [0, 40]], True,
                         dict(D=True, dt_bias=True, dt_limit=(0.05, 0.8))),
    # one group, a 3-tap conv without bias, no D or dt_bias, ragged
    "plain": (37, 16, 1, 2, 16, 1, 8, 3, None, False, {}),
}


@pytest.fixture
def unfused_mixer():
    """The mixer's conv1d and SSD kernels, called one after the other (the fused op switched off)."""
    set_kernels("auto", torch_ops=("mixer",))
    yield
    set_kernels("auto")


def mixer_inputs(seed, b, l, h, p, g, n, k, bias, D=False, dt_bias=False, **_):
    gen = torch.Generator().manual_seed(seed)
    t = {"x": torch.randn(b, l, h * p, generator=gen), "B": torch.randn(b, l, g * n, generator=gen) * 0.5,
         "C": torch.randn(b, l, g * n, generator=gen) * 0.5}
    for name in ("x", "B", "C"):
        t["w" + name] = torch.randn(t[name].shape[-1], 1, k, generator=gen) * 0.5
        if bias:
            t["b" + name] = torch.randn(t[name].shape[-1], generator=gen) * 0.1
    t["dt"] = torch.randn(b, l, h, generator=gen) * 0.7 - 1.0
    t["A"] = -torch.empty(h).uniform_(0.3, 4.0, generator=gen)
    if D:
        t["D"] = torch.randn(h, generator=gen)
    if dt_bias:
        t["dt_bias"] = torch.randn(h, generator=gen) * 0.5
    return {key: v.requires_grad_(True) for key, v in t.items()}


def conv_ssd_call(t, chunk, p, n, seq_idx, dt_limit, reference=False):
    """conv_ssd_scan on the inputs t, or (reference) the unfused PyTorch reference ops."""
    names = ("x", "B", "C")
    weights, biases = [t["w" + c] for c in names], [t.get("b" + c) for c in names]
    opts = dict(D=t.get("D"), dt_bias=t.get("dt_bias"), dt_softplus=True, dt_limit=dt_limit, seq_idx=seq_idx)
    if not reference:
        return conv_ssd_scan(t["x"], t["B"], t["C"], weights, biases, t["dt"], t["A"], chunk, p, n, **opts)
    xc, Bc, Cc = (causal_conv1d_torch(t[c], w, bias, seq_idx, "silu") for c, w, bias in zip(names, weights, biases))
    b, l, _ = xc.shape
    y = ssd_chunk_scan_torch(xc.view(b, l, -1, p), t["dt"], t["A"], Bc.view(b, l, -1, n), Cc.view(b, l, -1, n),
                             chunk, **opts)
    return y.reshape(b, l, -1)


@pytest.mark.parametrize("name", list(MIXER_CASES))
def test_conv_ssd_matches_reference(name):
    l, chunk, b, h, p, g, n, k, starts, bias, opts = MIXER_CASES[name]
    dt_limit = opts.get("dt_limit", (0.0, math.inf))
    seq_idx = None if starts is None else seq_from_starts(l, starts)
    seed = sum(map(ord, name))
    t = mixer_inputs(seed, b, l, h, p, g, n, k, bias, **opts)
    saved = SavedBytes()
    with saved:
        y = conv_ssd_call(t, chunk, p, n, seq_idx, dt_limit)
    # the fused op keeps its inputs (the pre-conv x, B, C, the conv weights, dt, A, ...) and no conv
    # output; and the scan's per-chunk dt, log-decay cumsum (fp32), entering states (x's dtype) and
    # C.B (B's dtype)
    inputs = [*t.values(), *([seq_idx] if seq_idx is not None else [])]
    nc = -(-l // chunk)
    chunk_states = (2 * b * h * nc * chunk * 4
                    + b * nc * h * p * n * t["x"].element_size() + b * nc * g * chunk * chunk * t["B"].element_size())
    assert saved.bytes == sum(v.untyped_storage().nbytes() for v in inputs) + chunk_states
    t64 = {key: v.detach().double().requires_grad_(True) for key, v in t.items()}
    y64 = conv_ssd_call(t64, chunk, p, n, seq_idx, dt_limit, reference=True)
    assert y.dtype == torch.float32 and y.shape == (b, l, h * p)
    assert rel(y, y64) < 1e-5
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    for key, a, r in zip(t, torch.autograd.grad(y, list(t.values()), dy),
                         torch.autograd.grad(y64, list(t64.values()), dy.double())):
        assert a.dtype == t[key].dtype and a.shape == t[key].shape
        assert rel(a, r) < 1e-4, f"grad {key}: {rel(a, r):.2e}"


def test_compile_traces_conv_ssd_without_graph_breaks():
    l, chunk, b, h, p, g, n, k, starts, bias, opts = MIXER_CASES["documents_groups"]
    t = mixer_inputs(1, b, l, h, p, g, n, k, bias, **opts)
    seq_idx = seq_from_starts(l, starts)

    def fn(*leaves):
        return conv_ssd_call(dict(zip(t, leaves)), chunk, p, n, seq_idx, (0.0, math.inf))

    assert_compiled_matches_eager(fn, list(t.values()))


def mixer_cfg(**overrides) -> ModelConfig:
    base = dict(name="t", vocab_size=61, d_model=32, n_layers=2, attn_layer_indices=[1], mlp_hidden=48,
                n_heads=2, n_kv_heads=1, head_dim=16, ssm_d_state=16, ssm_head_dim=16, ssm_n_groups=2,
                ssm_chunk_size=16)
    base.update(overrides)
    return ModelConfig(**base).validate()


def test_model_with_fused_mixer_matches_unfused():
    cfg = mixer_cfg()
    torch.manual_seed(3)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 37))  # ragged: 3 chunks, the last one partial
    seq_idx = seq_from_starts(37, [[0, 10, 16, 17], [0, 30]])
    position_ids = torch.arange(37).expand(2, 37)  # positions do not matter for the comparison

    def run(torch_ops):
        set_kernels("auto", torch_ops=torch_ops)
        try:
            logits = model(ids, position_ids, seq_idx)
            logits.square().mean().backward()
        finally:
            set_kernels("auto")
        grads = {name: p.grad for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return logits.detach(), grads

    fused, g_fused = run(())
    unfused, g_unfused = run(("mixer",))
    assert rel(fused, unfused) < 1e-6
    for name, grad in g_fused.items():
        assert grad is not None and rel(grad, g_unfused[name]) < 1e-5, name


def test_fused_mixer_under_full_activation_checkpointing():
    """Recomputation unpacks the fused op's saved tensors: it must read them once (a second read fails)."""
    from hybrid_train.parallel.ac import apply_ac

    cfg = mixer_cfg(attn_layer_indices=[])
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(5))

    def grads(checkpointed):
        torch.manual_seed(5)
        model = build_model(cfg)
        if checkpointed:
            apply_ac(model, "full")
        model(ids).square().mean().backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    for name, grad in plain.items():
        assert torch.equal(recomputed[name], grad), name


@pytest.mark.parametrize("with_seq", [True, False])
def test_fused_mixer_saves_no_conv_outputs(with_seq):
    """Per token, the fused mixer saves exactly the conv outputs (x, B, C channels) less than the unfused one."""
    cfg = mixer_cfg()
    torch.manual_seed(4)
    mixer = Mamba2Mixer(cfg)
    mixer.init_weights(0.02, 0.02)
    mixer.to(torch.bfloat16)
    b, l = 2, 40
    u = torch.randn(b, l, cfg.d_model, dtype=torch.bfloat16, requires_grad=True)
    seq_idx = seq_from_starts(l, [[0, 7], [0, 20]]) if with_seq else None

    def saved_bytes(torch_ops):
        set_kernels("auto", torch_ops=torch_ops)
        try:
            with SavedBytes(mixer.parameters()) as saved:
                y = mixer(u, None, seq_idx)
            return saved.bytes, y
        finally:
            set_kernels("auto")

    fused, y_fused = saved_bytes(())
    unfused, y_unfused = saved_bytes(("mixer",))
    conv_channels = cfg.d_inner + 2 * cfg.ssm_n_groups * cfg.ssm_d_state
    assert (unfused - fused) / (b * l) == conv_channels * 2  # bf16
    assert torch.equal(y_fused, y_unfused)


def _bench_script():
    spec = importlib.util.spec_from_file_location("bench_script", Path(__file__).parents[1] / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SavedBytes = _bench_script().SavedBytes


def _adamw_pair(dtype, cfg):
    from hybrid_train.train.optim import build_optimizer

    torch.manual_seed(0)
    # odd sizes: a partial last block; more than one block (INTERPRETER_BLOCK 4096) in the first matrix
    model = torch.nn.Sequential(torch.nn.Linear(97, 61), torch.nn.LayerNorm(61), torch.nn.Linear(61, 5)).to(dtype)
    ref = torch.nn.Sequential(torch.nn.Linear(97, 61), torch.nn.LayerNorm(61), torch.nn.Linear(61, 5)).to(dtype)
    ref.load_state_dict(model.state_dict())
    return model, build_optimizer(model, cfg), ref


@pytest.mark.parametrize("dtype,batched_below", [(torch.float32, 1 << 20), (torch.bfloat16, 1 << 20),
                                                  (torch.float32, 0), (torch.float32, 1000)])
def test_triton_adamw_matches_torch_adamw_with_clip_and_skip(dtype, batched_below, monkeypatch):
    """Three steps (gradients below, far above, below max_norm) and a skipped one: the Triton step
    against torch's clip_grad_norm_ + single-tensor AdamW with the same hyperparameters. With every
    tensor in one batched launch (the default for tensors this small), each in its own, and mixed."""
    from hybrid_train.ops.triton import adamw
    from hybrid_train.parallel import grad_norm
    from hybrid_train.train.config import OptimConfig
    from hybrid_train.train.optim import TritonAdamW, clip_and_step

    monkeypatch.setattr(adamw, "BATCHED_BELOW", batched_below)
    launches = {"one": 0, "many": 0}
    for name, kernel in (("one", adamw._adamw_kernel), ("many", adamw._adamw_many_kernel)):
        class Counting:  # count the launches of each kernel
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launches[self.name] += 1
                return self.kernel[grid]
        monkeypatch.setattr(adamw, "_adamw_kernel" if name == "one" else "_adamw_many_kernel", Counting(kernel, name))

    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, impl="triton")
    model, opt, ref = _adamw_pair(dtype, cfg)
    assert isinstance(opt, TritonAdamW)
    ref_opt = torch.optim.AdamW(
        [{"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": 0.1},
         {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=tuple(cfg.betas), eps=cfg.eps,
        # bf16: torch's fused step, which also computes in fp32 and rounds once (its loop rounds each op)
        **(dict(foreach=False) if dtype == torch.float32 else dict(fused=True)))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for scale in (1e-3, 1e3, 1e-2):
        x = torch.randn(8, 97, dtype=dtype)
        (model(x).float().square().sum() * scale).backward()
        for p, q in zip(model.parameters(), ref.parameters()):  # the same gradients: a bf16 forward of
            q.grad = p.grad.clone()                             # weights one ulp apart would differ
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        assert clip_and_step(opt, grad_norm(model.parameters()), 1.0).item() == 0.0
        for o in (opt, ref_opt):
            o.zero_grad(set_to_none=True)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **tol)
    for p, q in zip(opt.state.values(), ref_opt.state.values()):
        assert p["step"].item() == q["step"].item() == 3
        torch.testing.assert_close(p["exp_avg"], q["exp_avg"], **tol)
        torch.testing.assert_close(p["exp_avg_sq"], q["exp_avg_sq"], **tol)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 97, dtype=dtype)).float().sum().backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    assert clip_and_step(opt, grad_norm(model.parameters()), 1.0).item() == 1.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(s["step"].item() == 3 for s in opt.state.values())
    # (per-tensor, batched) launches a step, the skipped one too, over the 2 groups: decay (the 97 x 61 and
    # 61 x 5 matrices) and none (three biases, the norm's weight). All batched: one per group; none: one per
    # tensor; below 1000 elements: the large matrix alone, the rest in one batch per group.
    per_step = {1 << 20: (0, 2), 0: (6, 0), 1000: (1, 2)}[batched_below]
    assert (launches["one"], launches["many"]) == tuple(4 * k for k in per_step), launches


def test_triton_adamw_takes_torch_adamw_state():
    """A checkpoint's optimizer state from torch's AdamW (step counts on the host) continues under the
    Triton step exactly as under torch's."""
    from hybrid_train.train.config import OptimConfig
    from hybrid_train.train.optim import build_optimizer

    model, opt, ref = _adamw_pair(torch.float32, OptimConfig(lr=1e-2, impl="triton"))
    ref_opt = build_optimizer(ref, OptimConfig(lr=1e-2, impl="loop"))
    x = torch.randn(8, 97)
    ref(x).square().sum().backward()
    ref_opt.step()
    model.load_state_dict(ref.state_dict())
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # (load_state_dict keeps the tensors it is given)
    for m, o in ((model, opt), (ref, ref_opt)):
        o.zero_grad(set_to_none=True)
        m(x * 2).square().sum().backward()
        o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _fsdp_triton_adamw(rank, world, init, xs, impl="triton"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hybrid_train.parallel import grad_norm
    from hybrid_train.train.config import OptimConfig
    from hybrid_train.train.optim import TritonAdamW, build_optimizer, clip_and_step

    model = torch.nn.Sequential(torch.nn.Linear(97, 61), torch.nn.LayerNorm(61), torch.nn.Linear(61, 5))
    model.load_state_dict(init)
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = build_optimizer(model, OptimConfig(lr=1e-2, impl=impl))
    assert isinstance(opt, TritonAdamW) == (impl == "triton")
    per = xs[0].shape[0] // world
    for scale, x in zip((1e-3, 1e3, 1e-2), xs):
        (model(x[rank * per:(rank + 1) * per]).square().mean() * scale).backward()  # FSDP averages over ranks
        clip_and_step(opt, grad_norm(model.parameters()), 1.0)
        opt.zero_grad(set_to_none=True)
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


def test_triton_adamw_steps_fsdp2_shards_as_one_process(reference_adamw):
    """FSDP2 over 2 gloo ranks: the Triton step on each rank's DTensor shards gives the single-process
    torch clip + AdamW weights."""
    from distributed import run_distributed

    from hybrid_train.train.config import OptimConfig

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(97, 61), torch.nn.LayerNorm(61), torch.nn.Linear(61, 5))
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    xs = [torch.randn(8, 97) for _ in range(3)]
    shards = run_distributed(_fsdp_triton_adamw, 2, init, xs)
    ref_opt = reference_adamw(ref, OptimConfig(lr=1e-2))
    for scale, x in zip((1e-3, 1e3, 1e-2), xs):
        (ref(x).square().mean() * scale).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    for name, value in ref.state_dict().items():  # (FSDP sums then divides the gradients: ulps apart)
        for got in shards:
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_triton_adamw_checkpoint_moves_to_torch_adamw_and_back(tmp_path):
    """DCP: a run stepped by the Triton AdamW resumes under torch's fused one and the reverse, with
    the moments and step counts it saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from hybrid_train.train.config import OptimConfig
    from hybrid_train.train.optim import build_optimizer

    x = torch.randn(8, 97)
    for first, second in (("triton", "fused"), ("fused", "triton")):
        model, _, _ = _adamw_pair(torch.float32, OptimConfig(lr=1e-2))
        opt = build_optimizer(model, OptimConfig(lr=1e-2, impl=first))
        for _ in range(2):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        saved = str(tmp_path / first)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=saved)
        resumed, _, _ = _adamw_pair(torch.float32, OptimConfig(lr=1e-2))
        resumed_opt = build_optimizer(resumed, OptimConfig(lr=1e-2, impl=second))
        msd, osd = get_state_dict(resumed, resumed_opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=saved)
        set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for m, o in ((model, opt), (resumed, resumed_opt)):
            m(x * 2).square().sum().backward()
            o.step()
        for p, q in zip(model.parameters(), resumed.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        for s in resumed_opt.state.values():
            assert float(s["step"]) == 3


def _steps_with_split(cfg, split: bool, grad_accum: int, steps: int = 3, moment_dtype: str = "float32",
                      by_module: bool = False):
    """`steps` clipped Triton-AdamW steps of a model under bf16 autocast, with or without bf16 weights on
    split fp32 masters; (cross entropies, gradient norms, final state dict, names of the split parameters).
    by_module: each step taken in the model's forward-unit groups, as OptimizerOverlap takes it."""
    from hybrid_train.parallel import total_norm
    from hybrid_train.train.config import OptimConfig
    from hybrid_train.train.optim import build_optimizer, clip_and_step
    from hybrid_train.train.overlap import step_groups
    from hybrid_train.train.precision import BF16Weights

    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(model, OptimConfig(lr=1e-2, impl="triton", moment_dtype=moment_dtype))
    weights = BF16Weights(model, enabled=split)
    if split:
        weights.attach(opt)
    groups = step_groups(model, [p for group in opt.param_groups for p in group["params"]])
    step = (lambda: [opt.step(only=params) for _, params in groups]) if by_module else None
    torch.manual_seed(1)
    ces, norms = [], []
    for _ in range(steps):
        for _ in range(grad_accum):
            ids = torch.randint(0, cfg.vocab_size, (2, 33))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, ce = model(ids[:, :-1], labels=ids[:, 1:])
            (loss / grad_accum).backward()
            if grad_accum > 1:
                weights.fold_grads()
            ces.append(ce.item())
        norm = total_norm(weights.grads(model.parameters()))
        norms.append(norm.item())
        assert clip_and_step(opt, norm, 0.5, step=step).item() == 0.0
        opt.zero_grad(set_to_none=True)
    if split:  # a non-finite step writes neither half
        before = {p: (p.detach().clone(), low.clone()) for p, low in weights.low.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids[:, :-1], labels=ids[:, 1:])[0].backward()
        next(iter(weights.low)).grad.view(-1)[0] = float("nan")
        assert clip_and_step(opt, total_norm(weights.grads(model.parameters())), 0.5, step=step).item() == 1.0
        assert all(torch.equal(p, b[0]) and torch.equal(weights.low[p], b[1]) for p, b in before.items())
        opt.zero_grad(set_to_none=True)
    names = {n for n, p in model.named_parameters() if p in weights.low}
    return ces, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}, names


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_bf16_weights_on_split_masters_train_as_autocast(grad_accum, monkeypatch):
    """A hybrid with Mamba-2, attention and MoE blocks, three clipped steps under bf16 autocast: with bf16
    weights on split fp32 masters (forward and backward on the bf16 halves) the cross entropies and gradient
    norms are plain autocast's, which casts fp32 weights itself, and so are the fp32 masters, to the bit but
    for the rare value halfway between two bf16 values, kept one fp32 ulp off (precision.py)."""
    monkeypatch.setenv("HYBRID_TRAIN_KERNELS", "auto")
    set_kernels("torch")  # the model's ops in PyTorch (fast here); the AdamW step through the interpreter
    try:
        cfg = mixer_cfg(moe_n_experts=4, moe_top_k=2, moe_hidden=24, moe_every=2, moe_offset=1)
        ces0, norms0, weights0, _ = _steps_with_split(cfg, False, grad_accum)
        ces1, norms1, weights1, names = _steps_with_split(cfg, True, grad_accum)
    finally:
        set_kernels("auto")
    # the linear layers (mixer and attention projections, router, head) and the experts' matrices; not the
    # embedding, norms, conv kernels, A_log, D, dt_bias
    linear = {n for n in weights0 if ".conv1d." not in n and n.rsplit(".", 1)[0].split(".")[-1] in
              ("z", "x", "B", "C", "dt", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "router", "lm_head",
               "gate_proj", "up_proj", "down_proj")}
    assert len(linear) == 15  # 6 mixer + 3 MLP projections, 4 attention, router, head
    assert names == linear | {"layers.1.mlp.experts.gate_up_proj", "layers.1.mlp.experts.down_proj"}, names
    assert ces1 == ces0 and norms1 == norms0
    ulps = {n: (weights1[n].view(torch.int32) - w.view(torch.int32)).abs() for n, w in weights0.items()}
    assert all(weights1[n].dtype == torch.float32 for n in weights0)  # the state dict: fp32 masters either way
    assert sum(int((u > 0).sum()) for u in ulps.values()) <= 8 and max(int(u.max()) for u in ulps.values()) <= 2


@pytest.mark.parametrize("tied", [False, True])
def test_optimizer_stepped_module_by_module_is_the_whole_step(tied, monkeypatch):
    """OptimizerOverlap's step: the Triton AdamW taken in groups of the model's modules in forward order is
    the step taken whole, to the bit: split masters, bf16 moments rounded stochastically (seeded by each
    tensor's place in the optimizer), 2 micro-batches, a skipped non-finite step. The groups: every
    parameter once; the embedding first, each block, the head last, a tied head's weight with the embedding."""
    from hybrid_train.train.overlap import forward_units, step_groups

    monkeypatch.setenv("HYBRID_TRAIN_KERNELS", "auto")
    set_kernels("torch")  # the model's ops in PyTorch (fast here); the AdamW step through the interpreter
    cfg = mixer_cfg(moe_n_experts=4, moe_top_k=2, moe_hidden=24, moe_every=2, moe_offset=1, tie_embeddings=tied)
    try:
        whole = _steps_with_split(cfg, True, 2, moment_dtype="bfloat16")
        parts = _steps_with_split(cfg, True, 2, moment_dtype="bfloat16", by_module=True)
    finally:
        set_kernels("auto")
    assert whole[:2] == parts[:2]
    assert all(torch.equal(parts[2][name], value) for name, value in whole[2].items())
    model = build_model(cfg)
    params = list(model.parameters())
    groups = step_groups(model, params)
    assert sorted(id(p) for _, own in groups for p in own) == sorted(map(id, params))
    units = [model.embed, *model.layers.values(), model.norm] + ([] if tied else [model.lm_head])
    assert forward_units(model) == [model.embed, *model.layers.values(), model.norm, model.lm_head]
    assert [unit for unit, _ in groups] == units
    assert model.lm_head.weight in groups[0][1] if tied else groups[-1][1] == {model.lm_head.weight}
    some = list(model.layers["1"].parameters())[:2]  # a subset: only the units that hold it
    assert step_groups(model, some) == [(model.layers["1"], set(some))]


@pytest.mark.parametrize("batched_below", [1 << 20, 0])
def test_split_master_step_is_the_fp32_step(batched_below, monkeypatch):
    """The Triton step of a split master (bf16 half + int16 low half) is the step of an fp32 parameter:
    over three clipped steps with bf16 gradients and fp32 or bf16 moments, its halves are split_fp32 of what
    the fp32 parameter stepped to (which then goes on from their join, as the split master does: that
    join differs at ties that round down); with every tensor in one batched launch, and each in its own."""
    from hybrid_train.ops.triton import adamw

    monkeypatch.setattr(adamw, "BATCHED_BELOW", batched_below)
    torch.manual_seed(0)
    for moments in (torch.float32, torch.bfloat16):
        assert_split_master_step_is_the_fp32_step([(300, 7), (1000,), (5, 3, 4)], "cpu", moments)


@pytest.mark.parametrize("tied", [False, True])
def test_planned_memory_of_split_masters_is_a_measured_step(compose, tied):
    """scripts/plan.py at world size 1 counts split masters as the trainer holds them: a bf16 weight and its
    int16 low half for each weight autocast casts, bf16 gradients for those (beside their fp32 sum when
    micro-batches accumulate), fp32 for the rest, fp32 moments; against real steps of the tiny model through
    the Triton AdamW. No autocast copies of the weights, but of a tied head's matrix (which stays fp32)."""
    from test_plan import one_step

    from hybrid_train.model import build_model
    from hybrid_train.ops.dispatch import OPS
    from hybrid_train.parallel.plan import Layout, memory_per_gpu, split_masters
    from hybrid_train.train.optim import build_optimizer
    from hybrid_train.train.precision import BF16Weights

    job = compose(["optim.impl=triton", f"model.tie_embeddings={str(tied).lower()}"])
    assert split_masters(job) and not split_masters(compose(["train.precision=fp32"]))
    assert not split_masters(compose(["model.kernels=torch"]))  # (optim.impl auto: torch's AdamW, no split)
    model = build_model(job.model)
    optimizer = build_optimizer(model, job.optim)
    weights = BF16Weights(model)
    weights.attach(optimizer)
    set_kernels("auto", torch_ops=tuple(OPS))  # the model's ops in PyTorch (faster here); the step in Triton
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # (as the trainer runs the split weights)
            one_step(model, optimizer, job.model.vocab_size)
            measured = {"parameters": sum(p.nbytes for p in model.parameters()) + sum(t.nbytes for t in weights.low.values()),
                        "gradients": sum(p.grad.nbytes for p in model.parameters()),
                        "optimizer": sum(v.nbytes for state in optimizer.state.values() for v in state.values())}
            planned = memory_per_gpu(job, Layout(1, 1, 1, 1))
            assert {k: getattr(planned, k) for k in measured} == measured
            head = job.model.vocab_size * job.model.d_model
            assert planned.gathered == (2 * head if tied else 0)
            assert weights.low and {p.grad.dtype for p in weights.low} == {torch.bfloat16}
            assert (model.lm_head.weight in weights.low) != tied
            # two accumulated micro-batches: after the second backward, before its fold, both kinds are held
            optimizer.zero_grad()
            one_step(model, optimizer, job.model.vocab_size)  # (its step is beside the point here)
            weights.fold_grads()
            model(torch.randint(0, job.model.vocab_size, (2, 16))).float().logsumexp(-1).mean().backward()
            held = sum(p.grad.nbytes for p in model.parameters()) + sum(g.nbytes for g in weights._fp32_grads.values())
            assert memory_per_gpu(job, Layout(1, 1, 1, 1), grad_accum=2).gradients == held
    finally:
        set_kernels("auto")


def test_split_and_join_in_the_kernel_are_fp32_halves_bit_for_bit():
    from split_kernels import assert_kernel_halves_match_torch

    assert_kernel_halves_match_torch("cpu")


def test_sum_squares_kernel_matches_float64():
    """One launch per dtype over tensors of ragged sizes (within a block, several blocks, empty): the fp32
    sum of squares against float64; inf and NaN come through."""
    from hybrid_train.ops.dispatch import use_triton
    from hybrid_train.ops.reductions import sum_squares
    from hybrid_train.ops.triton import sum_squares as kernel

    torch.manual_seed(0)
    tensors = [torch.randn(s, dtype=d) * 3 for s, d in (((3, 5), torch.float32), ((9000,), torch.bfloat16),
                                                        ((0,), torch.float32), ((4096, 3), torch.float32),
                                                        ((7,), torch.float16), ((2, 4097), torch.bfloat16))]
    expected = sum(t.double().square().sum() for t in tensors)
    for block in (None, 1024):
        got = kernel.sum_squares(tensors, block=block)
        assert got.dtype == torch.float32 and got.shape == ()
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    assert use_triton(*tensors, op="sum_squares")  # (HYBRID_TRAIN_KERNELS=triton here)
    torch.testing.assert_close(sum_squares(tensors).double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(sum_squares([t.double() for t in tensors]).double(), expected, rtol=1e-6, atol=0)
    tensors[1][5] = float("inf")
    assert torch.isinf(kernel.sum_squares(tensors))
    tensors[3][0, 0] = float("nan")
    assert torch.isnan(kernel.sum_squares(tensors))


def test_trainer_with_bf16_weights_logs_autocast_losses(compose, tmp_path, monkeypatch, head_dtypes):
    """train.py's loop with train.bf16_weights on and off (bf16 autocast, Triton AdamW, 2 micro-batches
    a step), and on with activation checkpointing: the same losses and gradient norms; the header says
    which; the checkpoint holds the fp32 masters, a resumed run goes on as the uninterrupted one, and a
    checkpoint of either kind resumes under the other."""
    import json

    from hybrid_train.train.checkpoint import iter_model_tensors
    from hybrid_train.train.trainer import train

    monkeypatch.setenv("HYBRID_TRAIN_KERNELS", "auto")  # model ops in PyTorch (model.kernels=torch)
    common = ["model=tiny", "model.n_layers=2", "model.attn_layer_indices=[1]", "model.kernels=torch",
              "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_tokens=256", "train.max_tokens=0",
              "train.precision=bf16", "optim.impl=triton", "logging.progress=false", "logging.log_every=1",
              "schedule.name=constant", "schedule.warmup_steps=0"]  # (a resumed run: the same LR per step)
    runs = {}
    for name, extra in (("false", []), ("true", []), ("true_ac", ["parallel.activation_checkpoint=full"])):
        run_dir = tmp_path / name
        split = name.split("_")[0]
        head_dtypes.clear()
        result = train(compose(common + extra + [f"run.dir={run_dir}", "train.max_steps=4",
                                                 f"train.bf16_weights={split}"]))
        assert all(p.dtype == torch.float32 for p in result.model.parameters())  # the fp32 masters, unsplit
        runs[name] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert ("split fp32 masters" in (run_dir / "train.log").read_text()) == (split == "true")
        assert head_dtypes == [torch.bfloat16 if split == "true" else torch.float32] * 8  # 4 steps x 2
    for name in ("true", "true_ac"):
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close([r[key] for r in runs[name]], [r[key] for r in runs["false"]], rtol=1e-6, atol=0)
    saved = dict(iter_model_tensors(tmp_path / "true"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert all(torch.equal(saved[n], p) for n, p in result.model.named_parameters())  # (the last run: true_ac)
    resumed = tmp_path / "resumed"  # train.bf16_weights unset: on, as it applies here
    train(compose(common + [f"run.dir={resumed}", "train.max_steps=2", "checkpoint.final=true"]))
    assert "split fp32 masters" in (resumed / "train.log").read_text()
    train(compose(common + [f"run.dir={resumed}", "train.max_steps=4"]))
    losses = [json.loads(line)["loss"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert losses[-2:] == [r["loss"] for r in runs["true"]][-2:]
    # across the two: a split run's checkpoint resumed with fp32 weights, and back (fp32 moments kept fp32)
    for first, second in (("true", "false"), ("false", "true")):
        run_dir = tmp_path / f"across_{first}"
        train(compose(common + [f"run.dir={run_dir}", "train.max_steps=2", "checkpoint.final=true",
                                f"train.bf16_weights={first}"]))
        train(compose(common + [f"run.dir={run_dir}", "train.max_steps=4", f"train.bf16_weights={second}"]))
        losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        torch.testing.assert_close(losses, [r["loss"] for r in runs["false"]], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="train.bf16_weights=true: .*fp32"):
        train(compose(common + [f"run.dir={tmp_path / 'fp32'}", "train.max_steps=1", "train.precision=fp32",
                                "train.bf16_weights=true"]))


def test_split_masters_keep_fp32_moments_through_a_state_dict():
    """torch's Optimizer.load_state_dict casts moments to the parameter's dtype: the Triton AdamW keeps
    the fp32 moments of split masters (bf16 parameters) as saved, and steps on as before."""
    from hybrid_train.train.config import OptimConfig
    from hybrid_train.train.optim import build_optimizer
    from hybrid_train.train.precision import BF16Weights

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
        opt = build_optimizer(model, OptimConfig(lr=1e-2, impl="triton"))
        BF16Weights(model).attach(opt)
        return model, opt

    x = torch.randn(8, 16)
    model, opt = build()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().square().sum().backward()
        opt.step()
        opt.zero_grad()
    saved = copy.deepcopy(opt.state_dict())  # (a state dict holds the optimizer's own tensors)
    assert all(s["exp_avg"].dtype == torch.float32 for s in saved["state"].values())
    other, other_opt = build()
    other.load_state_dict(model.state_dict())
    other_opt.load_state_dict(saved)
    for p in other.parameters():
        state = other_opt.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32, p.dtype
    assert any(p.dtype == torch.bfloat16 for p in other.parameters())
    for m, o in ((model, opt), (other, other_opt)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x * 2).float().square().sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values at and just beyond x (fp32) in magnitude: truncated, and truncated + 1 ulp."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = (bits >> 16).to(torch.int32).to(torch.int16)  # (int32 -> int16 wraps the sign bit back in)
    return low.view(torch.bfloat16), (low + 1).view(torch.bfloat16)


def test_bf16_moments_step_fp32_and_round_stochastically_between_neighbours():
    """optim.moment_dtype=bfloat16: three clipped steps of the Triton AdamW on fp32 parameters against
    float64 AdamW taken from the stored bf16 moments: the parameters match, and each stored moment is
    one of the two bf16 values around its fp32 value (truncated, or one ulp beyond), never further."""
    from hybrid_train.parallel import grad_norm
    from hybrid_train.train.config import OptimConfig
    from hybrid_train.train.optim import TritonAdamW, clip_and_step

    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, impl="triton", moment_dtype="bfloat16")
    model, opt, _ = _adamw_pair(torch.float32, cfg)
    assert isinstance(opt, TritonAdamW) and opt.moment_dtype == torch.bfloat16
    beta1, beta2 = cfg.betas
    for t, scale in enumerate((1e-3, 1e3, 1e-2), start=1):
        (model(torch.randn(8, 97)).square().sum() * scale).backward()
        norm = grad_norm(model.parameters())
        clip = max(1.0, (norm.item() + 1e-6) / 1.0)
        before = {p: (p.detach().double(), p.grad.double() / clip,
                      *(opt.state[p][k].double() if opt.state[p] else torch.zeros_like(p, dtype=F64)
                        for k in ("exp_avg", "exp_avg_sq"))) for p in model.parameters()}
        assert clip_and_step(opt, norm, 1.0).item() == 0.0
        opt.zero_grad(set_to_none=True)
        for p, (p0, g, m0, v0) in before.items():
            group = next(gr for gr in opt.param_groups if any(q is p for q in gr["params"]))
            m = beta1 * m0 + (1 - beta1) * g
            v = beta2 * v0 + (1 - beta2) * g * g
            expected = p0 * (1 - 1e-2 * group["weight_decay"]) - 1e-2 / (1 - beta1 ** t) * m / (
                (v / (1 - beta2 ** t)).sqrt() + cfg.eps)
            torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-7)
            for key, value in (("exp_avg", m), ("exp_avg_sq", v)):
                stored = opt.state[p][key]
                assert stored.dtype == torch.bfloat16
                low, high = _bf16_neighbours(value.float())
                near = (stored.float() - value.float()).abs() <= 1e-6 * value.abs().float().clamp(min=1e-30)
                assert ((stored == low) | (stored == high) | near).all(), key


def test_bf16_moment_rounding_is_unbiased_and_seeded_by_tensor_and_step():
    """One moment value a fraction f of a bf16 ulp above a bf16 value, in 65,536 elements: about f of
    them round up (the mean is the fp32 value), and the pattern differs between tensors and steps but
    is the same when a step is taken again (a resume rounds as the uninterrupted run)."""
    from hybrid_train.ops.triton.adamw import adamw_step

    n = 1 << 16
    base = torch.tensor(1.0 + 5 / 128, dtype=torch.float32)  # a bf16 value; + 0.3 ulp below
    target = base + 0.3 * 2.0 ** -7
    g = torch.full((n,), float(target) / 0.1)  # m = 0 + 0.1 * (g - 0) in fp32: target to within an fp32 ulp

    def rounded(step_count: float, index: int) -> torch.Tensor:
        p, m, v = torch.zeros(n), torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
        step, skip = torch.tensor(step_count), torch.zeros(())
        adamw_step(p, g, m, v, step, None, skip, lr=0.0, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                   tensor_index=index)
        m32 = torch.tensor(0.1, dtype=torch.float32) * g[0]
        low, high = _bf16_neighbours(m32.reshape(1))
        assert ((m == low) | (m == high)).all()
        return m == high

    fraction = (float(torch.tensor(0.1) * g[0]) - float(base)) / 2.0 ** -7
    up = rounded(1.0, 1)
    assert abs(up.float().mean().item() - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / n), up.float().mean()
    assert torch.equal(rounded(1.0, 1), up)
    for other in (rounded(2.0, 1), rounded(1.0, 2)):
        agree = (other == up).float().mean().item()  # independent patterns agree on f^2 + (1 - f)^2 of elements
        assert abs(agree - (fraction ** 2 + (1 - fraction) ** 2)) < 0.02, agree


def test_bf16_moments_resume_across_moment_dtypes(tmp_path):
    """DCP: bf16 moments are saved as bf16; a bf16 run resumed from its own checkpoint steps exactly as
    the uninterrupted one (the rounding is seeded by step and tensor, not by a generator), and a run
    resumes under the other moment dtype with its moments cast."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from hybrid_train.train.config import OptimConfig
    from hybrid_train.train.optim import build_optimizer

    x = torch.randn(8, 97)

    def run(moments: str, first: int, last: int, load: str | None = None, save: str | None = None):
        """Steps first..last (inputs x * step), from a fresh model or a checkpoint."""
        model, _, _ = _adamw_pair(torch.float32, OptimConfig(lr=1e-2))
        opt = build_optimizer(model, OptimConfig(lr=1e-2, impl="triton", moment_dtype=moments))
        if load is not None:
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=load)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for step in range(first, last + 1):
            model(x * step).square().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if save is not None:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=save)
        return model, opt

    def moment_dtypes(opt) -> set:
        return {v.dtype for s in opt.state.values() for k, v in s.items() if k != "step"}

    bf16_dir, fp32_dir = str(tmp_path / "bf16"), str(tmp_path / "fp32")
    _, saved = run("bfloat16", 1, 2, save=bf16_dir)
    assert moment_dtypes(saved) == {torch.bfloat16}
    meta = dcp.FileSystemReader(bf16_dir).read_metadata()
    moments = [m for k, m in meta.state_dict_metadata.items() if "exp_avg" in k]
    assert moments and all(m.properties.dtype == torch.bfloat16 for m in moments)
    straight, straight_opt = run("bfloat16", 1, 3)
    resumed, resumed_opt = run("bfloat16", 3, 3, load=bf16_dir)
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), straight.parameters()))
    for a, b in zip(resumed_opt.state.values(), straight_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    run("float32", 1, 2, save=fp32_dir)
    for moments, saved_dir, dtype in (("float32", bf16_dir, torch.float32), ("bfloat16", fp32_dir, torch.bfloat16)):
        _, opt = run(moments, 3, 3, load=saved_dir)
        assert moment_dtypes(opt) == {dtype}
        assert all(float(s["step"]) == 3 for s in opt.state.values())


def test_trainer_with_bf16_moments_says_so_saves_them_and_plans_their_bytes(compose, tmp_path, monkeypatch):
    """train.py with optim.moment_dtype=bfloat16: the header says so, the checkpoint holds bf16 moments, and
    the planner's AdamW bytes equal a run's (2 bytes per moment element and the step counters)."""
    from test_plan import one_step, state_bytes

    from hybrid_train.parallel.plan import Layout, memory_per_gpu
    from hybrid_train.train.optim import build_optimizer
    from hybrid_train.train.trainer import train

    monkeypatch.setenv("HYBRID_TRAIN_KERNELS", "auto")  # model ops in PyTorch (model.kernels=torch)
    overrides = ["model=tiny", "model.n_layers=2", "model.attn_layer_indices=[1]", "model.kernels=torch",
                 "train.seq_len=32", "train.micro_batch_size=2", "train.max_steps=1", "optim.impl=triton",
                 "optim.moment_dtype=bfloat16", "logging.progress=false", f"run.dir={tmp_path}"]
    job = compose(overrides)
    train(job)
    assert "AdamW (bf16 moments, stochastically rounded)" in (tmp_path / "train.log").read_text()
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(tmp_path / "checkpoints" / "step_00000001")).read_metadata()
    moments = [m.properties.dtype for k, m in meta.state_dict_metadata.items() if "exp_avg" in k]
    assert len(moments) == 2 * len(list(build_model(job.model).parameters())) and set(moments) == {torch.bfloat16}
    model = build_model(job.model)
    optimizer = build_optimizer(model, job.optim)
    one_step(model, optimizer, job.model.vocab_size)
    assert memory_per_gpu(job, Layout(1, 1, 1, 1)).optimizer == state_bytes(model, optimizer)["optimizer"]
    fp32 = compose(overrides[:-2] + ["optim.moment_dtype=float32"])
    n = sum(p.numel() for p in model.parameters())
    assert memory_per_gpu(fp32, Layout(1, 1, 1, 1)).optimizer - state_bytes(model, optimizer)["optimizer"] == 4 * n


@triton.jit
def _bf16_store_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _rounded(tl.load(x_ptr + offs, mask=offs < n), tl.bfloat16), mask=offs < n)


def test_adamw_bf16_rounding_is_round_to_nearest_even_with_specials():
    """The kernel's bf16 store (bit arithmetic, the same on GPU and interpreter) against torch's cast:
    ties to even, subnormals, the largest finite values and those that round to inf, +-inf, and NaN."""
    bits = torch.tensor([0, 0x80000000, 1, 0x8000, 0x18000, 0x10000 | 0x8000, 0x3F808000, 0x3F818000, 0x007FFFFF,
                         0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000,
                         0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001], dtype=torch.int64)
    x = torch.cat([bits.to(torch.int32).view(torch.float32), torch.randn(997) * 10.0 ** torch.randint(-40, 38, (997,))])
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    _bf16_store_kernel[(1,)](x, y, x.numel(), BLOCK=1024)
    expected = x.to(torch.bfloat16)
    nan = torch.isnan(x)
    assert nan.sum() == 4 and torch.isnan(y[nan]).all()
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))
