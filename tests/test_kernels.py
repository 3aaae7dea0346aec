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
from hybrid_train.ops.dispatch import ENV_VAR, use_triton
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
