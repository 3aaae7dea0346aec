"""The training loop: setup as numbered steps, then a loop that reads top to bottom."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from pathlib import Path

import torch

from hybrid_train.config import JobConfig, to_yaml
from hybrid_train.data import build_data_loader, build_tokenizer
from hybrid_train.model import build_model, count_params, flops_per_token
from hybrid_train.parallel import all_reduce_mean, barrier, destroy, init_distributed, parallelize
from hybrid_train.train.checkpoint import save_checkpoint
from hybrid_train.train.loss import lm_loss
from hybrid_train.train.metrics import MetricsLogger, device_peak_flops, peak_memory_gb
from hybrid_train.train.optim import build_lr_scheduler, build_optimizer


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class TrainResult:
    checkpoint: Path
    """The final checkpoint directory."""
    model: torch.nn.Module
    """The trained model (sharded when run under FSDP)."""


@dataclasses.dataclass
class RunPlan:
    """Batch geometry and run length, derived once from the config and the world size."""
    tokens_per_micro_batch: int  # per rank
    grad_accum: int
    tokens_per_step: int  # all ranks
    total_steps: int


def plan_run(job: JobConfig, dp_size: int) -> RunPlan:
    t = job.train
    per_micro = t.micro_batch_size * t.seq_len
    global_tokens = t.global_batch_tokens or per_micro * dp_size
    if global_tokens % (per_micro * dp_size):
        raise ValueError(f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
                         f"train.micro_batch_size x train.seq_len x data-parallel size = {per_micro * dp_size}")
    total = t.max_steps or math.ceil(t.max_tokens / global_tokens)
    return RunPlan(per_micro, global_tokens // (per_micro * dp_size), global_tokens, total)


def resolve_device(job: JobConfig) -> tuple[str, torch.dtype | None]:
    """('cuda' | 'cpu', autocast dtype or None for plain fp32)."""
    kind = job.train.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    precision = job.train.precision
    if precision == "auto":
        precision = "bf16" if kind == "cuda" else "fp32"
    return kind, (torch.bfloat16 if precision == "bf16" else None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(job: JobConfig) -> TrainResult:
    """Run a training job to its end."""
    # 1. Processes, device, run directory.
    device_type, autocast_dtype = resolve_device(job)
    env = init_distributed(job.parallel, device_type)
    run_dir = Path(job.run.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(job))
    barrier()
    seed_everything(job.train.seed)
    plan = plan_run(job, env.dp_size)

    # 2. Data.
    tokenizer = build_tokenizer(job.data.tokenizer)
    if tokenizer.vocab_size > job.model.vocab_size:
        raise ValueError(f"data.tokenizer={job.data.tokenizer!r} has {tokenizer.vocab_size} tokens but "
                         f"model.vocab_size={job.model.vocab_size}")
    loader = build_data_loader(job.data, tokenizer, job.train.seq_len, job.train.micro_batch_size,
                               env.dp_rank, env.dp_size, job.train.seed)

    # 3. Model: build on meta, parallelize, materialize, initialize.
    model = build_model(job.model, device="meta")
    n_params, n_embedding = count_params(model)
    parallelize(model, env, param_dtype=autocast_dtype)
    model.to_empty(device=env.device)
    model.tie_weights()
    torch.manual_seed(job.train.seed)
    model.init_weights()
    model.train()

    # 4. Optimizer and schedule.
    optimizer = build_optimizer(model, job.optim)
    scheduler = build_lr_scheduler(optimizer, job.schedule, plan.total_steps, plan.tokens_per_step)

    # 5. Observability.
    flops_token = flops_per_token(job.model, n_params, n_embedding, job.train.seq_len)
    peak = device_peak_flops(env.device, job.logging.peak_tflops)
    logger = MetricsLogger(job.logging, run_dir, job.run.name, env.is_main, plan.total_steps, 0,
                           dataclasses.asdict(job))
    logger.info(f"model {job.model.name}: {n_params / 1e6:.2f}M parameters ({n_embedding / 1e6:.2f}M embedding), "
                f"{job.model.layer_pattern or ''.join(job.model.layer_types)}; {env.world_size} process(es) on "
                f"{device_type}; {plan.total_steps} steps x {plan.tokens_per_step} tokens "
                f"(grad accumulation {plan.grad_accum})")
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    # 6. The loop.
    tokens = 0
    loss_sum = torch.zeros((), device=env.device)
    logger.start_window(tokens)
    try:
        for step in range(plan.total_steps):
            loss_sum.zero_()
            for _ in range(plan.grad_accum):
                batch = {k: v.to(env.device, non_blocking=True) for k, v in next(loader).items()}
                with autocast:
                    logits = model(batch["input_ids"], batch["position_ids"], batch["seq_idx"])
                loss, ce = lm_loss(logits, batch["labels"], job.train.z_loss)
                (loss / plan.grad_accum).backward()
                loss_sum += ce / plan.grad_accum
            grad_norm = _clip_grad_norm(model, job.train.grad_clip)
            loss_value = all_reduce_mean(loss_sum).item()
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss_value}) or gradient norm ({grad_norm}) at step {step + 1}; "
                    "stopping before the optimizer step, no weights were written")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += plan.tokens_per_step
            logger.advance()

            last = step + 1 == plan.total_steps
            if (step + 1) % job.logging.log_every == 0 or last:
                rate = logger.throughput(tokens)
                per_device = rate / env.world_size
                logger.log({
                    "step": step + 1,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens,
                    "tokens_per_s": rate,
                    "tokens_per_s_per_device": per_device,
                    "mfu": per_device * flops_token / peak if peak else None,
                    "mem_gb": peak_memory_gb(env.device),
                    "source_tokens": _global_source_tokens(loader.source_tokens, env.device),
                })
            interval = job.checkpoint.interval_steps
            if last or (interval and (step + 1) % interval == 0):
                path = save_checkpoint(run_dir, step + 1, model, optimizer,
                                       {"train": {"step": step + 1, "tokens": tokens}},
                                       {"tokens": tokens, "final": last,
                                        "model_config": dataclasses.asdict(job.model)},
                                       env.is_main)
                logger.info(f"saved checkpoint {path}")
                logger.start_window(tokens)  # keep checkpoint time out of throughput
    finally:
        logger.close()
        destroy()
    return TrainResult(path, model)


def _clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Global gradient norm (across shards), clipped to max_norm when max_norm > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP
        norm = norm.full_tensor()
    return norm.item()


def _global_source_tokens(local: dict[str, int], device: torch.device) -> dict[str, int]:
    """Per-source token counts summed over data-parallel ranks."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(local)
    names = sorted(local)
    counts = torch.tensor([local[n] for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return {n: int(c) for n, c in zip(names, counts.tolist())}
