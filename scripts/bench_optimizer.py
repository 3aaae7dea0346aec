"""The AdamW step alone, per `optim.impl`, on a model's real parameter shapes, and the gradient norm:

    python scripts/bench_optimizer.py model=bamba_9b model.n_layers=8 model.attn_layer_indices=[4]
    python scripts/bench_optimizer.py --bf16-weights --impls triton model=bamba_9b model.n_layers=8 ...
    python scripts/bench_optimizer.py --device cpu --steps 2 model=tiny                 # CPU smoke run

fp32 parameters with random gradients, the clip scale and the non-finite flag as device scalars
(`clip_and_step`, as the trainer steps). `--bf16-weights` holds them as the one-GPU trainer does: the
weights autocast would cast as bf16 halves of split fp32 masters, with bf16 gradients
(hybrid_train/train/precision.py; the Triton step only). Prints, per implementation, milliseconds per
step and the bandwidth of the bytes AdamW must move (read parameter, gradient, two moments; write
parameter, two moments): 28 per fp32 parameter with fp32 moments, 20 with `optim.moment_dtype=bfloat16`,
2 fewer for a split master with its bf16 gradient. Then the gradient norm over the same gradients, the
one-launch Triton sum of squares against torch._foreach_norm. Arguments after the options are
train.py's Hydra overrides.
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
from hybrid_train.ops.reductions import sum_squares, sum_squares_torch  # noqa: E402
from hybrid_train.ops.dispatch import use_triton  # noqa: E402
from hybrid_train.train.optim import build_optimizer, clip_and_step  # noqa: E402
from hybrid_train.train.precision import BF16Weights  # noqa: E402


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of fn, after one untimed call."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def time_impl(model: torch.nn.Module, optim_cfg, weights: BF16Weights, steps: int, device: torch.device) -> float:
    optimizer = build_optimizer(model, optim_cfg)
    if weights:
        try:
            weights.attach(optimizer)
        except TypeError as err:
            raise SystemExit(f"--bf16-weights with optim.impl={optim_cfg.impl}: {err} (the Triton step: CUDA, or "
                             "TRITON_INTERPRET=1 with optim.impl=triton)") from None
    norm = torch.tensor(2.0, device=device)  # above max_norm 1: the clip scale is applied
    return timed(lambda: clip_and_step(optimizer, norm, 1.0), steps, device)  # (first: states allocated)


def step_bytes(model: torch.nn.Module, weights: BF16Weights, moment_bytes: int) -> int:
    """Bytes one AdamW step moves: parameter (and low half) read and written, gradient read, moments both ways."""
    total = 0
    for p in model.parameters():
        held = p.element_size() + (2 if p in weights.low else 0)
        total += p.numel() * (2 * held + p.grad.element_size() + 2 * 2 * moment_bytes)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--impls", default="triton,fused", help="comma-separated optim.impl values, in order")
    parser.add_argument("--bf16-weights", action="store_true", help="split fp32 masters, bf16 gradients (one GPU)")
    parser.add_argument("--json", help="append the result as a JSON line to this file")
    args, overrides = parser.parse_known_args()
    impls = args.impls.split(",")
    if args.bf16_weights and set(impls) - {"triton", "auto"}:
        parser.error(f"--bf16-weights --impls {args.impls}: split fp32 masters are stepped by the Triton AdamW only "
                     "(--impls triton)")
    job = load_config(overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(job.model, device=device)
    weights = BF16Weights(model, enabled=args.bf16_weights)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in model.parameters())
    moment_bytes = 2 if job.optim.moment_dtype == "bfloat16" else 4
    moved = step_bytes(model, weights, moment_bytes)
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "params": n, "overrides": overrides,
              "bf16_weights": args.bf16_weights, "bytes_per_step": moved}
    for impl in impls:
        seconds = time_impl(model, dataclasses.replace(job.optim, impl=impl), weights, args.steps, device)
        result[impl] = {"ms": seconds * 1e3, "GB_per_s": moved / seconds / 1e9}
        print(f"{impl:8s} {seconds * 1e3:8.2f} ms/step  {moved / seconds / 1e9:7.0f} GB/s  "
              f"({n / 1e9:.2f}B parameters, {moved / n:.1f} bytes each)")
    grads = weights.grads(model.parameters())
    read = sum(g.numel() * g.element_size() for g in grads)
    norms = {"torch": lambda: sum_squares_torch(grads)}
    if use_triton(*grads, op="sum_squares"):
        norms["triton"] = lambda: sum_squares(grads)
    for name, fn in norms.items():
        seconds = timed(fn, args.steps, device)
        result[f"norm_{name}"] = {"ms": seconds * 1e3, "GB_per_s": read / seconds / 1e9}
        print(f"norm {name:8s} {seconds * 1e3:8.2f} ms  {read / seconds / 1e9:7.0f} GB/s  ({read / 1e9:.2f} GB of gradients)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
