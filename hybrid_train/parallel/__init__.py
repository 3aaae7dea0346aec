"""Process groups, the device mesh, and parallelisms applied to a built model (the model knows none)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hybrid_train.parallel.config import ParallelConfig

__all__ = ["ParallelConfig", "Distributed", "init_distributed", "parallelize", "all_reduce_mean"]


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None
    """(dp_replicate, dp_shard) mesh when more than one process, else None."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size


def init_distributed(cfg: ParallelConfig, device_type: str) -> Distributed:
    """Join the process group started by torchrun/srun (if any) and build the mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    replicate, shard = cfg.resolve(world)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world == 1:
        return Distributed(rank, world, local_rank, device, None)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    mesh = init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    return Distributed(rank, world, local_rank, device, mesh)


def parallelize(model: torch.nn.Module, env: Distributed, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2 (HSDP when dp_replicate > 1): each block, the embedding, [final norm + head], then the root.

    param_dtype: the dtype parameters are gathered in for compute (e.g. bf16); reductions stay fp32.
    """
    if env.mesh is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    mesh = env.mesh if env.mesh["dp_replicate"].size() > 1 else env.mesh["dp_shard"]
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp)
    if not model.cfg.tie_embeddings:
        # A tied matrix must live in one FSDP group: leave embedding and head to the root.
        fully_shard(model.embed, mesh=mesh, mp_policy=mp)
        fully_shard([model.norm, model.lm_head], mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (identity in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
