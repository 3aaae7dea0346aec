"""What a user sees of a run: progress bar, log lines, train.log, metrics.jsonl, wandb; throughput and MFU."""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from hybrid_train.train.config import LoggingConfig

# Written to metrics.jsonl but kept off the console line (dicts, one screen per log line).
QUIET_KEYS = ("source_tokens", "time_ms", "moe_load")
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def device_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None when unknown (CPU, unlisted GPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


LOG_FILE = "train.log"


class RunLog:
    """<run.dir>/train.log: what the console shows (the header, log lines, resume and checkpoint lines,
    the summary) plus every Python warning (skipped records, checkpoint fallbacks) and a setup error.
    Rank 0 writes all of it; the other ranks append only their warnings, prefixed `[rank N]`.
    While open it also routes `warnings.warn` here (and still to the console)."""

    def __init__(self, run_dir: Path, rank: int = 0):
        self.rank = rank
        self.prefix = "" if rank == 0 else f"[rank {rank}] "
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOG_FILE
        self._file = self.path.open("a", buffering=1)  # one line per write: ranks may share the file
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._on_warning

    def write(self, message: str) -> None:
        """Add message to the file (rank 0 only; see warning for the other ranks)."""
        if self.rank == 0:
            self._write(message)

    def warning(self, message: str, echo: bool = True) -> None:
        """A warning from any rank: to the file (prefixed on ranks > 0) and, with echo, to stderr."""
        self._write(f"warning: {message}")
        if echo:
            print(f"{self.prefix}warning: {message}", file=sys.stderr, flush=True)

    def _write(self, message: str) -> None:
        if self._file is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._file.write("".join(f"{stamp} {self.prefix}{line}\n" for line in message.splitlines() or [""]))

    def _on_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self._showwarning(message, category, filename, lineno, file, line)
        self._write(f"warning: {message}")

    def close(self) -> None:
        if warnings.showwarning == self._on_warning:
            warnings.showwarning = self._showwarning
        if self._file is not None:
            self._file.close()
            self._file = None


def drop_rows_after(path: Path, step: int) -> int:
    """Remove the records of metrics.jsonl logged after `step` (a run that resumes from that step logs
    them again), so every step keeps one row; returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def router_metrics(model, env) -> dict:
    """Expert load since the last call and router losses of the last micro-batch, over all data-parallel
    ranks (every rank calls it): `moe_load` per MoE block (layer index -> max/mean tokens per expert,
    1 when balanced), its largest value `moe_load_max`, and the unweighted losses `moe_aux_loss` (top_k
    when balanced) and `moe_z_loss`, means over MoE blocks. Empty for a model without MoE blocks."""
    from hybrid_train.parallel import all_reduce_mean, sum_over_data_parallel

    stats = model.router_stats(reset=True)
    if not stats:
        return {}
    counts = sum_over_data_parallel(stats["load"].to(torch.float64), env.tp_size)  # (blocks, E)
    load = (counts.max(1).values / counts.mean(1).clamp(min=1e-9)).tolist()
    return {"moe_load": dict(zip(model.moe_blocks(), load)), "moe_load_max": max(load),
            "moe_aux_loss": all_reduce_mean(stats["aux"].mean()).item(),
            "moe_z_loss": all_reduce_mean(stats["z"].mean()).item()}


class MetricsLogger:
    """Rank 0 writes; the other ranks only keep time. A resumed run first drops the metrics.jsonl rows
    logged after its checkpoint's step, then appends."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_name: str, is_main: bool, total_steps: int,
                 start_step: int, config_dict: dict, run_log: RunLog | None = None, stage: str = "run"):
        self.cfg = cfg
        self.is_main = is_main
        self.path = run_dir / "metrics.jsonl"
        self.run_log = run_log
        self.bar = None
        self.wandb = None
        self._last_time = time.perf_counter()
        self._last_tokens: int | None = None
        if not is_main:
            return
        dropped = drop_rows_after(self.path, start_step)
        if cfg.progress:
            label = run_name if stage in ("run", run_name) else f"{stage} ({run_name})"
            self.bar = tqdm(total=total_steps, initial=start_step, desc=label, unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        if dropped:
            self.info(f"metrics.jsonl: dropped {dropped} row(s) logged after step {start_step}, where this run "
                      "continues (they were written before an interruption, after the last checkpoint)")
        if cfg.wandb:
            self.wandb = _start_wandb(cfg, run_dir, run_name, config_dict)
            if cfg.wandb_mode == "offline":
                where = Path(self.wandb.dir).parent  # .../wandb/offline-run-<time>-<id>
                self.info(f"wandb: offline run in {where}; upload it with: wandb sync {where}")

    def start_window(self, tokens: int) -> None:
        self._last_time, self._last_tokens = time.perf_counter(), tokens

    def throughput(self, tokens: int) -> float:
        """Tokens per second (all ranks) since the last call."""
        now = time.perf_counter()
        rate = (tokens - (self._last_tokens or 0)) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_tokens = now, tokens
        return rate

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}
            for key, value in record.items():
                if isinstance(value, dict):  # source_tokens, time_ms, ...: one chart per entry
                    flat.update({f"{key}/{name}": n for name, n in value.items() if isinstance(n, (int, float))})
            self.wandb.log(flat, step=record["step"])
        line = " ".join(_fmt(k, v) for k, v in record.items() if k not in QUIET_KEYS and v is not None)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        self.info(line)

    def info(self, message: str) -> None:
        """A line for the console (above the progress bar) and train.log; rank 0 only."""
        if not self.is_main:
            return
        if self.run_log is not None:
            self.run_log.write(message)
        self._show(message)

    def warning(self, message: str) -> None:
        """A warning on any rank: console and train.log (prefixed with the rank on ranks > 0)."""
        if self.run_log is not None:
            self.run_log.warning(message, echo=not self.is_main)
        if self.is_main:
            self._show(f"warning: {message}")

    def _show(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


class StepTimer:
    """Where the steps' time goes, per step over a logging window, in milliseconds.

    Device phases (forward, backward, clip = the gradient norm and loss reduction, optimizer) are
    timed by CUDA events, which cost no sync until `split` reads them on a log step; on CPU, where ops
    run synchronously, by the host clock. `data` is host time spent waiting for batches; `host` is the
    wall time not covered by device work: the device idle between steps (data, syncs, launches).
    Work on another stream is reported beside them (`beside`): the optimizer step that runs beside the
    next forward (train.overlap_optimizer), whose forward time then holds what the overlap did not hide."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._steps: list[list[tuple[str, object]]] = []
        self._beside: list[tuple[str, object, object]] = []
        self._data_s = 0.0
        self._window_start = time.perf_counter()

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def data_wait(self, seconds: float) -> None:
        self._data_s += seconds

    def begin(self) -> None:
        self._steps.append([("begin", self._now())])

    def mark(self, phase: str) -> None:
        """The phase that ran since the last mark (or begin) ends here."""
        self._steps[-1].append((phase, self._now()))

    def beside(self, phase: str, start, end) -> None:
        """Device work of this step on another stream, between two CUDA events: reported under `phase` (a
        mean per span) once it has finished (a span still running is reported with the next window, as waiting
        for it would stall the overlap; `reset` drops it), not counted as the loop's device time."""
        self._beside.append((phase, start, end))

    def _elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def split(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase since the last call; starts a new window."""
        wall_ms = (time.perf_counter() - self._window_start) * 1e3
        steps = [s for s in self._steps if len(s) > 1]
        if self.cuda and steps:
            steps[-1][-1][1].synchronize()
        totals: dict[str, float] = {}
        device_ms = 0.0
        for marks in steps:
            for (_, start), (phase, end) in zip(marks, marks[1:]):
                totals[phase] = totals.get(phase, 0.0) + self._elapsed_ms(start, end)
            device_ms += self._elapsed_ms(marks[0][1], marks[-1][1])
        n = max(len(steps), 1)
        out = {phase: ms / n for phase, ms in totals.items()}
        done = [span for span in self._beside if span[2].query()]
        for phase in dict.fromkeys(phase for phase, _, _ in done):
            spans = [self._elapsed_ms(start, end) for name, start, end in done if name == phase]
            out[phase] = sum(spans) / len(spans)
        out["data"] = self._data_s * 1e3 / n
        out["host"] = max(wall_ms - device_ms, 0.0) / n
        running = [span for span in self._beside if span not in done]
        self.reset()
        self._beside = running
        return out

    def reset(self) -> None:
        """Forget what was timed (e.g. a checkpoint save that should stay out of the split)."""
        self._steps, self._beside, self._data_s, self._window_start = [], [], 0.0, time.perf_counter()


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        return f"{key}={value:.4g}"
    return f"{key}={value}"


def _start_wandb(cfg: LoggingConfig, run_dir: Path, run_name: str, config_dict: dict):
    import wandb

    # The run id lives in the run directory, so a resumed job continues the same wandb run.
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.wandb_project, name=run_name, id=run_id, resume="allow", dir=str(run_dir),
                      mode=cfg.wandb_mode, config=config_dict)
