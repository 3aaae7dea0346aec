"""Expert parallelism: the routed experts of every MoE block split over the `ep` ranks of a group of
data-parallel ranks, tokens sent to their experts' ranks and back with all-to-all.

The EP mesh is (ep_dp, ep) over all ranks, ep innermost (adjacent ranks share their tokens' experts):
an expert tensor (E, ...) is a DTensor sharded on dim 0 over `ep` (E / ep experts per rank), and FSDP2
shards it further over `ep_dp`, the ranks that hold the same experts. Everything else is FSDP2 over
the whole data-parallel mesh as without EP.

One MoE forward on a rank, its (token, expert) pairs already sorted by expert (hybrid_train.model.moe):
1. all-to-all of the pair counts per expert: each rank learns how many rows every rank sends it;
2. all-to-all of the rows (dispatch), regrouped by local expert; 3. the rank's experts as grouped GEMMs;
4. the inverse regrouping and all-to-all back (combine). Both all-to-alls are differentiable.

Gradients: the owner of an expert receives the gradient of every EP peer's loss; the data-parallel
mean divides by the world size, so the expert weights' gradient is scaled by 1/ep here and FSDP divides
by the ep_dp size (with no ep_dp peers there is no FSDP on the experts and 1/ep is all of it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from hybrid_train.model.moe import GroupedExperts
from hybrid_train.parallel.collectives import local_tensor

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts whose weights hold this rank's E/ep experts; forward dispatches and combines."""

    ep_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (n, d) this rank's pairs sorted by expert, counts (E,) over all experts -> (n, d)."""
        group = self.ep_group
        ep = dist.get_world_size(group)
        gate_up, down = (local_tensor(getattr(self, name)) for name in EXPERT_PARAMS)
        gate_up, down = _ScaleGrad.apply(gate_up, 1.0 / ep), _ScaleGrad.apply(down, 1.0 / ep)
        n_local = gate_up.shape[0]
        send = counts.view(ep, n_local).contiguous()  # rows for (destination rank, its expert)
        recv = torch.empty_like(send)  # rows from (source rank, my expert)
        dist.all_to_all_single(recv, send, group=group)
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        rows = all_to_all_single_autograd(x.contiguous(), recv_splits, send_splits, group)  # (m, d) by source
        block = torch.repeat_interleave(torch.arange(recv.numel(), device=x.device), recv.flatten())
        order = ((block % n_local) * ep + block // n_local).argsort(stable=True)  # by (expert, source)
        y = self.compute(rows[order], recv.sum(0), gate_up, down)  # (m, d) by expert
        y = y[order.argsort()]  # back to (source, expert) order
        return all_to_all_single_autograd(y.contiguous(), send_splits, recv_splits, group)


def build_ep_mesh(device_type: str, world_size: int, ep: int) -> DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=("ep_dp", "ep"))


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE block's experts over ep_mesh["ep"] in place (on any device, meta included)."""
    mesh = ep_mesh["ep"]
    for moe in model.moe_blocks().values():
        experts = moe.experts
        for name in EXPERT_PARAMS:
            param = getattr(experts, name)
            sharded = distribute_tensor(param.data, mesh, (Shard(0),))
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        experts.__class__ = ExpertParallelExperts
        experts.ep_group = mesh.get_group()


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [getattr(moe.experts, name) for moe in model.moe_blocks().values() for name in EXPERT_PARAMS]
