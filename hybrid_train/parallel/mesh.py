"""Joining the process group and building the (dp_replicate, dp_shard, tp) device mesh."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hybrid_train.parallel.config import ParallelConfig
from hybrid_train.parallel.ep import build_ep_mesh

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None
    """(dp_replicate, dp_shard, tp) mesh when more than one process, else None."""
    cfg: ParallelConfig = field(default_factory=ParallelConfig)
    """The layout and knobs `parallelize` applies."""
    cpu_group: dist.ProcessGroup | None = None
    """A gloo group over all ranks for host-side agreement (stop, data exhausted) in NCCL runs, so
    agreeing never waits for the GPU; None = the default group (already gloo on CPU)."""
    ep_mesh: DeviceMesh | None = None
    """(ep_dp, ep) mesh of expert parallelism when parallel.ep > 1, else None."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp_size(self) -> int:
        return 1 if self.mesh is None else self.mesh["tp"].size()

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each reads different data; the TP ranks of one of them read the same."""
        return self.world_size // self.tp_size

    @property
    def dp_rank(self) -> int:
        if self.mesh is None:
            return 0
        rep, shard, _ = self.mesh.get_coordinate()
        return rep * self.mesh["dp_shard"].size() + shard

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        """The mesh FSDP shards over: (dp_replicate, dp_shard) for HSDP, else dp_shard. None when there is
        one data-parallel rank (TP only): no FSDP, the parameters stay TP DTensors in their own dtype."""
        if self.mesh is None or self.dp_size == 1:
            return None
        if self.mesh["dp_replicate"].size() > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.mesh["dp_shard"]

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        return None if self.mesh is None or self.tp_size == 1 else self.mesh["tp"]


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str) -> DeviceMesh:
    """The (dp_replicate, dp_shard, tp) mesh; tp innermost so a TP group is adjacent ranks (one node)."""
    sizes = cfg.resolve(world_size)
    return init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)


def init_distributed(cfg: ParallelConfig, device_type: str, model_cfg=None, seq_len: int | None = None) -> Distributed:
    """Join the process group started by torchrun/srun (if any) and build the mesh.

    model_cfg / seq_len: checked against the layout here, before any work (TP divisibility)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cfg.resolve(world)  # size errors before joining anything
    if model_cfg is not None:
        cfg.check_model(model_cfg, seq_len)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world == 1:
        return Distributed(rank, world, local_rank, device, None, cfg)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    ep_mesh = build_ep_mesh(device_type, world, cfg.ep) if cfg.ep > 1 else None
    return Distributed(rank, world, local_rank, device, build_mesh(cfg, world, device_type), cfg,
                       cpu_group=cpu_group, ep_mesh=ep_mesh)
