"""The optimizer step beside the next forward (one CUDA process, the Triton AdamW).

Once backward is done the whole step is decided (the gradient norm gives the clip and the non-finite
skip), but the next forward needs the new weights one module at a time: the embedding's first, then
block 0's, the head's last. So the step is launched on a side stream in that order, one group of launches
per module, each group followed by an event, and each module of the next forward first waits for its own
event (a forward pre-hook). The loop runs on a stream of higher priority than the optimizer's, so the
forward's thread blocks are scheduled first.

What it buys is less than the optimizer's time. At 9B width (8 blocks, 4096 tokens a step, an H100) AdamW
takes 28 ms after backward; beside the forward it is hidden, but the forward takes 27 ms longer: the two
share the SMs and the memory, and the forward loses about as much time as AdamW gains. The step is
1.4-1.6% faster compiled and 1.5% eager (BENCHMARKS.md); at the same stream priority 0.6%. Marking AdamW's
loads and stores to leave L2 first did not help. Nor did splitting the GPU between the two (measured on
an H100, BENCHMARKS.md): AdamW on a grid of K programs looping over blocks, with the forward's matmuls told
to leave K SMs free (torch's SM carveout, which plain cuBLAS ignores: so through cuBLASLt), made the step
3-9% slower than the plain overlap at K = 32, 48 and 66. cuBLASLt alone ran a 4096 x 14336 bf16 matmul 12%
slower than cuBLAS, and the forward's memory-bound kernels contend with AdamW for bandwidth whatever the SMs.

The numbers do not change: every weight is written before anything reads it, by the same kernels with
the same arguments (`TritonAdamW.step(only=...)` keeps each tensor's place, hence its rounding seed).
Outside the forward, whatever reads weights or optimizer state (a checkpoint, the end of the run) calls
`join` first.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def forward_units(model: nn.Module) -> list[nn.Module]:
    """The model's top-level modules in the order they are registered, which is the order HybridLM's forward
    runs them (embedding, blocks, final norm, head), with the containers of blocks opened. Another order
    would cost overlap, never correctness: a module's event comes after every earlier group's."""
    units = []
    for child in model.children():
        units.extend(child.children() if isinstance(child, (nn.ModuleDict, nn.ModuleList)) else [child])
    return units


def step_groups(model: nn.Module, params: list[nn.Parameter]) -> list[tuple[nn.Module, set[nn.Parameter]]]:
    """`params` (the optimizer's) grouped by the forward unit that holds them, in forward order; a parameter
    in two units (a tied head) goes with the first, one in none with the model itself, first of all."""
    wanted = set(params)
    groups, taken = [], set()
    for unit in forward_units(model):
        own = {p for p in unit.parameters() if p in wanted and p not in taken}
        taken |= own
        if own:
            groups.append((unit, own))
    rest = wanted - taken
    if rest or not groups:
        groups.insert(0, (model, rest))
    return groups


class OptimizerOverlap:
    """Steps the optimizer on a side stream, module by module in forward order, while the next forward runs
    (see the module's doc). enabled=False: `step` is the optimizer's own and every other method does nothing.

    Use: `begin()` before the loop (the loop then runs on the high-priority stream), `step` as
    clip_and_step's step, `join()` before reading weights or optimizer state outside the forward, `close()`
    at the end (joins, restores the stream, removes the hooks)."""

    forward_first = True
    """Run the loop on a stream of higher priority than the optimizer's (scripts/bench_train.py compares)."""

    def __init__(self, model: nn.Module, optimizer, enabled: bool):
        self.enabled = enabled
        self.groups: list[tuple[nn.Module, set[nn.Parameter]]] = []
        self._events: dict[nn.Module, torch.cuda.Event] = {}
        self._hooks = []
        self._outer = None
        self.timing: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        """(start, end) events of the last step on the side stream: its span, beside the forward."""
        if not enabled:
            return
        wanted = [p for group in optimizer.param_groups for p in group["params"]]
        if not wanted:  # nothing to step (every parameter frozen)
            self.enabled = False
            return
        device = wanted[0].device
        self.stream = torch.cuda.Stream(device)  # priority 0, the lowest
        self.compute = torch.cuda.Stream(device, priority=-1) if self.forward_first else None
        self.groups = step_groups(model, wanted)
        self._hooks = [unit.register_forward_pre_hook(self._waiter(unit)) for unit, _ in self.groups]

    def _waiter(self, unit: nn.Module):
        @torch.compiler.disable  # a block's hooks run inside its compiled call: keep the wait out of the graph
        def wait_for_update(module, args) -> None:
            event = self._events.pop(unit, None)
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
        return wait_for_update

    def begin(self) -> None:
        """Run from here on the loop's stream (after what the current one has queued)."""
        if self.enabled and self.compute is not None:
            self._outer = torch.cuda.current_stream()
            self.compute.wait_stream(self._outer)
            torch.cuda.set_stream(self.compute)

    def step(self, optimizer) -> None:
        """The optimizer's step (clip and skip already set on it), queued on the side stream in forward order."""
        if not self.enabled:
            optimizer.step()
            return
        side = self.stream
        side.wait_stream(torch.cuda.current_stream())  # gradients, clip and skip are computed
        # What the side stream reads and the loop frees before it is read (zero_grad, the clip's scalars):
        # its memory waits for the side stream before the allocator hands it out again.
        for tensor in optimizer.grads() + [optimizer.grad_scale, optimizer.found_inf]:
            if tensor is not None:
                tensor.record_stream(side)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            start.record()
            for unit, params in self.groups:
                optimizer.step(only=params)
                event = torch.cuda.Event()
                event.record()
                self._events[unit] = event
            end.record()
        self.timing = (start, end)

    def join(self) -> None:
        """Make the current stream wait for the whole step (weights and optimizer state are then final)."""
        if self.enabled:
            torch.cuda.current_stream().wait_stream(self.stream)
            self._events.clear()

    def close(self) -> None:
        if not self.enabled:
            return
        self.join()
        if self._outer is not None:
            torch.cuda.set_stream(self._outer)
            self._outer.wait_stream(self.compute)
            self._outer = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def overlap_for(job, model: nn.Module, optimizer, world_size: int, device: torch.device) -> OptimizerOverlap:
    """The run's OptimizerOverlap (`train.overlap_optimizer`; None = where it applies)."""
    from hybrid_train.train.optim import TritonAdamW

    wanted = job.train.overlap_optimizer
    why_not = ("it overlaps CUDA streams; this run is on the CPU" if device.type != "cuda"
               else f"it applies to one process; under FSDP (world size {world_size}) the all-gathers read the "
                    "weights on their own streams" if world_size > 1
               else f"it steps the Triton AdamW module by module, and optim.impl={job.optim.impl} resolved to "
                    "torch's AdamW" if not isinstance(optimizer, TritonAdamW) else None)
    if wanted and why_not is not None:
        raise ValueError(f"train.overlap_optimizer=true: {why_not}")
    return OptimizerOverlap(model, optimizer, enabled=wanted is not False and why_not is None)
