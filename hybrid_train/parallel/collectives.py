"""Reductions the training loop needs, correct for any layout (and plain in a single process)."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from hybrid_train.ops.reductions import sum_squares


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole value as a plain tensor: a DTensor gathered (a loss computed under loss parallelism is
    a DTensor replicated over TP, which plain tensors cannot be added to), anything else unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """The part this rank holds: the local shard of a DTensor (FSDP2, TP, EP), anything else unchanged."""
    return value.to_local() if isinstance(value, DTensor) else value


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (identity in a single process)."""
    value = full_tensor(value)
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def sum_over_data_parallel(value: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Sum of a per-replica count (tokens read, per source) over the data-parallel ranks. The TP ranks of
    one replica read the same data and hold the same count, so the sum over all ranks is tp_size times it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= tp_size
    return value


@torch.no_grad()
def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (`total_norm`)."""
    return total_norm([p.grad for p in parameters if p.grad is not None])


@torch.no_grad()
def total_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of gradients, as a 0-dim float32 tensor on their device (no host sync).

    The norm is over the whole model whatever the layout: for a DTensor gradient, the sharded dims
    (FSDP, TP) contribute every shard once and the replicated dims (HSDP replicas, TP-replicated
    norms) once in total. Gradients are grouped by mesh, since a norm can only combine DTensors of
    one mesh. Plain gradients of a low-precision dtype (bf16 weights) are summed in fp32: a bf16
    norm would be off by up to 0.4%, and with it the clip."""
    squares = []
    for mesh, group in _by_mesh(list(grads)).items():
        if mesh is None:
            squares.append(_fp32_sum_squares(group))
            continue
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float().square())
    if not squares:
        return torch.zeros(())
    return torch.stack(squares).sum().sqrt()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip gradients to a global L2 norm of max_norm (0 = only measure); returns the norm before.
    (The trainer instead folds the clip into the fused optimizer step: `train.optim.clip_and_step`.)"""
    parameters = list(parameters)
    total = float(grad_norm(parameters))
    if max_norm > 0:
        coef = max_norm / (total + 1e-6)  # as torch.nn.utils.clip_grad_norm_
        if coef < 1.0:
            grads = [p.grad for p in parameters if p.grad is not None]
            for mesh_grads in _by_mesh(grads).values():
                torch._foreach_mul_(mesh_grads, coef)
    return total


def _fp32_sum_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of plain tensors of any dtypes and devices, each summed in fp32 (get_total_norm
    keeps a bf16 tensor's norm in bf16), on the first one's device."""
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_device[g.device].append(g)
    return torch.stack([sum_squares(group).to(grads[0].device) for group in by_device.values()]).sum()


def _by_mesh(tensors: list[torch.Tensor]) -> dict[object, list[torch.Tensor]]:
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[t.device_mesh if isinstance(t, DTensor) else None].append(t)
    return groups


def any_rank(flags: list[bool], group=None) -> list[bool]:
    """Each flag OR-ed over all ranks, through a CPU (gloo) group: host-side, so it never waits for the
    GPU's queue of work to drain. Identity in a single process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(flags)
    values = torch.tensor([1.0 if f else 0.0 for f in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in values.tolist()]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
