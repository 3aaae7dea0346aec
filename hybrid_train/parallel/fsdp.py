"""FSDP2 (HSDP over a 2-D data-parallel mesh): one group per block, the embedding, and [norm + head]."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype,
               reshard_after_forward: bool, ep_mesh: DeviceMesh | None = None) -> None:
    """Shard `model` (a HybridLM, after TP / EP / AC / compile) over `dp_mesh` in place.

    Parameters that are already TP DTensors get sharded over both meshes. param_dtype: the dtype
    parameters are gathered in for compute (e.g. bf16); gradients are reduced in reduce_dtype.
    Expert-parallel experts (ep_mesh) get their own group over ep_mesh["ep_dp"], the ranks holding the
    same experts; with none (ep = data-parallel size) FSDP leaves them alone.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    moe = model.moe_blocks() if ep_mesh is not None else {}
    ignored: set[nn.Parameter] = set()
    for i, block in model.layers.items():
        mine: set[nn.Parameter] = set()
        if i in moe:
            experts = moe[i].experts
            if ep_mesh["ep_dp"].size() > 1:
                fully_shard(experts, mesh=ep_mesh["ep_dp"], mp_policy=mp, reshard_after_forward=reshard_after_forward)
            else:
                mine = {experts.gate_up_proj, experts.down_proj}
                ignored |= mine
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                    ignored_params=mine or None)
    if not model.cfg.tie_embeddings:
        # A tied matrix must live in one FSDP group: leave embedding and head to the root.
        fully_shard(model.embed, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        # Backward starts with the head right after forward: keeping it gathered saves an all-gather.
        fully_shard([model.norm, model.lm_head], mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                ignored_params=ignored or None)
