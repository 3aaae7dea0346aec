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
    enabled=False: none (every method then leaves the model and its gradients as they are)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, enabled: bool = True):
        slots = [(module, name, param) for module in model.modules()
                 for name, param in module._parameters.items() if param is not None and enabled]
        copied: dict[nn.Parameter, bool] = {}
        for module, _, param in slots:  # a parameter in two modules (tied) is copied only if both cast it
            copied[param] = copied.get(param, True) and isinstance(module, CAST_BY_AUTOCAST)
        self.copies: dict[nn.Parameter, nn.Parameter] = {
            p: nn.Parameter(torch.empty_like(p, dtype=dtype)) for p, yes in copied.items()
            if yes and p.requires_grad and p.dtype == torch.float32}
        self._slots = [(module, name, param) for module, name, param in slots if param in self.copies]
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Round every master into its copy: after the masters changed outside the optimizer (init,
        checkpoint load). The optimizer keeps them in step afterwards."""
        for param, copy in self.copies.items():
            copy.copy_(param)

    @contextlib.contextmanager
    def in_use(self):
        """The model's modules hold the copies inside this block (forward and backward, whose activation
        checkpointing runs forward again), the masters outside it."""
        for module, name, param in self._slots:
            module._parameters[name] = self.copies[param]
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

    def grad_holders(self, params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
        """For each parameter, the tensor whose .grad is its gradient: the copy while the gradient is
        still there, else the parameter."""
        out = []
        for p in params:
            copy = self.copies.get(p)
            out.append(copy if copy is not None and p.grad is None and copy.grad is not None else p)
        return out

    def zero_grad(self) -> None:
        for copy in self.copies.values():
            copy.grad = None

    def __bool__(self) -> bool:
        return bool(self.copies)

    def numel(self) -> int:
        return sum(c.numel() for c in self.copies.values())


def weight_copies_for(job, model: nn.Module, optimizer, world_size: int,
                      autocast_dtype: torch.dtype | None) -> WeightCopies:
    """The run's bf16 weight copies (`train.bf16_weight_copies`; None = where they apply), handed to the
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
        optimizer.keep_copies(copies)
    return copies
