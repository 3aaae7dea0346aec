"""Which implementation the public ops run: Triton kernels or the PyTorch reference.

Modes: ``auto`` (Triton for CUDA tensors, the PyTorch reference elsewhere), ``triton`` (always the
Triton kernels; on CPU tensors this needs ``TRITON_INTERPRET=1`` set before triton is imported),
``torch`` (always the reference).

The environment variable ``HYBRID_TRAIN_KERNELS`` forces a mode process-wide: when it is set to
``triton`` or ``torch`` it wins over :func:`set_kernels` (a run's ``model.kernels``), so a test or a
debugging run can switch every op without touching configs. Unset or ``auto`` defers to
:func:`set_kernels`.

Per op, the reference can be forced whatever the mode: ``set_kernels(mode, torch_ops=("ssd",))`` or
the environment variable ``HYBRID_TRAIN_TORCH_OPS=ssd,conv1d`` (the two add up). A benchmark switches
the kernels on one at a time this way. Op names are those in ``OPS``; ``mixer`` is the fused causal
conv1d + SSD scan of the Mamba-2 mixer (hybrid_train/ops/conv_ssd.py).
"""

from __future__ import annotations

import os

import torch

MODES = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the Triton kernels take (fp32 math)
OPS = ("ssd", "conv1d", "gated_norm", "rms_norm", "mixer", "swiglu", "cross_entropy", "sum_squares")
ENV_VAR = "HYBRID_TRAIN_KERNELS"
TORCH_OPS_ENV_VAR = "HYBRID_TRAIN_TORCH_OPS"

_mode = "auto"
_torch_ops: frozenset[str] = frozenset()
_deterministic = False


def _check(mode: str, where: str) -> str:
    mode = str(mode).strip().lower()
    if mode not in MODES:
        raise ValueError(f"{where}={mode!r}; expected one of {', '.join(MODES)}")
    return mode


def _check_op(op: str, where: str) -> str:
    if op not in OPS:
        raise ValueError(f"{where}: unknown op {op!r}; expected one of {', '.join(OPS)}")
    return op


def set_kernels(mode: str, torch_ops: tuple[str, ...] | list[str] = ()) -> None:
    """Select the implementation for this process: auto | triton | torch (env var still wins), and
    the ops (names in ``OPS``) that run the PyTorch reference whatever the mode."""
    global _mode, _torch_ops
    if isinstance(torch_ops, str):
        raise TypeError(f"torch_ops must be a sequence of op names, got the string {torch_ops!r}")
    ops = frozenset(_check_op(op, "torch_ops") for op in torch_ops)
    _mode = _check(mode, "kernels")
    _torch_ops = ops


def torch_ops() -> frozenset[str]:
    """Ops forced to the reference: set_kernels' ``torch_ops`` plus the env var's list."""
    env = os.environ.get(TORCH_OPS_ENV_VAR, "")
    if not env.strip():
        return _torch_ops
    return _torch_ops | {_check_op(op.strip(), TORCH_OPS_ENV_VAR) for op in env.split(",") if op.strip()}


def kernels_mode() -> str:
    """The mode in force: the env var when it names triton or torch, else set_kernels' mode."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        env = _check(env, ENV_VAR)
        if env != "auto":
            return env
    return _mode


def deterministic(enabled: bool | None = None) -> bool:
    """Get, or set with ``enabled``, deterministic mode; returns the setting in force.

    Every kernel in this package is deterministic by construction: reductions across programs go
    through per-program partial buffers summed in a fixed order, never through atomics. The flag
    (or torch's own ``use_deterministic_algorithms``) is consulted by any op that has a faster
    non-deterministic variant, so turning it on never changes results of the current kernels.
    """
    global _deterministic
    if enabled is not None:
        _deterministic = bool(enabled)
    return _deterministic or torch.are_deterministic_algorithms_enabled()


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_triton_ok: bool | None = None


@torch.compiler.assume_constant_result  # run once while tracing: no guard on the global, no recompile
def triton_available() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401

            _triton_ok = True
        except Exception:  # pragma: no cover - triton is a Linux dependency
            _triton_ok = False
    return _triton_ok


def use_triton(*tensors: torch.Tensor | None, op: str | None = None) -> bool:
    """Whether an op over these tensors should run the Triton kernels under the current mode;
    ``op`` (a name in ``OPS``) also consults the per-op switches."""
    if op is not None and _check_op(op, "use_triton") in torch_ops():
        return False
    mode = kernels_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("kernels=triton but triton cannot be imported")
        on_cpu = any(t is not None and not t.is_cuda for t in tensors)
        if on_cpu and not interpreting():
            raise RuntimeError("kernels=triton on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
        return True
    return all(t is None or t.is_cuda for t in tensors) and triton_available()
