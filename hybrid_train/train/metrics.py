"""What a user sees of a run: progress bar, log lines, metrics.jsonl, wandb; throughput and MFU."""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hybrid_train.train.config import LoggingConfig

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
    """Rank 0 writes; the other ranks only keep time. Resumed runs append to metrics.jsonl."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_name: str, is_main: bool, total_steps: int,
                 start_step: int, config_dict: dict):
        self.cfg = cfg
        self.is_main = is_main
        self.path = run_dir / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        self._last_time = time.perf_counter()
        self._last_tokens: int | None = None
        if not is_main:
            return
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        if cfg.wandb:
            self.wandb = _start_wandb(cfg, run_dir, run_name, config_dict)

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
            for key in ("source_tokens", "moe_load"):
                for name, n in record.get(key, {}).items():
                    flat[f"{key}/{name}"] = n
            self.wandb.log(flat, step=record["step"])
        line = " ".join(_fmt(k, v) for k, v in record.items()
                        if k not in ("source_tokens", "moe_load") and v is not None)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            self.bar.write(line)
        else:
            print(line, flush=True)

    def info(self, message: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


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
