"""The run's plan: batch geometry, length and warmup from the config, the world size and, on resume,
what the checkpoint fixed (its global batch in tokens per step)."""

from __future__ import annotations

import dataclasses
import math

from hybrid_train.config import JobConfig
from hybrid_train.train.optim import clamped_warmup


@dataclasses.dataclass
class RunPlan:
    """Batch geometry and run length, derived once from the config and the world size."""
    tokens_per_micro_batch: int  # per rank
    grad_accum: int
    tokens_per_step: int  # all ranks
    total_steps: int  # optimizer steps in this stage
    warmup_steps: int = 0  # LR warmup, clamped to half the run
    notes: list = dataclasses.field(default_factory=list)  # (level, message) for the log: "info" or "warning"


@dataclasses.dataclass
class Saved:
    """What a resumed run's checkpoint fixes about the plan."""
    tokens_per_step: int
    step: int
    stage_tokens: int
    world_size: int

    @classmethod
    def from_meta(cls, meta: dict) -> "Saved":
        step = meta.get("step", 0)
        # Checkpoints written before tokens_per_step was recorded: their counters give it.
        per_step = meta.get("tokens_per_step") or (meta.get("stage_tokens", 0) // step if step else 0)
        return cls(per_step, step, meta.get("stage_tokens", 0), meta.get("world_size", 1))


def plan_run(job: JobConfig, dp_size: int, stage_budget_tokens: int | None = None,
             saved: Saved | None = None) -> RunPlan:
    """stage_budget_tokens: the stage's length in tokens, when the stage window sets the run length.
    saved: the checkpoint a run resumes from, whose global batch (tokens per step) the run keeps."""
    t = job.train
    per_micro = t.micro_batch_size * t.seq_len
    unit = per_micro * dp_size  # one micro-batch on every data-parallel rank
    notes = []
    kept = saved is not None and saved.tokens_per_step and not t.global_batch_tokens
    global_tokens = saved.tokens_per_step if kept else (t.global_batch_tokens or unit)
    if global_tokens % unit and kept:
        other = unit * max(1, round(global_tokens / unit))
        raise ValueError(
            f"this run trains {global_tokens:,} tokens per step (its checkpoint was saved by {saved.world_size} "
            f"process(es)); with {dp_size} data-parallel process(es) a step is a whole number of micro-batches "
            f"of {unit:,} tokens (train.micro_batch_size={t.micro_batch_size} x train.seq_len={t.seq_len} x "
            f"{dp_size}), which {global_tokens:,} is not. Resume on a world size whose micro-batches divide it, "
            f"change train.micro_batch_size so they do, or set train.global_batch_tokens={other} to train the "
            f"rest of the run at {other:,} tokens per step")
    if global_tokens % unit:
        raise ValueError(f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
                         f"train.micro_batch_size x train.seq_len x data-parallel size = {unit}")
    if kept and saved.world_size != dp_size and saved.tokens_per_step != unit:
        notes.append(("info", f"keeping the run's global batch of {global_tokens:,} tokens per step (saved by "
                              f"{saved.world_size} process(es)) with gradient accumulation "
                              f"{global_tokens // unit} on {dp_size}"))
    if saved is not None and saved.tokens_per_step and global_tokens != saved.tokens_per_step:
        notes.append(("warning", f"train.global_batch_tokens={global_tokens} changes this run's global batch from "
                                 f"{saved.tokens_per_step:,} to {global_tokens:,} tokens per step at step "
                                 f"{saved.step}; the rest of the run is planned in steps of the new size"))
    length = stage_budget_tokens if stage_budget_tokens is not None else (None if t.max_steps else t.max_tokens)
    if length is None:
        total = t.max_steps
    elif saved is not None:  # the tokens still to train, in steps of the (possibly new) size
        total = saved.step + max(0, math.ceil((length - saved.stage_tokens) / global_tokens))
    else:
        total = math.ceil(length / global_tokens)
    warmup, clamp = clamped_warmup(job.schedule, global_tokens, total)
    if clamp:
        notes.append(("warning", clamp))
    return RunPlan(per_micro, global_tokens // unit, global_tokens, total, warmup, notes)
