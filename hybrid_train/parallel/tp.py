"""Tensor parallelism of the hybrid LM with DTensor (Megatron-style), applied to a built model.

Each mixer and each MLP costs one all-reduce in forward and one in backward (with sequence parallelism
an all-gather and a reduce-scatter instead):
- Attention: q/k/v column-parallel (whole query and KV heads per rank), o row-parallel.
- MLP: gate/up column-parallel, down row-parallel.
- Mamba-2 (grouped-value heads): each rank holds its slice of every in_proj component, z and x by
  heads, B and C by groups, dt by heads; the conv1d channels, A_log, D, dt_bias and the gated-norm
  weight follow. The components are separate Linears, so a plain row split of each one is a split by
  heads (x, z are head-major) or groups (B, C are group-major). With heads and groups split into the
  same number of contiguous blocks, a rank's heads use exactly its groups, and the grouped norm needs
  whole groups per rank: no communication until out_proj, which is row-parallel.
  (A contiguous split of Hugging Face's packed [z | x | B | C | dt] in_proj would give rank 0 all of z
  and part of x instead; tests show that it computes something else.)

The mixer and MLP inputs become replicated DTensors once, at the module boundary: the column-parallel
projections then add their partial input gradients as DTensors, and one all-reduce (reduce-scatter
with sequence parallelism) makes the gradient whole, instead of one per projection.

Sequence parallelism keeps the residual stream and the norms sharded over the sequence between the
mixers and MLPs: an all-gather in front of each, a reduce-scatter after. Loss parallelism leaves the
logits sharded over the vocabulary for torch's vocabulary-parallel cross entropy.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)

from hybrid_train.model.config import ATTENTION


class ReplicateParallel(ParallelStyle):
    """Parameters replicated over the TP mesh, plain tensors in and out (a norm without sequence
    parallelism). Every parameter then lives on the TP mesh, so FSDP, gradient clipping and
    checkpoints see one mesh; the replicated weight gets identical gradients on every TP rank."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, partition_fn=None,  # None: replicate all parameters
                                 input_fn=_inputs_to_replicate, output_fn=_output_to_local)


def _inputs_to_replicate(module, inputs, device_mesh):
    return tuple(DTensor.from_local(x, device_mesh, (Replicate(),), run_check=False)
                 if not isinstance(x, DTensor) else x for x in inputs)


def _output_to_local(module, output, device_mesh):
    return output.to_local() if isinstance(output, DTensor) else output


def shard_own_parameters(module: nn.Module, mesh: DeviceMesh, dim: int = 0) -> None:
    """Shard the module's own parameters (not its children's) on `dim` over the TP mesh.

    For tensors the mixer uses directly rather than through a submodule's forward (conv1d kernels,
    A_log, D, dt_bias, the gated-norm weight): the model takes their local shard (`to_local`)."""
    for name, param in list(module.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.data, mesh, (Shard(dim),))
        module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def _module_input(seq, n_args: int) -> PrepareModuleInput:
    """Make a mixer's / MLP's first input a replicated DTensor (all-gathered from `seq` shards with
    sequence parallelism); other inputs (position_ids, seq_idx) pass through."""
    rest = (None,) * (n_args - 1)
    return PrepareModuleInput(input_layouts=(seq, *rest), desired_input_layouts=(Replicate(), *rest),
                              use_local_output=False)


def apply_tp(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool, loss_parallel_: bool) -> None:
    """Shard `model` (a HybridLM, on any device including meta) over the TP mesh in place."""
    seq = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream (b, t, d)
    norm = SequenceParallel() if sequence_parallel else ReplicateParallel()
    parallelize_module(model, mesh, {
        # Vocabulary-parallel embedding: each rank looks up its rows, the sum (or reduce-scatter) completes it.
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "norm": norm,
        "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1) if loss_parallel_ else Replicate(),
                                   use_local_output=not loss_parallel_),
    })
    for block in model.layers.values():
        plan = {"mixer_norm": norm, "mixer": _module_input(seq, 3)}
        if block.layer_type == ATTENTION:
            plan.update({f"mixer.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")})
            plan["mixer.o_proj"] = RowwiseParallel(output_layouts=seq)
        else:
            plan.update({f"mixer.in_proj.{c}": ColwiseParallel() for c in ("z", "x", "B", "C", "dt")})
            plan["mixer.out_proj"] = RowwiseParallel(output_layouts=seq)
        if block.mlp is not None:
            plan.update({"mlp_norm": norm, "mlp": _module_input(seq, 1),
                         "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                         "mlp.down_proj": RowwiseParallel(output_layouts=seq)})
        parallelize_module(block, mesh, plan)
        if block.layer_type != ATTENTION:
            mixer = block.mixer
            for module in (mixer, mixer.norm, *mixer.conv1d.values()):
                shard_own_parameters(module, mesh)


def loss_parallel_context(enabled: bool):
    """Context for the loss and its backward when the logits are vocabulary-sharded DTensors."""
    return loss_parallel() if enabled else contextlib.nullcontext()
