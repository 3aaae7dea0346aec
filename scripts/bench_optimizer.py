"""The AdamW step alone, per `optim.impl`, on a model's real parameter shapes:

    python scripts/bench_optimizer.py model=bamba_9b model.n_layers=8 model.attn_layer_indices=[4]
    python scripts/bench_optimizer.py --device cpu --steps 2 model=tiny                 # CPU smoke run

fp32 parameters with random gradients, the clip scale and the non-finite flag as device scalars
(`clip_and_step`, as the trainer steps). Prints, per implementation, milliseconds per step and the
bandwidth of the bytes per fp32 parameter AdamW must move (read parameter, gradient, two moments;
write parameter, two moments): 28, or 20 with `optim.moment_dtype=bfloat16`. Arguments after the
options are train.py's Hydra overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hybrid_train.config import load_config  # noqa: E402
from hybrid_train.model import build_model  # noqa: E402
from hybrid_train.train.optim import build_optimizer, clip_and_step  # noqa: E402


def time_impl(model: torch.nn.Module, optim_cfg, steps: int, device: torch.device) -> float:
    optimizer = build_optimizer(model, optim_cfg)
    norm = torch.tensor(2.0, device=device)  # above max_norm 1: the clip scale is applied
    clip_and_step(optimizer, norm, 1.0)  # states allocated, kernels compiled
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        clip_and_step(optimizer, norm, 1.0)
    sync()
    seconds = (time.perf_counter() - start) / steps
    del optimizer
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--impls", default="triton,fused", help="comma-separated optim.impl values, in order")
    parser.add_argument("--json", help="append the result as a JSON line to this file")
    args, overrides = parser.parse_known_args()
    job = load_config(overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(job.model, device=device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in model.parameters())
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "params": n, "overrides": overrides}
    per_param = 12 + 4 * (2 if job.optim.moment_dtype == "bfloat16" else 4)  # p, g read, p written; 2 moments both ways
    result["bytes_per_param"] = per_param
    for impl in args.impls.split(","):
        seconds = time_impl(model, dataclasses.replace(job.optim, impl=impl), args.steps, device)
        result[impl] = {"ms": seconds * 1e3, "GB_per_s": per_param * n / seconds / 1e9}
        print(f"{impl:8s} {seconds * 1e3:8.2f} ms/step  {per_param * n / seconds / 1e9:7.0f} GB/s  "
              f"({n / 1e9:.2f}B parameters, {per_param} bytes each)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
