"""Numerical building blocks: SSD scan, causal conv1d, gated RMSNorm, document-masked attention."""

from hybrid_train.ops.attention import causal_attention
from hybrid_train.ops.conv1d import causal_conv1d
from hybrid_train.ops.norm import gated_rms_norm
from hybrid_train.ops.ssd import ssd_chunk_scan

__all__ = ["ssd_chunk_scan", "causal_conv1d", "gated_rms_norm", "causal_attention"]
