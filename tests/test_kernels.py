"""Kernel dispatch, and the Triton kernels under the CPU interpreter (in a subprocess).

TRITON_INTERPRET must be set before triton is first imported, and this process may import triton
for other reasons (torch.compile); so tests/kernels_interp_cases.py runs in a fresh interpreter with
TRITON_INTERPRET=1 and HYBRID_TRAIN_KERNELS=triton, which leaves the other tests untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_train.model import ModelConfig
from hybrid_train.ops import kernels_mode, set_kernels
from hybrid_train.ops import dispatch
from hybrid_train.ops.dispatch import ENV_VAR, OPS, TORCH_OPS_ENV_VAR, torch_ops, use_triton
from hybrid_train.ops.ssd import ssd_chunk_scan, ssd_chunk_scan_torch

TESTS = Path(__file__).resolve().parent


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", HYBRID_TRAIN_KERNELS="triton", PYTHONPATH=os.pathsep.join(
        [str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(TESTS / "kernels_interp_cases.py")],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def test_set_kernels_validates_and_env_wins(monkeypatch):
    with pytest.raises(ValueError, match="kernels"):
        set_kernels("cuda")
    monkeypatch.delenv(ENV_VAR, raising=False)
    try:
        set_kernels("torch")
        assert kernels_mode() == "torch"
        monkeypatch.setenv(ENV_VAR, "auto")  # auto defers to set_kernels
        assert kernels_mode() == "torch"
        monkeypatch.setenv(ENV_VAR, "triton")  # a forcing value wins
        assert kernels_mode() == "triton"
        monkeypatch.setenv(ENV_VAR, "bogus")
        with pytest.raises(ValueError, match=ENV_VAR):
            kernels_mode()
    finally:
        set_kernels("auto")


def test_per_op_switches_force_the_reference(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv(TORCH_OPS_ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "interpreting", lambda: True)  # kernels=triton accepts CPU tensors; none run
    x = torch.zeros(1)
    try:
        set_kernels("triton", torch_ops=("ssd", "mixer"))
        assert torch_ops() == {"ssd", "mixer"}
        assert not use_triton(x, op="ssd") and not use_triton(x, op="mixer")
        assert use_triton(x, op="conv1d") and use_triton(x)  # no op name: the mode alone decides
        monkeypatch.setenv(TORCH_OPS_ENV_VAR, " conv1d, gated_norm")  # adds to set_kernels' list
        assert torch_ops() == {"ssd", "mixer", "conv1d", "gated_norm"}
        assert not use_triton(x, op="gated_norm") and use_triton(x, op="cross_entropy")
        set_kernels("triton")  # a new call replaces its own list; the env var's stays
        assert torch_ops() == {"conv1d", "gated_norm"}
        set_kernels("triton", torch_ops=OPS)
        assert not any(use_triton(x, op=op) for op in OPS)
        monkeypatch.setenv(TORCH_OPS_ENV_VAR, "ssd,flash")
        with pytest.raises(ValueError, match=f"{TORCH_OPS_ENV_VAR}: unknown op 'flash'"):
            use_triton(x, op="conv1d")
        monkeypatch.delenv(TORCH_OPS_ENV_VAR)
        with pytest.raises(ValueError, match="torch_ops: unknown op 'conv'"):
            set_kernels("auto", torch_ops=("conv",))
        with pytest.raises(TypeError, match="torch_ops"):
            set_kernels("auto", torch_ops="ssd")
        with pytest.raises(ValueError, match="use_triton: unknown op 'norm'"):
            use_triton(x, op="norm")
    finally:
        set_kernels("auto")
    assert torch_ops() == frozenset()


def test_auto_runs_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert not use_triton(torch.zeros(1))
    gen = torch.Generator().manual_seed(0)
    x, B, C = (torch.randn(1, 20, *s, generator=gen) for s in ((2, 4), (1, 8), (1, 8)))
    dt, A = torch.rand(1, 20, 2, generator=gen), -torch.rand(2, generator=gen)
    assert torch.equal(ssd_chunk_scan(x, dt, A, B, C, 16), ssd_chunk_scan_torch(x, dt, A, B, C, 16))


def test_model_config_kernels_field():
    assert ModelConfig().validate().kernels == "auto"
    with pytest.raises(ValueError, match="model.kernels"):
        ModelConfig(kernels="fast").validate()


def test_kernel_ops_take_the_custom_op_only_when_traced():
    """Eager calls skip the dispatcher; anything traced (fake tensors, dispatch modes) gets the custom op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hybrid_train.ops.library import is_tracing

    plain = torch.ones(2)
    assert not is_tracing((plain, torch.nn.Parameter(torch.ones(1)), None, 3, 0.5))
    with FakeTensorMode() as mode:
        fake = torch.ones(2)
    assert is_tracing((plain, fake))
    with mode:  # a dispatch mode is active: tracing even with no tensor argument
        assert is_tracing((3,))


@pytest.mark.parametrize("user_precision", ["highest", "medium"])
def test_ssd_backward_tf32_switch_restores_the_users_setting(user_precision):
    # The SSD backward's epilogue matmuls take TF32 for 16-bit inputs through torch's process-wide
    # switch; the user's own setting must come back, and fp32 inputs must keep full precision.
    from hybrid_train.ops.triton.ssd_bwd import _tf32_for

    matmul = torch.backends.cuda.matmul
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(user_precision)
        before = matmul.fp32_precision
        with _tf32_for(torch.bfloat16):
            assert matmul.fp32_precision == "tf32"
        with _tf32_for(torch.float32):
            assert matmul.fp32_precision == before
        assert matmul.fp32_precision == before
        assert torch.get_float32_matmul_precision() == user_precision
    finally:
        torch.set_float32_matmul_precision(saved)


def test_ssd_chunk_offsets_past_32_bits_are_refused_by_name():
    # The kernels address inside one (batch, chunk) slab with 32-bit offsets. Meta tensors carry the
    # shapes and strides without the memory: a contiguous tensor spans chunk * h * p - 1 elements, a
    # head-major view (l * p between heads) far more, and past 2^31 the launch names it.
    from hybrid_train.ops.triton.ssd_fwd import chunk_span, ssd_fwd

    h, p, chunk = 128, 64, 256
    assert chunk_span(torch.empty(2, 4096, h, p, device="meta"), chunk) == chunk * h * p - 1
    assert chunk_span(torch.empty(2, 100, h, p, device="meta"), chunk) == 100 * h * p - 1  # shorter than a chunk
    head_major = torch.empty(1, h, 2**19, p, device="meta").transpose(1, 2)
    assert chunk_span(head_major, chunk) == (chunk - 1) * p + (h - 1) * 2**19 * p + p - 1
    dt = torch.empty(1, 2**19, h, device="meta")
    A = torch.empty(h, device="meta")
    B = C = torch.empty(1, 2**19, 1, 128, device="meta")
    with pytest.raises(ValueError, match=r"x \(shape \(1, 524288, 128, 64\), strides \(4294967296, 64, 33554432, 1\)\) "
                                         r"spans 4261429247 elements inside one chunk of 256"):
        ssd_fwd(head_major, dt, A, B, C, chunk, None, None, None, False, (0.0, float("inf")), None, None, False)
