"""Triton kernels behind the public ops in hybrid_train.ops (imported lazily: triton is optional)."""
