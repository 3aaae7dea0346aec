"""The training loop: setup as numbered steps, then a loop that reads top to bottom."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from pathlib import Path

import torch

from hybrid_train.config import JobConfig, to_yaml
from hybrid_train.data import DataExhausted, build_data_loader, build_tokenizer
from hybrid_train.model import active_params, build_model, count_params, flops_per_token
from hybrid_train.ops import set_kernels
from hybrid_train.parallel import (all_reduce_mean, any_rank, barrier, destroy, full_tensor, full_tensor_init,
                                   init_distributed, loss_context, parallelize, sum_over_data_parallel, total_norm)
from hybrid_train.train.checkpoint import read_meta, resolve_checkpoint
from hybrid_train.train.checkpointer import Checkpointer, TrainState, find_resume_point
from hybrid_train.train.loss import lm_loss
from hybrid_train.train.metrics import (MetricsLogger, RunLog, StepTimer, device_peak_flops, peak_memory_gb,
                                      router_metrics)
from hybrid_train.train.optim import build_lr_scheduler, build_optimizer, clip_and_step
from hybrid_train.train.overlap import overlap_for
from hybrid_train.train.plan import RunPlan, Saved, plan_run  # noqa: F401 (RunPlan: API)
from hybrid_train.train.precision import bf16_weights_for
from hybrid_train.train.profile import StepProfiler
from hybrid_train.train.preemption import StopRequest
from hybrid_train.train.summary import run_header


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became inf/NaN; the optimizer skipped that step, so no weight was written."""


class SkippedStepWatch:
    """Raises NonFiniteLossError for a step the optimizer skipped as non-finite (`clip_and_step`).

    On a GPU the step's flag is copied to the host without waiting and read before the next step's
    optimizer call (or on a log or checkpoint step), when the device is long past it: a check that never
    stalls the GPU, and that still stops the run before another weight is written. On CPU it reads at once."""

    def __init__(self, device: torch.device):
        self.lazy = device.type == "cuda"
        self._host = torch.zeros((), pin_memory=self.lazy)
        self._pending = None

    def push(self, step: int, skipped: torch.Tensor, loss: torch.Tensor, norm: torch.Tensor) -> None:
        event = None
        self._host.copy_(skipped, non_blocking=self.lazy)
        if self.lazy:
            event = torch.cuda.Event()
            event.record()
        self._pending = (step, event, loss, norm)
        if not self.lazy:
            self.check()

    def check(self) -> None:
        if self._pending is None:
            return
        step, event, loss, norm = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        if self._host.item():
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) or gradient norm ({norm.item()}) at step {step}; the optimizer "
                "skipped that step, no weights were written")


@dataclasses.dataclass
class TrainResult:
    checkpoint: Path | None
    """The last checkpoint written (or resumed from)."""
    model: torch.nn.Module | None
    """The trained model (sharded when run under FSDP); None when the run was already complete."""
    state: TrainState
    """Counters at the end."""
    stopped: bool
    """True when the run stopped early on request (signal or STOP file) after checkpointing."""


def finished_run(job: JobConfig) -> TrainResult | None:
    """The run's newest checkpoint when it finished this very run (same length), else None. Reads files
    only, so a re-run of a finished job writes nothing."""
    ckpt = find_resume_point(job.checkpoint, Path(job.run.dir) / "checkpoints", warn=False)
    if ckpt is None:
        return None
    meta = read_meta(ckpt)
    saved_job = meta.get("job", {})
    same_length = all(saved_job.get(section, {}).get(key) == getattr(getattr(job, section), key)
                      for section, key in (("train", "max_tokens"), ("train", "max_steps"),
                                           ("stage", "end_tokens"), ("stage", "tokens")))
    if not (meta.get("run_complete") and same_length and meta.get("stage", "run") == job.stage.name):
        return None
    state = TrainState.from_meta(meta)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run {job.run.dir} is complete: stage {state.stage}, step {state.step}, {state.stage_tokens:,} tokens "
              f"({state.total_tokens:,} in total), checkpoint {ckpt}. Nothing to do: for more training give it a "
              "longer run (train.max_tokens, stage.tokens) or start a new stage in another run.dir", flush=True)
    return TrainResult(ckpt, None, state, False)


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
    """Run a training job (or stage) to its end, resuming it if its run directory has a checkpoint; a run
    that already finished is left untouched. Everything shown is also written to <run.dir>/train.log."""
    done = finished_run(job)
    if done is not None:
        return done
    run_log = RunLog(Path(job.run.dir), int(os.environ.get("RANK", "0")))
    started = time.perf_counter()
    try:
        result = _train(job, run_log)
        line = summary(result, time.perf_counter() - started)
        run_log.write(line)
        if run_log.rank == 0:
            print(line, flush=True)
    except Exception as err:
        run_log.write(f"error: {type(err).__name__}: {err}")
        raise
    finally:
        run_log.close()
    return result


def summary(result: TrainResult, seconds: float) -> str:
    """The last line of a run: where it ended and its final checkpoint."""
    state = result.state
    how = "stopped on request" if result.stopped else "finished"
    return (f"{how}: stage {state.stage}, step {state.step}, {state.stage_tokens:,} tokens "
            f"({state.total_tokens:,} in total) in {seconds:.1f} s; checkpoint {result.checkpoint}")


def _train(job: JobConfig, run_log: RunLog) -> TrainResult:
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
    state, resume_from, notes = start_state(job, checkpointer, model, optimizer)
    stage_start_total = state.total_tokens - state.stage_tokens
    saved = Saved.from_meta(read_meta(resume_from)) if resume_from is not None else None
    plan = plan_run(job, env.dp_size, job.stage.length(stage_start_total), saved)
    checkpointer.meta.update(tokens_per_step=plan.tokens_per_step, planned_steps=plan.total_steps)
    scheduler = build_lr_scheduler(optimizer, job.schedule, plan.total_steps, plan.tokens_per_step,
                                   plan.warmup_steps)
    if resume_from is not None:
        state = checkpointer.resume(resume_from, model, optimizer, scheduler, loader, job.model)
    # bf16 weights with split fp32 masters (one GPU), from the masters as loaded (resume, init_from) or initialized
    bf16_weights = bf16_weights_for(job, model, optimizer, env.world_size, autocast_dtype)
    # The optimizer step beside the next forward (one GPU): after the split, whose gradients it reads
    overlap = overlap_for(job, model, optimizer, env.world_size, env.device)

    # 5. Observability.
    flops_token = flops_per_token(job.model, n_params, n_embedding, job.train.seq_len)
    peak = device_peak_flops(env.device, job.logging.peak_tflops)
    logger = MetricsLogger(job.logging, run_dir, job.run.name, env.is_main, plan.total_steps, state.step,
                           dataclasses.asdict(job), run_log, job.stage.name)
    fused_loss = job.fused_loss()
    logger.info(run_header(job, plan.total_steps, plan.tokens_per_step, plan.grad_accum, n_params=n_params,
                           n_embedding=n_embedding, world_size=env.world_size, device=device_type,
                           precision="fp32" if autocast_dtype is None else
                           "bf16 (bf16 weights, split fp32 masters)" if bf16_weights else "bf16",
                           overlap=bool(overlap.enabled),
                           start_total_tokens=stage_start_total, resumed_from=resume_from, resumed_step=state.step,
                           warmup_steps=plan.warmup_steps))
    for level, message in notes + plan.notes:
        (logger.warning if level == "warning" else logger.info)(message)
    if job.model.moe_n_experts:
        logger.info(f"MoE blocks {job.model.moe_layers}: {active_params(job.model, n_params) / 1e6:.2f}M parameters "
                    f"active per token ({job.model.moe_top_k} of {job.model.moe_n_experts} experts)")
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    stop = StopRequest(run_dir, env.cpu_group)
    timer, watch = StepTimer(env.device), SkippedStepWatch(env.device)
    profiler = StepProfiler(job.logging, run_dir, env.rank, env.device, state.step, plan.total_steps)
    for message in profiler.notes:
        logger.warning(message)

    # 6. The loop. Nothing in a step waits for the device: the loss and gradient norm stay on it and
    # are read on log steps; a non-finite step is skipped by the optimizer itself (SkippedStepWatch).
    path, stopped = resume_from, False
    logger.start_window(state.stage_tokens)
    overlap.begin()
    try:
        while state.step < plan.total_steps:
            waited = time.perf_counter()
            batches, exhausted = _next_batches(loader, plan.grad_accum, env)
            timer.data_wait(time.perf_counter() - waited)
            if exhausted:
                # Keep what was trained: checkpoint the last whole step, then report the data problem.
                watch.check()
                overlap.join()
                path = checkpointer.save(state, model, optimizer, scheduler, loader, final=True)
                logger.info(f"data exhausted before step {state.step + 1}; saved checkpoint {path}")
                raise DataExhausted(exhausted)
            timer.begin()
            loss_sum = torch.zeros((), device=env.device)
            for batch in batches:
                batch = _to_device(batch, env.device)
                ce = forward_backward(model, batch, job.train.z_loss, fused_loss, plan.grad_accum, autocast, env,
                                      timer)
                if plan.grad_accum > 1:
                    bf16_weights.fold_grads()  # accumulate in fp32, as autocast does
                loss_sum += full_tensor(ce) / plan.grad_accum
            norm = total_norm(bf16_weights.grads(model.parameters()))
            loss = all_reduce_mean(loss_sum)
            timer.mark("clip")
            watch.check()  # the previous step's flag, long computed
            lr = scheduler.get_last_lr()[0]
            skipped = clip_and_step(optimizer, norm, job.train.grad_clip, loss, step=lambda: overlap.step(optimizer))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            timer.mark("optimizer")
            if overlap.timing is not None:
                timer.beside("optimizer_beside_forward", *overlap.timing)
            state.step += 1
            watch.push(state.step, skipped, loss, norm)
            state.stage_tokens += plan.tokens_per_step
            state.total_tokens += plan.tokens_per_step
            logger.advance()

            last = state.step == plan.total_steps
            stopped = not last and stop.should_stop()
            if state.step % job.logging.log_every == 0 or last or stopped:
                watch.check()
                state.source_tokens = _global_source_tokens(loader.source_tokens, env)
                rate = logger.throughput(state.stage_tokens)
                per_device = rate / env.world_size
                logger.log({
                    "step": state.step, "loss": loss.item(), "lr": lr, "grad_norm": norm.item(),
                    "tokens": state.stage_tokens, "total_tokens": state.total_tokens, "stage": job.stage.name,
                    "stage_progress": state.step / plan.total_steps,
                    "tokens_per_s": rate, "tokens_per_s_per_device": per_device,
                    "mfu": per_device * flops_token / peak if peak else None,
                    "mem_gb": peak_memory_gb(env.device),
                    "source_tokens": state.source_tokens,
                    "skipped_records": _global_source_tokens(loader.skipped_records, env),
                    "time_ms": timer.split(),
                    **router_metrics(model, env),
                })
            new_window = False  # after a checkpoint or the profiler's start / stop: keep their time out of throughput
            if last or stopped or checkpointer.due(state, plan.tokens_per_step):
                watch.check()
                overlap.join()
                if not last or job.checkpoint.final:
                    state.source_tokens = _global_source_tokens(loader.source_tokens, env)
                    path = checkpointer.save(state, model, optimizer, scheduler, loader, final=last or stopped)
                    logger.info(f"saved checkpoint {path}")
                new_window = True
            if profiler.after_step(state.step):
                for line in profiler.take_report():
                    logger.info(line)
                new_window = True
            if new_window:
                logger.start_window(state.stage_tokens)
                timer.reset()
            if stopped:
                stop.consume(env.is_main)
                logger.info(f"stopping at step {state.step} ({stop.reason}); the same command resumes the run")
                break
        checkpointer.wait()
        overlap.close()
        bf16_weights.unsplit()  # the returned model holds its fp32 masters, as the checkpoints do
    finally:
        for line in profiler.close():
            logger.info(line)
        stop.restore()
        loader.close()
        logger.close()
        destroy()
        overlap.close()
    return TrainResult(path, model, state, stopped)


def forward_backward(model, batch: dict, z_loss: float, fused: bool, grad_accum: int, autocast, env,
                     timer: StepTimer | None = None) -> torch.Tensor:
    """Forward and backward of one micro-batch (its loss divided by grad_accum); returns its cross entropy,
    detached from autograd."""
    mark = timer.mark if timer is not None else (lambda phase: None)
    inputs = (batch["input_ids"], batch["position_ids"], batch["seq_idx"])
    if fused:  # the head computes the loss in its forward, while FSDP holds its weight gathered
        with autocast:
            loss, ce = model(*inputs, labels=batch["labels"], z_loss=z_loss)
        mark("forward")
        (loss / grad_accum).backward()
        mark("backward")
        return ce
    with autocast:
        logits = model(*inputs)
    with loss_context(env):  # vocabulary-parallel cross entropy when parallel.loss_parallel
        loss, ce = lm_loss(logits, batch["labels"], z_loss)
        if model.cfg.moe_n_experts:
            loss = loss + model.router_loss()  # the fused path adds it inside the model
        mark("forward")
        (loss / grad_accum).backward()
        mark("backward")
    return ce


def start_state(job: JobConfig, checkpointer: Checkpointer, model,
                optimizer) -> tuple[TrainState, Path | None, list[tuple[str, str]]]:
    """Counters for a fresh start or a stage start (weights loaded here), or the checkpoint to resume;
    and notes for the log. The counter continues from init_from's; an absolute window (stage.start_tokens
    / end_tokens without stage.tokens) must start there."""
    stage = job.stage
    resume_from = checkpointer.find_resume_point()
    if resume_from is not None:
        meta = read_meta(resume_from)
        if meta.get("stage", "run") != stage.name:
            raise ValueError(f"{resume_from} belongs to stage {meta.get('stage')!r} but this job is stage "
                             f"{stage.name!r}: give the new stage its own run.dir and checkpoint.init_from={resume_from}")
        return TrainState.from_meta(meta), resume_from, []
    total, notes, origin = stage.start_tokens, [], "stage.start_tokens"
    if job.checkpoint.init_from:
        source_tokens = checkpointer.init_from(job.checkpoint.init_from, model, optimizer, job.model,
                                               job.checkpoint.init_what == "model+optimizer")
        # A stage ends on the first whole step past its end, so the next one may start a step late.
        step_tokens = plan_run(job, checkpointer.env.dp_size, 1).tokens_per_step
        if stage.absolute and source_tokens is not None and not 0 <= source_tokens - stage.start_tokens < step_tokens:
            if not stage.allow_token_mismatch:
                raise ValueError(f"checkpoint.init_from={job.checkpoint.init_from} has seen {source_tokens:,} tokens but "
                                 f"stage.start_tokens={stage.start_tokens:,} (a step is {step_tokens:,}); fix one, set "
                                 f"stage.tokens=N to run N tokens from the checkpoint's {source_tokens:,}, or set "
                                 "stage.allow_token_mismatch=true (the counter then continues from the checkpoint)")
        if source_tokens is not None:
            total, origin = source_tokens, "checkpoint.init_from's counter"
            source_step = Saved.from_meta(read_meta(resolve_checkpoint(job.checkpoint.init_from))).tokens_per_step
            if source_step and source_step != step_tokens:
                notes.append(("info", f"checkpoint.init_from trained {source_step:,} tokens per step; this stage "
                                      f"trains {step_tokens:,} (train.global_batch_tokens={source_step} keeps the "
                                      "source's)"))
    if stage.relative:
        if origin == "stage.start_tokens":  # no init_from, or a Hugging Face model without a counter
            replaced = f"; stage.end_tokens={stage.end_tokens:,} is not used" if stage.end_tokens else ""
        else:
            replaced = (f"; stage.start_tokens={stage.start_tokens:,} / end_tokens={stage.end_tokens:,} are not used"
                        if stage.start_tokens or stage.end_tokens else "")
        notes.append(("info", f"stage {stage.name}: {total:,} -> {total + stage.tokens:,} total tokens "
                              f"(stage.tokens={stage.tokens:,} from {origin}){replaced}"))
    return TrainState(total_tokens=total, stage=stage.name), None, notes


def _next_batches(loader, n: int, env) -> tuple[list[dict], str | None]:
    """The micro-batches of one step, and why not if any rank's data ran out (all ranks agree, so none
    is left waiting in a collective)."""
    batches, reason = [], None
    try:
        for _ in range(n):
            batches.append(next(loader))
    except DataExhausted as err:
        reason = str(err)
    (any_exhausted,) = any_rank([reason is not None], env.cpu_group)
    if any_exhausted and reason is None:
        reason = "another rank's data ran out (see its log)"
    return batches, reason


def _to_device(batch: dict, device: torch.device) -> dict:
    """A batch on the device. From pageable memory a copy waits for the GPU's queue to drain; from pinned
    memory (the caching host allocator makes pinning cheap) it is queued like any kernel."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def _global_source_tokens(local: dict[str, int], env) -> dict[str, int]:
    """Per-source counts (tokens, skipped records) summed over data-parallel ranks."""
    names = sorted(local)
    counts = torch.tensor([local[n] for n in names], dtype=torch.float64, device=env.device)
    counts = sum_over_data_parallel(counts, env.tp_size)
    return {n: int(c) for n, c in zip(names, counts.tolist())}
