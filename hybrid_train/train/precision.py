"""bf16 copies of the weights autocast would cast, written by the optimizer (one process, bf16 autocast).

Under autocast every linear layer casts its fp32 weight to bf16 in each forward (read 4 bytes, write 2),
and the cast's backward turns the bf16 weight gradient into an fp32 one (read 2, write 4): 12 bytes per
parameter a step, about 8 ms at 9B width on an H200. Here the optimizer writes a bf16 copy of each such
matrix when it updates the fp32 master (2 bytes), forward and backward run on the copy, and the copy's
bf16 gradient is what the norm and the optimizer read.

The numbers are autocast's: the copy is the master rounded to bf16 as autocast's cast rounds it, and
its gradient is the bf16 gradient autocast would have upcast exactly. With gradient accumulation each
micro-batch's gradient is added to the fp32 master's, as autocast accumulates (`fold_grads`). What
autocast leaves in fp32 stays fp32 and uncopied: the embedding (so the residual stream stays fp32),
norms, conv kernels, A_log, D, dt_bias, and a weight tied to any of them. The model, its state dict
and the optimizer's state keep the fp32 masters only, so checkpoints are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn as nn

from hybrid_train.model.moe import GroupedExperts

# Modules whose parameters autocast (or the model, following autocast: GroupedExperts) casts to bf16.
CAST_BY_AUTOCAST = (nn.Linear, GroupedExperts)


class WeightCopies:
    """bf16 copies of a model's autocast-cast fp32 parameters, swapped in for forward and backward.
    enabled=False: none (every method then leaves the model and its gradients as they are).

    Compiled blocks see bf16 weights inside `in_use`; calling the model outside it (fp32 masters) compiles
    each block type once more."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, enabled: bool = True):
        self.copies: dict[nn.Parameter, nn.Parameter] = {}
        self._slots: list[tuple[nn.Module, str, nn.Parameter]] = []
        if not enabled:
            return
        slots = [(module, name, param) for module in model.modules()
                 for name, param in module._parameters.items() if param is not None]
        copied: dict[nn.Parameter, bool] = {}
        for module, _, param in slots:  # a parameter in two modules (tied) is copied only if both cast it
            copied[param] = copied.get(param, True) and isinstance(module, CAST_BY_AUTOCAST)
        self.copies = {p: nn.Parameter(torch.empty_like(p, dtype=dtype)) for p, yes in copied.items()
                       if yes and p.requires_grad and p.dtype == torch.float32}
        self._slots = [(module, name, param) for module, name, param in slots if param in self.copies]
        self.refresh()

    def attach(self, optimizer) -> None:
        """Have `optimizer` write the copies in each step (the Triton AdamW is the one that can)."""
        from hybrid_train.train.optim import TritonAdamW

        if not isinstance(optimizer, TritonAdamW):
            raise TypeError(f"bf16 weight copies are written by the Triton AdamW, not {type(optimizer).__name__}")
        optimizer.keep_copies(self)

    @torch.no_grad()
    def refresh(self) -> None:
        """Round every master into its copy: after the masters changed outside the optimizer (init,
        checkpoint load). The optimizer keeps them in step afterwards."""
        for param, copy in self.copies.items():
            copy.copy_(param)

    @contextlib.contextmanager
    def in_use(self):
        """The model's modules hold the copies inside this block (forward and backward, whose activation
        checkpointing runs forward again), the masters outside it. A copy wants a gradient when its master does."""
        for module, name, param in self._slots:
            copy = self.copies[param]
            copy.requires_grad_(param.requires_grad)
            module._parameters[name] = copy
        try:
            yield
        finally:
            for module, name, param in self._slots:
                module._parameters[name] = param

    @torch.no_grad()
    def fold_grads(self) -> None:
        """Add each copy's gradient to its master's (fp32) and clear it: between the micro-batches of
        an accumulated step, so the sum is taken in fp32 as under autocast."""
        for param, copy in self.copies.items():
            if copy.grad is None:
                continue
            if param.grad is None:
                param.grad = copy.grad.float()
            else:
                param.grad.add_(copy.grad)
            copy.grad = None

    def holder(self, param: nn.Parameter) -> torch.Tensor:
        """The tensor whose .grad is `param`'s gradient: its copy while the gradient is still there (not
        folded into the master), else the parameter."""
        copy = self.copies.get(param)
        return copy if copy is not None and param.grad is None and copy.grad is not None else param

    def grad_holders(self, params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
        return [self.holder(p) for p in params]

    def zero_grad(self) -> None:
        for copy in self.copies.values():
            copy.grad = None

    def __bool__(self) -> bool:
        return bool(self.copies)

    def numel(self) -> int:
        return sum(c.numel() for c in self.copies.values())


def weight_copies_for(job, model: nn.Module, optimizer, world_size: int,
                      autocast_dtype: torch.dtype | None) -> WeightCopies:
    """The run's bf16 weight copies (`train.bf16_weight_copies`; None = where they apply), attached to the
    optimizer that writes them; empty where they are off."""
    from hybrid_train.train.optim import TritonAdamW

    wanted = job.train.bf16_weight_copies
    why_not = (
        "they replace bf16 autocast's casts; this run computes in fp32 (train.precision)"
        if autocast_dtype != torch.bfloat16
        else f"they apply to one process; under FSDP (world size {world_size}) its all-gather casts the weights"
        if world_size > 1
        else f"the Triton AdamW writes them, and optim.impl={job.optim.impl} resolved to torch's AdamW here "
             "(the Triton step runs on CUDA)"
        if not isinstance(optimizer, TritonAdamW) else None)
    if wanted and why_not is not None:
        raise ValueError(f"train.bf16_weight_copies=true: {why_not}")
    copies = WeightCopies(model, enabled=wanted is not False and why_not is None)
    if copies:
        copies.attach(optimizer)
    return copies
