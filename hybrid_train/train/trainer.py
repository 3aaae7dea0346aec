"""The training loop: setup as numbered steps, then a loop that reads top to bottom."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from pathlib import Path

import torch
import torch.distributed

from hybrid_train.config import JobConfig, to_yaml
from hybrid_train.data import DataExhausted, build_data_loader, build_tokenizer
from hybrid_train.model import active_params, build_model, count_params, flops_per_token
from hybrid_train.ops import set_kernels
from hybrid_train.parallel import (all_reduce_mean, barrier, clip_grad_norm_, destroy, full_tensor, full_tensor_init,
                                   init_distributed, loss_context, parallelize, sum_over_data_parallel)
from hybrid_train.train.checkpoint import read_meta
from hybrid_train.train.checkpointer import Checkpointer, TrainState
from hybrid_train.train.loss import lm_loss
from hybrid_train.train.metrics import MetricsLogger, device_peak_flops, peak_memory_gb, router_metrics
from hybrid_train.train.optim import build_lr_scheduler, build_optimizer
from hybrid_train.train.preemption import StopRequest


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became inf/NaN; raised before the optimizer step writes any weight."""


@dataclasses.dataclass
class TrainResult:
    checkpoint: Path | None
    """The last checkpoint written (or resumed from)."""
    model: torch.nn.Module
    """The trained model (sharded when run under FSDP)."""
    state: TrainState
    """Counters at the end."""
    stopped: bool
    """True when the run stopped early on request (signal or STOP file) after checkpointing."""


@dataclasses.dataclass
class RunPlan:
    """Batch geometry and run length, derived once from the config and the world size."""
    tokens_per_micro_batch: int  # per rank
    grad_accum: int
    tokens_per_step: int  # all ranks
    total_steps: int  # optimizer steps in this stage


def plan_run(job: JobConfig, dp_size: int, stage_budget_tokens: int | None = None) -> RunPlan:
    """stage_budget_tokens: tokens left to train in this stage, when the stage window sets the length."""
    t = job.train
    per_micro = t.micro_batch_size * t.seq_len
    global_tokens = t.global_batch_tokens or per_micro * dp_size
    if global_tokens % (per_micro * dp_size):
        raise ValueError(f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
                         f"train.micro_batch_size x train.seq_len x data-parallel size = {per_micro * dp_size}")
    if stage_budget_tokens is not None:
        total = math.ceil(stage_budget_tokens / global_tokens)
    else:
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
    """Run a training job (or stage) to its end, resuming it if its run directory has a checkpoint."""
    # 1. Processes, device, run directory.
    device_type, autocast_dtype = resolve_device(job)
    env = init_distributed(job.parallel, device_type, job.model, job.train.seq_len)
    run_dir = Path(job.run.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(job))
    barrier()
    seed_everything(job.train.seed)

    # 2. Data.
    tokenizer = build_tokenizer(job.data.tokenizer)
    if tokenizer.vocab_size > job.model.vocab_size:
        raise ValueError(f"data.tokenizer={job.data.tokenizer!r} has {tokenizer.vocab_size} tokens but "
                         f"model.vocab_size={job.model.vocab_size}")
    loader = build_data_loader(job.data, tokenizer, job.train.seq_len, job.train.micro_batch_size,
                               env.dp_rank, env.dp_size, job.train.seed)

    # 3. Model: build on meta, parallelize, materialize, initialize.
    set_kernels(job.model.kernels)  # Triton kernels on CUDA unless model.kernels=torch
    model = build_model(job.model, device="meta")
    n_params, n_embedding = count_params(model)
    parallelize(model, env, param_dtype=autocast_dtype)
    model.to_empty(device=env.device)
    model.tie_weights()
    torch.manual_seed(job.train.seed)
    with full_tensor_init():  # the single-process values under every layout
        model.init_weights()
    model.train()
    optimizer = build_optimizer(model, job.optim)

    # 4. Where this run starts: its own checkpoint (resume), an earlier stage (init_from), or scratch.
    checkpointer = Checkpointer(job.checkpoint, run_dir, env, {
        "stage": job.stage.name, "model_config": dataclasses.asdict(job.model),
        "job": dataclasses.asdict(job)})
    state, resume_from = start_state(job, checkpointer, model, optimizer)
    stage_start_total = state.total_tokens - state.stage_tokens
    budget = job.stage.end_tokens - stage_start_total if job.stage.end_tokens else None
    plan = plan_run(job, env.dp_size, budget)
    scheduler = build_lr_scheduler(optimizer, job.schedule, plan.total_steps, plan.tokens_per_step)
    if resume_from is not None:
        state = checkpointer.resume(resume_from, model, optimizer, scheduler, loader, job.model)

    # 5. Observability.
    flops_token = flops_per_token(job.model, n_params, n_embedding, job.train.seq_len)
    peak = device_peak_flops(env.device, job.logging.peak_tflops)
    logger = MetricsLogger(job.logging, run_dir, job.run.name, env.is_main, plan.total_steps, state.step,
                           dataclasses.asdict(job))
    fused_loss = job.fused_loss()
    logger.info(f"model {job.model.name}: {n_params / 1e6:.2f}M parameters ({n_embedding / 1e6:.2f}M embedding), "
                f"{''.join(job.model.layer_types)}; {env.world_size} process(es) on {device_type}; stage "
                f"{job.stage.name}: {plan.total_steps} steps x {plan.tokens_per_step} tokens (grad accumulation "
                f"{plan.grad_accum}), from {stage_start_total:,} total tokens; "
                f"{'fused head + loss' if fused_loss else 'loss from full logits'}"
                + (f"; resumed from {resume_from} at step {state.step}" if resume_from else ""))
    if job.model.moe_n_experts:
        logger.info(f"MoE blocks {job.model.moe_layers}: {active_params(job.model, n_params) / 1e6:.2f}M parameters "
                    f"active per token ({job.model.moe_top_k} of {job.model.moe_n_experts} experts)")
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    stop = StopRequest(run_dir, env.device)

    # 6. The loop.
    path, stopped = resume_from, False
    loss_sum = torch.zeros((), device=env.device)
    logger.start_window(state.stage_tokens)
    try:
        while state.step < plan.total_steps:
            loss_sum.zero_()
            batches, exhausted = _next_batches(loader, plan.grad_accum, env)
            if exhausted:
                # Keep what was trained: checkpoint the last whole step, then report the data problem.
                path = checkpointer.save(state, model, optimizer, scheduler, loader, final=True)
                logger.info(f"data exhausted before step {state.step + 1}; saved checkpoint {path}")
                raise DataExhausted(exhausted)
            for batch in batches:
                batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
                ce = forward_backward(model, batch, job.train.z_loss, fused_loss, plan.grad_accum, autocast, env)
                loss_sum += full_tensor(ce) / plan.grad_accum
            grad_norm = clip_grad_norm_(model.parameters(), job.train.grad_clip)
            loss_value = all_reduce_mean(loss_sum).item()
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss_value}) or gradient norm ({grad_norm}) at step {state.step + 1}; "
                    "stopping before the optimizer step, no weights were written")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.stage_tokens += plan.tokens_per_step
            state.total_tokens += plan.tokens_per_step
            logger.advance()

            last = state.step == plan.total_steps
            stopped = not last and stop.should_stop()
            if state.step % job.logging.log_every == 0 or last or stopped:
                state.source_tokens = _global_source_tokens(loader.source_tokens, env)
                rate = logger.throughput(state.stage_tokens)
                per_device = rate / env.world_size
                logger.log({
                    "step": state.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                    "tokens": state.stage_tokens, "total_tokens": state.total_tokens, "stage": job.stage.name,
                    "stage_progress": state.step / plan.total_steps,
                    "tokens_per_s": rate, "tokens_per_s_per_device": per_device,
                    "mfu": per_device * flops_token / peak if peak else None,
                    "mem_gb": peak_memory_gb(env.device),
                    "source_tokens": state.source_tokens,
                    "skipped_records": _global_source_tokens(loader.skipped_records, env),
                    **router_metrics(model, env),
                })
            if last or stopped or checkpointer.due(state, plan.tokens_per_step):
                state.source_tokens = _global_source_tokens(loader.source_tokens, env)
                path = checkpointer.save(state, model, optimizer, scheduler, loader, final=last or stopped)
                logger.info(f"saved checkpoint {path}")
                logger.start_window(state.stage_tokens)  # keep checkpoint time out of throughput
            if stopped:
                stop.consume(env.is_main)
                logger.info(f"stopping at step {state.step} ({stop.reason}); the same command resumes the run")
                break
        checkpointer.wait()
    finally:
        stop.restore()
        loader.close()
        logger.close()
        destroy()
    return TrainResult(path, model, state, stopped)


def forward_backward(model, batch: dict, z_loss: float, fused: bool, grad_accum: int, autocast, env) -> torch.Tensor:
    """Forward and backward of one micro-batch (its loss divided by grad_accum); returns its cross entropy,
    detached from autograd."""
    inputs = (batch["input_ids"], batch["position_ids"], batch["seq_idx"])
    if fused:  # the head computes the loss in its forward, while FSDP holds its weight gathered
        with autocast:
            loss, ce = model(*inputs, labels=batch["labels"], z_loss=z_loss)
        (loss / grad_accum).backward()
        return ce
    with autocast:
        logits = model(*inputs)
    with loss_context(env):  # vocabulary-parallel cross entropy when parallel.loss_parallel
        loss, ce = lm_loss(logits, batch["labels"], z_loss)
        if model.cfg.moe_n_experts:
            loss = loss + model.router_loss()  # the fused path adds it inside the model
        (loss / grad_accum).backward()
    return ce


def start_state(job: JobConfig, checkpointer: Checkpointer, model, optimizer) -> tuple[TrainState, object]:
    """Counters for a fresh start or a stage start (weights loaded here), or the checkpoint to resume."""
    stage = job.stage
    resume_from = checkpointer.find_resume_point()
    if resume_from is not None:
        meta = read_meta(resume_from)
        if meta.get("stage", "run") != stage.name:
            raise ValueError(f"{resume_from} belongs to stage {meta.get('stage')!r} but this job is stage "
                             f"{stage.name!r}: give the new stage its own run.dir and checkpoint.init_from={resume_from}")
        fields = {f.name for f in dataclasses.fields(TrainState)}
        return TrainState(**{k: v for k, v in meta.items() if k in fields}), resume_from
    total = stage.start_tokens
    if job.checkpoint.init_from:
        source_tokens = checkpointer.init_from(job.checkpoint.init_from, model, optimizer, job.model,
                                               job.checkpoint.init_what == "model+optimizer")
        # A stage ends on the first whole step past its end, so the next one may start a step late.
        step_tokens = plan_run(job, checkpointer.env.dp_size, 1).tokens_per_step
        if source_tokens is not None and not 0 <= source_tokens - stage.start_tokens < step_tokens:
            if not stage.allow_token_mismatch:
                raise ValueError(f"checkpoint.init_from={job.checkpoint.init_from} has seen {source_tokens:,} tokens but "
                                 f"stage.start_tokens={stage.start_tokens:,} (a step is {step_tokens:,}); fix one, or set "
                                 "stage.allow_token_mismatch=true (the counter then continues from the checkpoint)")
        if source_tokens is not None:
            total = source_tokens
    return TrainState(total_tokens=total, stage=stage.name), None


def _next_batches(loader, n: int, env) -> tuple[list[dict], str | None]:
    """The micro-batches of one step, and why not if any rank's data ran out (all ranks agree, so none
    is left waiting in a collective)."""
    batches, reason = [], None
    try:
        for _ in range(n):
            batches.append(next(loader))
    except DataExhausted as err:
        reason = str(err)
    flag = torch.tensor([0.0 if reason is None else 1.0], device=env.device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() and reason is None:
        reason = "another rank's data ran out (see its log)"
    return batches, reason


def _global_source_tokens(local: dict[str, int], env) -> dict[str, int]:
    """Per-source counts (tokens, skipped records) summed over data-parallel ranks."""
    names = sorted(local)
    counts = torch.tensor([local[n] for n in names], dtype=torch.float64, device=env.device)
    counts = sum_over_data_parallel(counts, env.tp_size)
    return {n: int(c) for n, c in zip(names, counts.tolist())}
