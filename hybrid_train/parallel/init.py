"""Weight initialization that gives the same values under every parallel layout.

A random in-place init of a DTensor (`normal_`, `uniform_`, ...) fills each rank's shard. On CPU each
rank draws its shard from its own, identically seeded generator, so the shards of one matrix come out
equal (rows that start equal, e.g. duplicated heads) and the values depend on the layout; CUDA's DTensor
RNG tracker gives distinct shards, but still not the single-process values. Under `full_tensor_init()`
every such init draws the full tensor from the generator and keeps this rank's part: the values, and the
generator's state afterwards, are those of the single-process model on any device and layout. It costs
one full tensor at a time (the largest is the embedding), once, at initialization."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode

# In-place random fills, as tensor methods and as torch.nn.init functions (which dispatch on their
# own, so the mode sees them before the tensor method they call). Every one fills its first argument.
_RANDOM_INPLACE = {
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.exponential_,
    torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.geometric_, torch.Tensor.random_,
    nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_, nn.init.kaiming_normal_, nn.init.kaiming_uniform_,
    nn.init.xavier_normal_, nn.init.xavier_uniform_, nn.init.orthogonal_, nn.init.sparse_,
}


class full_tensor_init(TorchFunctionMode):
    """`with full_tensor_init(): model.init_weights()` after `to_empty` on a parallelized model."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        # torch.nn.init functions pass the tensor as a keyword (`tensor=`), tensor methods as args[0].
        target = args[0] if args else kwargs.get("tensor")
        if func not in _RANDOM_INPLACE or not isinstance(target, DTensor):
            return func(*args, **kwargs)
        full = torch.empty(target.shape, dtype=target.dtype, device=target.device)
        if args:
            func(full, *args[1:], **kwargs)
        else:
            func(**{**kwargs, "tensor": full})
        # The same full tensor on every rank: slice locally, no communication.
        mine = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
        with torch.no_grad():
            target.to_local().copy_(mine.to_local())
        return target
