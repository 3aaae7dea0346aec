"""Run a function in real processes joined by a gloo process group, and collect what each returns.

    results = run_distributed(fn, world_size=2)   # fn(rank, world_size, *args) in every process
    results[r]                                    # what rank r returned (torch.save-able)

Processes are forked from the test process (no second import of torch, which costs seconds per
process on a small machine) and each runs with one intra-op thread so that several of them share two
cores without oversubscription. A child that raises fails the call with its traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120  # a collective that never completes (a rank died mid-test) fails instead of hanging


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, backend: str, args: tuple) -> None:
    # torchrun's environment, so code under test can read RANK/WORLD_SIZE like it does in production.
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "TORCH_DIST_INIT_BARRIER": "0"})
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args, backend: str = "gloo") -> list[Any]:
    """fn(rank, world_size, *args) in `world_size` processes; returns [result of rank 0, rank 1, ...]."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_child, args=(fn, world_size, free_port(), out_dir, backend, args),
                               nprocs=world_size, join=True, start_method="fork")
        except mp.ProcessRaisedException as exc:
            errors = sorted(Path(out_dir).glob("rank*.error"))
            detail = errors[0].read_text() if errors else str(exc)
            raise RuntimeError(f"a process failed ({errors[0].stem if errors else '?'}):\n{detail}") from None
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
