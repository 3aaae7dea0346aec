"""Registering the Triton-backed ops: a torch.library custom op for traced code, a plain call for eager.

torch.compile needs custom ops (with fake implementations and a registered autograd formula) to
trace through Triton launches without graph breaks. Called eagerly, a custom op costs host time on
every call (its generated autograd wrapper, the boxed redispatch, output checks): measured on an
H100, 0.2-0.6 ms per SSD forward+backward, where one layer's GPU work is 1-3 ms and eager training
is launch-bound at small shapes. So each op here is callable both ways: while tracing it is the
custom op; eagerly it runs the same implementation, setup_context and backward through a plain
``torch.autograd.Function``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def kernel_op(name: str, fake: Callable, setup_context: Callable | None = None,
              backward: Callable | None = None) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` (typed as torch.library.custom_op requires) becomes an op named ``name``.

    ``fake`` gives output shapes for tracing; ``setup_context(ctx, inputs, output)`` and
    ``backward(ctx, *grads)`` form its autograd formula as in ``CustomOpDef.register_autograd``
    (backward gets None for outputs whose gradient is absent). The returned callable has the
    custom op as ``.op``.
    """

    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)
        eager = fn
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
            eager = _autograd_function(name, fn, setup_context, backward)

        def call(*args):
            if is_tracing(args):
                return op(*args)
            return eager(*args)

        call.op = op
        call.__name__ = call.__qualname__ = fn.__name__
        call.__doc__ = fn.__doc__
        return call

    return wrap


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_tracing(args: tuple) -> bool:
    """Whether this call is being traced (dynamo, AOTAutograd, make_fx, a dispatch mode).

    ``torch.compiler.is_compiling()`` alone is not enough: seen on torch 2.11, AOTAutograd traced
    the registered backward with it False, so the raw kernel met fake tensors. Tracing shows in the
    arguments (fake / functional tensor subclasses) or in an active dispatch mode.
    """
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN for a in args)


def _autograd_function(name: str, fn: Callable, setup_context: Callable, backward: Callable) -> Callable:
    def forward(*args):
        return fn(*args)

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # absent output gradients stay None: no zero tensors
        setup_context(ctx, inputs, output)

    def grads(ctx, *output_grads):
        return backward(ctx, *output_grads)

    cls = type(f"Eager_{name.replace('::', '_')}", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup),
        "backward": staticmethod(grads),
    })

    def apply(*args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return cls.apply(*args)
        return fn(*args)  # nothing to differentiate: skip the autograd node

    return apply
