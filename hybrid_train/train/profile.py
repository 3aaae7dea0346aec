"""torch.profiler over a few training steps: a trace per rank and, on rank 0, where the device time went.

`logging.profile_from=N logging.profile_steps=K` profiles steps N+1 .. N+K. Each rank writes
<run.dir>/profile/rank<R>_steps<N+1>-<N+K>.json.gz (open it in Perfetto or chrome://tracing); rank 0
writes profile/summary.txt: GPU time per step by kind of kernel (matmul, attention, this project's
Triton kernels, compiled elementwise, ...) and the largest kernels (on CPU: the largest ops by self CPU
time), and logs the kind table.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from hybrid_train.train.config import LoggingConfig

# First match wins; a kernel's name decides its kind.
KERNEL_KINDS = (
    ("communication", re.compile(r"nccl|gloo", re.I)),
    ("memcpy / memset", re.compile(r"memcpy|memset", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|flex", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|wgmma|_grouped_mm|matmul", re.I)),
    ("compiled (inductor)", re.compile(r"^triton_(poi|red|per|tem)_")),
    ("Triton (this project)", re.compile(r"^_")),  # the kernels of hybrid_train.ops.triton: `_name_kernel`
    ("reduction / norm", re.compile(r"reduce|norm|softmax|cross_entropy|nll", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|CatArrayBatched|copy|fill|index", re.I)),
)


def _is_kernel(event) -> bool:
    """A device event that is a kernel or copy, not a range a `record_function` (the optimizer's step,
    for one) marks on the device timeline."""
    return (event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
            and not event.name.startswith(("Optimizer.", "ProfilerStep")))


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel by its name (KERNEL_KINDS), 'other' when none matches."""
    for kind, pattern in KERNEL_KINDS:
        if pattern.search(name):
            return kind
    return "other"


def summarize(kernels: list[tuple[str, float]], steps: int, top: int = 40) -> list[str]:
    """Lines of a report over (kernel name, microseconds) of `steps` steps: ms per step by kind, then
    the `top` kernels by total time."""
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, us in kernels:
        by_kind[kernel_kind(name)] += us
        by_name[name][0] += us
        by_name[name][1] += 1
    total = sum(by_kind.values()) or 1.0
    lines = [f"GPU time per step by kind ({steps} steps profiled; {total / 1e3 / steps:.1f} ms of kernels a step):"]
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:<24} {us / 1e3 / steps:8.2f} ms  {us / total:6.1%}")
    lines.append("largest kernels (ms per step, launches per step, name):")
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {us / 1e3 / steps:8.2f} ms  {n / steps:6.1f}  {name[:150]}")
    return lines


def summarize_cpu(events, steps: int, top: int = 25) -> list[str]:
    """Lines of a report of the ops with the most self CPU time (a CPU run has no kernels)."""
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    lines = [f"largest ops by self CPU time ({steps} steps profiled; ms per step, calls per step, name):"]
    for e in rows:
        lines.append(f"  {e.self_cpu_time_total / 1e3 / steps:8.2f} ms  {e.count / steps:6.1f}  {e.key[:150]}")
    return lines


class StepProfiler:
    """Profiles steps cfg.profile_from+1 .. cfg.profile_from+cfg.profile_steps, cut to the run's last step.

    The trainer calls `after_step(step)` once a step and its logging are done; it returns True when the
    profiler started or stopped there, so that the trainer restarts its throughput window and neither the
    start nor the trace export lands in a logged rate. The report of a finished profile is `take_report()`.
    Nothing is done (or costs anything) when no step is profiled."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, rank: int, device: torch.device, start_step: int,
                 total_steps: int):
        end = cfg.profile_from + cfg.profile_steps
        self.first = max(cfg.profile_from, start_step) + 1  # resumed inside the window: what is left of it
        self.last = min(end, total_steps)
        self.enabled = cfg.profile_from > 0 and self.first <= self.last
        self.dir, self.rank, self.device = run_dir / "profile", rank, device
        self.notes: list[str] = []
        if cfg.profile_from > 0 and end > total_steps and start_step < end:
            what = f"profiling steps {self.first}-{self.last}" if self.enabled else "nothing is profiled"
            self.notes.append(f"logging.profile_from={cfg.profile_from} with logging.profile_steps={cfg.profile_steps} "
                              f"runs past the run's last step ({total_steps}): {what}")
        self._prof = None
        self._report: list[str] = []
        self._done = start_step
        if self.enabled and self.first == start_step + 1:
            self._start()

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()

    def after_step(self, step: int) -> bool:
        """Start before the first profiled step, stop after the last; True when either happened."""
        if not self.enabled:
            return False
        self._done = step
        if step == self.first - 1 and self._prof is None:
            self._start()
            return True
        if step == self.last and self._prof is not None:
            self._report = self._stop(self.last)
            return True
        return False

    def take_report(self) -> list[str]:
        """Lines for the log about the profile that just stopped (empty on ranks other than 0)."""
        report, self._report = self._report, []
        return report

    def _stop(self, last: int) -> list[str]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._prof.__exit__(None, None, None)
        prof, self._prof, self.enabled = self._prof, None, False
        steps = last - self.first + 1
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"rank{self.rank}_steps{self.first}-{last}.json.gz"
        prof.export_chrome_trace(str(trace))
        if self.rank != 0:
            return []
        kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if _is_kernel(e)]
        lines = summarize(kernels, steps) if kernels else summarize_cpu(prof.key_averages(), steps)
        (self.dir / "summary.txt").write_text("\n".join(lines) + "\n")
        return [f"profiled steps {self.first}-{last}: trace {trace}, summary {self.dir / 'summary.txt'}"] + lines

    def close(self) -> list[str]:
        """A profile the run stopped inside of (a stop request, an error): written for the steps it covers."""
        if self._prof is None:
            return []
        if self._done < self.first:
            self._prof.__exit__(None, None, None)
            self._prof = None
            return []
        try:
            return self._stop(self._done)
        except Exception as err:  # the run is ending on an error already: report, do not mask it
            self._prof = None
            return [f"the profile of steps {self.first}-{self._done} was not written: {type(err).__name__}: {err}"]
