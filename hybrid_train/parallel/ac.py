"""Activation checkpointing of blocks: recompute activations in backward instead of keeping them.

The block's forward is replaced in place (no wrapper module), so parameter names, state dicts and
checkpoints are the same with and without it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

def _ops(*names: str) -> set:
    """The named op overloads that this torch build has (attention variants differ by version/device)."""
    found = set()
    for name in names:
        namespace, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None and hasattr(packet, overload):
            found.add(getattr(packet, overload))
    return found


# Per-op policy: keep what is expensive to recompute (matmuls, attention) or would repeat
# communication in backward (TP collectives); recompute the cheap elementwise ops and norms.
_SAVE_OPS = _ops(
    "aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten._grouped_mm.default",
    "aten._scaled_dot_product_efficient_attention.default", "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default", "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "_c10d_functional.all_reduce.default", "_c10d_functional.reduce_scatter_tensor.default",
    "_c10d_functional.all_gather_into_tensor.default",
)
if hasattr(torch.ops.higher_order, "flex_attention"):
    _SAVE_OPS.add(torch.ops.higher_order.flex_attention)


def _save_matmuls_and_collectives(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _per_op_contexts():
    return create_selective_checkpoint_contexts(_save_matmuls_and_collectives)


def checkpoint_module(module: nn.Module, per_op: bool = False) -> None:
    """Run module.forward under torch.utils.checkpoint (non-reentrant: composes with FSDP2, DTensor
    and torch.compile). per_op: selective, with the policy above."""
    forward = module.forward
    kwargs = {"context_fn": _per_op_contexts} if per_op else {}

    @functools.wraps(forward)
    def checkpointed(*args, **kw):
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kw, **kwargs)

    module.forward = checkpointed


def apply_ac(model: nn.Module, mode: str, every_n_blocks: int = 0) -> None:
    """none | full (every block) | selective: every n-th block whole (blocks 0, n, 2n, ...), or with
    every_n_blocks = 0 every block with the per-op policy."""
    if mode == "none":
        return
    for i, block in enumerate(model.layers.values()):
        if mode == "full":
            checkpoint_module(block)
        elif every_n_blocks:
            if i % every_n_blocks == 0:
                checkpoint_module(block)
        else:
            checkpoint_module(block, per_op=True)
