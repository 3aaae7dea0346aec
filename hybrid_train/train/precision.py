"""bf16 weights with their fp32 masters in 4 bytes (one process, bf16 autocast).

Under autocast every linear layer casts its fp32 weight to bf16 in each forward (read 4 bytes, write 2),
and the cast's backward turns the bf16 weight gradient into an fp32 one (read 2, write 4): 12 bytes per
parameter a step, about 8 ms at 9B width on an H200. Here each weight autocast would cast is held as the
bf16 value forward and backward use, plus an int16 holding what the fp32 master has beyond it: the master
takes the 4 bytes it took before, and the optimizer rebuilds it, updates it in fp32 and writes both halves
back (hybrid_train/ops/triton/adamw.py). Nothing is cast in forward or backward, and the norm and the
optimizer read the bf16 gradients.

The numbers are autocast's: the bf16 half is the master rounded to nearest even, as autocast's cast
rounds it, and its gradient is the bf16 gradient autocast would have upcast exactly. The master is kept to
the bit, but for a value exactly halfway between two bf16 values that rounds down, which moves one fp32
ulp toward zero (1 in 131,072 values, 2^-24 relative: an fp32 update rounds by up to half that itself).
With gradient accumulation each micro-batch's gradient is added to an fp32 one, as autocast accumulates
(`fold_grads`). What autocast leaves in fp32 stays fp32: the embedding (so the residual stream stays
fp32), norms, conv kernels, A_log, D, dt_bias, and a weight tied to any of them. The model's state dict
shows the fp32 masters (joined on the fly, on the host) and loads fp32 values into both halves, so
checkpoints, export and merges are those of an fp32 model; at the end of a run `unsplit` makes the model an
fp32 one again.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from hybrid_train.model.moe import CAST_BY_AUTOCAST
from hybrid_train.ops.fp32_halves import join_fp32, split_fp32


class BF16Weights:
    """Splits a model's autocast-cast fp32 parameters, in place, into bf16 parameters (the same Parameter
    objects, so an optimizer built on them keeps them) and int16 low halves (`low`); `unsplit` puts the
    fp32 masters back. enabled=False: none (every method then leaves the model and its gradients as they are)."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.low: dict[nn.Parameter, torch.Tensor] = {}
        self._fp32_grads: dict[nn.Parameter, torch.Tensor] = {}
        self._hooks = []
        if not enabled:
            return
        slots = [(module, name, param) for module in model.modules()
                 for name, param in module._parameters.items() if param is not None]
        cast: dict[nn.Parameter, bool] = {}
        for module, _, param in slots:  # a parameter in two modules (tied) is split only if both cast it
            cast[param] = cast.get(param, True) and isinstance(module, CAST_BY_AUTOCAST)
        with torch.no_grad():
            for param, yes in cast.items():
                if yes and param.requires_grad and param.dtype == torch.float32:
                    high, self.low[param] = split_fp32(param)
                    param.data = high
        owners = {id(module): module for module, _, param in slots if param in self.low}
        for module in owners.values():  # (closures: the hook API marks each hook, which a bound method refuses)
            self._hooks += [module.register_state_dict_post_hook(lambda *args: self._state_dict_hook(*args)),
                            module.register_load_state_dict_pre_hook(lambda *args: self._load_hook(*args))]

    def attach(self, optimizer) -> None:
        """Have `optimizer` step the split masters (the Triton AdamW is the one that can)."""
        from hybrid_train.train.optim import TritonAdamW

        if not isinstance(optimizer, TritonAdamW):
            raise TypeError(f"split fp32 masters are stepped by the Triton AdamW, not {type(optimizer).__name__}")
        optimizer.keep_split_masters(self)

    @torch.no_grad()
    def unsplit(self) -> None:
        """Put the fp32 masters back into the parameters (the model is then a plain fp32 model, as before the
        split) and stop splitting: the end of a run."""
        for param, low in self.low.items():
            param.data = self.master(param, low)
        for hook in self._hooks:
            hook.remove()
        self.low, self._hooks = {}, []
        self.zero_grad()

    @staticmethod
    def master(param: nn.Parameter, low: torch.Tensor) -> torch.Tensor:
        """The fp32 master of a split `param` (a new tensor)."""
        if param.dtype != torch.bfloat16 or param.shape != low.shape or param.device != low.device:
            raise RuntimeError(f"a bf16 weight with a split fp32 master became {param.dtype} {tuple(param.shape)} on "
                               f"{param.device}: convert the model after BF16Weights.unsplit(), which restores the "
                               "fp32 masters, not before")
        return join_fp32(param, low)

    # The model's state dict: fp32 masters out, on the host (all of a model's at once on the GPU would take 4
    # more bytes a weight while a checkpoint is written; one at a time they take 4 bytes of its largest);
    # fp32 values in, split into both halves.
    def _state_dict_hook(self, module, state_dict, prefix, local_metadata) -> None:
        for name, param in module._parameters.items():
            if param in self.low and prefix + name in state_dict:
                state_dict[prefix + name] = self.master(param, self.low[param]).cpu()

    def _load_hook(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs) -> None:
        for name, param in module._parameters.items():
            value = state_dict.get(prefix + name)
            if param in self.low and isinstance(value, torch.Tensor) and value.shape == param.shape:
                if local_metadata.get("assign_to_params_buffers"):
                    raise ValueError(f"load_state_dict(assign=True) would replace the split bf16 weight {prefix + name} "
                                     "(and the optimizer's hold on it): load without assign, or after unsplit()")
                high, low = split_fp32(value.to(param.device))
                self.low[param].copy_(low)
                state_dict[prefix + name] = high  # what the default load copies into the parameter

    @torch.no_grad()
    def fold_grads(self) -> None:
        """Add each split parameter's bf16 gradient to an fp32 one and clear it: after every micro-batch of an
        accumulated step (the last one too), so the sum is taken in fp32 as under autocast."""
        for param in self.low:
            if param.grad is None:
                continue
            held = self._fp32_grads.get(param)
            if held is None:
                self._fp32_grads[param] = param.grad.float()
            else:
                held.add_(param.grad)
            param.grad = None

    def grad(self, param: nn.Parameter) -> torch.Tensor | None:
        """`param`'s gradient: the fp32 sum of folded micro-batches if any, else its own."""
        held = self._fp32_grads.get(param)
        if held is None:
            return param.grad
        if param.grad is not None:
            raise RuntimeError("a split weight holds both folded micro-batch gradients and a later one that was not "
                               "folded: call BF16Weights.fold_grads() after every micro-batch, the last one too")
        return held

    def grads(self, params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
        """The gradients of `params` that exist (what the norm reads)."""
        return [g for g in (self.grad(p) for p in params) if g is not None]

    def zero_grad(self) -> None:
        self._fp32_grads.clear()

    def __bool__(self) -> bool:
        return bool(self.low)


def bf16_weights_for(job, model: nn.Module, optimizer, world_size: int,
                     autocast_dtype: torch.dtype | None) -> BF16Weights:
    """The run's split masters (`train.bf16_weights`; None = where they apply), attached to the optimizer
    that steps them; empty where they are off. Call it once the masters are final (initialized or loaded)."""
    from hybrid_train.train.optim import TritonAdamW

    wanted = job.train.bf16_weights
    why_not = (
        "they replace bf16 autocast's casts; this run computes in fp32 (train.precision)"
        if autocast_dtype != torch.bfloat16
        else f"they apply to one process; under FSDP (world size {world_size}) its all-gather casts the weights"
        if world_size > 1
        else f"the Triton AdamW steps them, and optim.impl={job.optim.impl} resolved to torch's AdamW here "
             "(the Triton step runs on CUDA)"
        if not isinstance(optimizer, TritonAdamW) else None)
    if wanted and why_not is not None:
        raise ValueError(f"train.bf16_weights=true: {why_not}")
    weights = BF16Weights(model, enabled=wanted is not False and why_not is None)
    if weights:
        weights.attach(optimizer)
    return weights
