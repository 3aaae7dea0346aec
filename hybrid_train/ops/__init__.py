"""Numerical building blocks: SSD scan, causal conv1d, gated RMSNorm, document-masked attention, SwiGLU's
silu(gate) * up, and the Mamba-2 mixer's conv1d + SSD scan fused so that its backward recomputes the conv outputs.

Each op has a PyTorch reference (the CPU path) and, where it pays, Triton kernels; which one runs is
chosen by hybrid_train.ops.dispatch (``set_kernels``, env ``HYBRID_TRAIN_KERNELS``, per op
``HYBRID_TRAIN_TORCH_OPS``).
"""

from hybrid_train.ops.attention import causal_attention
from hybrid_train.ops.conv1d import causal_conv1d
from hybrid_train.ops.conv_ssd import conv_ssd_scan
from hybrid_train.ops.cross_entropy import fused_linear_cross_entropy
from hybrid_train.ops.dispatch import deterministic, kernels_mode, set_kernels
from hybrid_train.ops.norm import gated_rms_norm, rms_norm
from hybrid_train.ops.ssd import ssd_chunk_scan
from hybrid_train.ops.swiglu import silu_mul, silu_mul_packed

__all__ = [
    "ssd_chunk_scan", "causal_conv1d", "conv_ssd_scan", "gated_rms_norm", "rms_norm", "causal_attention",
    "fused_linear_cross_entropy", "silu_mul", "silu_mul_packed",
    "set_kernels", "kernels_mode", "deterministic",
]
