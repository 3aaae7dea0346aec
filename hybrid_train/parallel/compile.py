"""torch.compile per block: each block is compiled once and reused (they share code and shapes)."""

from __future__ import annotations

import torch.nn as nn


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Compile every block in place (`Module.compile`: no `_orig_mod` wrapper, names unchanged).

    Applied after TP and activation checkpointing, so the compiled region holds the TP collectives and
    the recomputation; before FSDP, whose hooks run around it."""
    for block in model.layers.values():
        block.compile(backend=backend)
