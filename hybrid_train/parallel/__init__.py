"""Process groups, the device mesh, and parallelisms applied to a built model (the model knows none).

Order (as torchtitan): TP -> EP -> activation checkpointing -> torch.compile -> FSDP. TP rewrites the
modules' parameters and inputs, AC wraps a block's (TP) forward, compile traces that, and FSDP's
gather/reshard hooks go around the result.
"""

from __future__ import annotations

import torch

from hybrid_train.parallel.ac import apply_ac
from hybrid_train.parallel.collectives import (all_reduce_mean, any_rank, barrier, clip_grad_norm_, destroy,
                                               full_tensor, grad_norm, sum_over_data_parallel, total_norm)
from hybrid_train.parallel.compile import apply_compile
from hybrid_train.parallel.config import ParallelConfig
from hybrid_train.parallel.ep import apply_ep
from hybrid_train.parallel.fsdp import apply_fsdp
from hybrid_train.parallel.init import full_tensor_init
from hybrid_train.parallel.mesh import Distributed, build_mesh, init_distributed
from hybrid_train.parallel.tp import apply_tp, loss_parallel_context

__all__ = ["ParallelConfig", "Distributed", "init_distributed", "build_mesh", "parallelize", "full_tensor_init",
           "clip_grad_norm_", "grad_norm", "total_norm", "any_rank", "all_reduce_mean", "full_tensor", "loss_context",
           "loss_parallel_context", "barrier", "destroy", "sum_over_data_parallel"]


def parallelize(model: torch.nn.Module, env: Distributed, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Apply env.cfg's layout and knobs to a built HybridLM (on meta or materialized), in place.

    param_dtype: the dtype FSDP gathers parameters in for compute (e.g. bf16); gradients are reduced
    in parallel.reduce_dtype. A single process gets only activation checkpointing and compile.
    """
    cfg = env.cfg
    cfg.check_model(model.cfg)
    if env.tp_mesh is not None:
        apply_tp(model, env.tp_mesh, cfg.sequence_parallel, cfg.loss_parallel)
    if env.ep_mesh is not None:
        apply_ep(model, env.ep_mesh)
    apply_ac(model, cfg.activation_checkpoint, cfg.ac_every_n_blocks)
    if cfg.compile_on(env.device.type):
        apply_compile(model, cfg.compile_backend)
    if env.dp_mesh is not None:
        apply_fsdp(model, env.dp_mesh, param_dtype, getattr(torch, cfg.reduce_dtype), cfg.reshard_after_forward,
                   env.ep_mesh)
    return model


def loss_context(env: Distributed):
    """Where the loss and its backward must run: vocabulary-parallel when parallel.loss_parallel."""
    return loss_parallel_context(env.tp_mesh is not None and env.cfg.loss_parallel)
