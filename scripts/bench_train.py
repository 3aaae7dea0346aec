"""End-to-end training benchmark: real `train.py` steps, steady-state throughput and where a step goes.

    python scripts/bench_train.py model=bamba_9b model.n_layers=8 model.attn_layer_indices=[4] \\
        train.seq_len=4096 train.micro_batch_size=1 parallel.compile=true
    torchrun --nproc_per_node=8 scripts/bench_train.py model=bamba_9b train.seq_len=4096
    python scripts/bench_train.py --steps 6 --warmup 2 train.seq_len=64      # CPU smoke run
    python scripts/bench_train.py --profile 3 model=bamba_9b ...             # + where the last 3 steps go

Arguments after the options are the same Hydra overrides `train.py` takes. The run is the trainer
itself (`hybrid_train.train.trainer.train`): data, model, optimizer, clipping, logging, everything a
user's run does, for `--steps` optimizer steps, with no final checkpoint, in a temporary run
directory unless `run.dir=` is given. Every `--window` steps the trainer logs throughput and the time
split of a step (`time_ms` in metrics.jsonl); windows ending after `--warmup` steps are averaged:

  forward, backward   device time of the micro-batches' forward (with the head + loss) and backward
  clip                the global gradient norm and the loss all-reduce
  optimizer           AdamW (clip and non-finite skip folded in), LR schedule, zero_grad; with the
                      optimizer beside the next forward (train.overlap_optimizer) only its launch:
                      `optimizer_beside_forward` is then the step's span on its own stream, and
                      forward holds what of it the overlap did not hide
  data                host time waiting for the loader
  host                wall time the device was not busy with the above (between steps)

It prints one JSON line (tokens/s, per device, MFU, peak memory, the split, the run's losses) and a
short table; `--json FILE` appends the JSON line to FILE.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from hybrid_train.config import load_config
from hybrid_train.train.overlap import OptimizerOverlap
from hybrid_train.train.trainer import train


def steady_state(records: list[dict], warmup: int, until: int | None = None) -> dict:
    """Throughput and time split over the logged windows that end after `warmup` steps (and by step
    `until`; time-weighted: tokens over seconds, not a mean of rates)."""
    measured = [r for r in records if r["step"] > warmup and (until is None or r["step"] <= until)]
    if not measured:
        raise ValueError(f"no logged window ends after --warmup {warmup} steps: raise --steps or lower --warmup")
    previous = {r["step"]: r for r in records}
    seconds = tokens = steps = 0.0
    split: dict[str, float] = {}
    for r in measured:
        before = max((s for s in previous if s < r["step"]), default=0)
        window_steps = r["step"] - before
        window_tokens = r["tokens"] - (previous[before]["tokens"] if before else 0)
        seconds += window_tokens / r["tokens_per_s"]
        tokens += window_tokens
        steps += window_steps
        for phase, ms in r.get("time_ms", {}).items():
            split[phase] = split.get(phase, 0.0) + ms * window_steps
    last = measured[-1]
    rate = tokens / seconds
    per_device = rate * last["tokens_per_s_per_device"] / last["tokens_per_s"]
    mfu = last["mfu"] * per_device / last["tokens_per_s_per_device"] if last.get("mfu") is not None else None
    return {"tokens_per_s": rate, "tokens_per_s_per_device": per_device, "mfu": mfu,
            "step_ms": seconds * 1e3 / steps, "time_ms": {k: v / steps for k, v in split.items()},
            "peak_mem_gb": max(r["mem_gb"] for r in records), "measured_steps": int(steps)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps to run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the average (compile, allocator)")
    parser.add_argument("--window", type=int, default=5, help="steps per logged window (a host sync each)")
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="run the last K steps under torch.profiler (left out of the averages) and print where "
                             "their device time went (<run.dir>/profile/: traces and summary.txt)")
    parser.add_argument("--same-priority", action="store_true",
                        help="with the optimizer beside the forward, run the loop at the optimizer stream's priority "
                             "(by default the forward's kernels are scheduled first)")
    parser.add_argument("--json", help="append the result as a JSON line to this file")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (Hydra overrides take no dashes)")

    tmp = tempfile.TemporaryDirectory(prefix="bench_train-")
    if args.profile < 0:
        parser.error(f"--profile {args.profile}: the number of last steps to profile (0 = none)")
    measured_until = args.steps - args.profile  # the schedule is the same with or without profiling
    window_ends = set(range(args.window, args.steps + 1, args.window)) | {args.steps}
    if not any(args.warmup < end <= measured_until for end in window_ends):
        parser.error(f"no logged window ends after --warmup {args.warmup} and by step {measured_until} (--steps "
                     f"{args.steps} less --profile {args.profile}; windows of --window {args.window}): raise --steps "
                     "or lower --warmup, --window or --profile")
    profiling = ([f"logging.profile_from={measured_until}", f"logging.profile_steps={args.profile}"]
                 if args.profile else [])
    ours = profiling + [f"train.max_steps={args.steps}", f"logging.log_every={args.window}",
                        "logging.progress=false", "checkpoint.final=false", "checkpoint.resume=false"]
    if not any(o.startswith("run.dir=") for o in overrides):
        ours.append(f"run.dir={tmp.name}")
    job = load_config(ours + overrides)
    OptimizerOverlap.forward_first = not args.same_priority
    start = time.perf_counter()
    result = train(job)
    wall = time.perf_counter() - start
    main_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    metrics = Path(job.run.dir) / "metrics.jsonl"
    if not main_rank or not metrics.exists():
        return {}
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    out = {"date": time.strftime("%Y-%m-%d"), "same_priority": args.same_priority,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "overrides": overrides, "steps": result.state.step, "wall_s": wall,
           **steady_state(records, args.warmup, measured_until),
           "losses": [(r["step"], r["loss"]) for r in records]}
    summary = Path(job.run.dir) / "profile" / "summary.txt"
    if args.profile and summary.exists():
        out["profile"] = summary.read_text().splitlines()
    print(json.dumps(out), flush=True)
    split = "  ".join(f"{k} {v:.1f}" for k, v in out["time_ms"].items())
    mfu = f"{out['mfu']:.1%}" if out["mfu"] is not None else "-"
    print(f"tokens/s {out['tokens_per_s']:,.0f} ({out['tokens_per_s_per_device']:,.0f} per device), MFU {mfu}, "
          f"step {out['step_ms']:.1f} ms, peak {out['peak_mem_gb']:.1f} GB\ntime per step (ms): {split}",
          file=sys.stderr)
    if "profile" in out:
        print("\n".join(out["profile"]), file=sys.stderr)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
