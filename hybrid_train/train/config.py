"""Configuration of the training loop: optimizer, LR schedule, run length, logging, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

SCHEDULES = ("constant", "cosine", "linear", "wsd")
LOSS_IMPLS = ("auto", "fused", "logits")


@dataclass
class OptimConfig:
    lr: Optional[float] = None
    """Peak learning rate; None = scaled for the model width (`default_lr`): 1e-4 at d_model 4096, inversely
    with the width, at most 3e-3 (the tiny models). The stage files set Bamba's own LRs."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices; never on A_log, D, dt_bias, norms or biases."""
    impl: str = "auto"
    """The AdamW step: triton (one kernel per tensor, CUDA), fused (torch's fused kernel, CUDA and CPU),
    loop (torch's per-tensor reference); auto = triton on CUDA, else fused where the dtypes allow, else
    loop. All keep torch AdamW's state, so a checkpoint moves between them."""
    moment_dtype: str = "float32"
    """The dtype of AdamW's two moments: float32 (as Bamba trained), or bfloat16 (optim.impl triton):
    20 bytes moved per fp32 parameter a step instead of 28, and 4 bytes less held, with the moments
    stochastically rounded. A checkpoint resumes under either (the moments are cast)."""

    def validate(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.impl not in OPTIM_IMPLS:
            raise ValueError(f"optim.impl={self.impl!r} must be one of {', '.join(OPTIM_IMPLS)}")
        if self.moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"optim.moment_dtype={self.moment_dtype!r} must be one of {', '.join(MOMENT_DTYPES)}")
        if self.moment_dtype != "float32" and self.impl in ("fused", "loop"):
            raise ValueError(f"optim.moment_dtype={self.moment_dtype} needs the Triton AdamW; optim.impl={self.impl} "
                             "keeps the moments in the parameters' dtype (use optim.impl=auto or triton)")


OPTIM_IMPLS = ("auto", "triton", "fused", "loop")
MOMENT_DTYPES = ("float32", "bfloat16")


def default_lr(d_model: int) -> float:
    """Peak LR for a width, as Adam's LR scales (about 1/width): 1e-4 at 4096, 2e-4 at 2048, capped at 3e-3,
    which the tiny CPU models train well with. Bamba v1's 3e-4 peak was for 1.5M-token steps after 2000
    warmup steps (the `pretrain` stage keeps it); at one GPU's 4096 tokens a step it sent a fresh
    9B-width model's loss from 3.5 back up to 11 in its first 15 steps, where 1e-4 fell steadily
    (BENCHMARKS.md), and 3e-3 diverged."""
    return min(3e-3, 1e-4 * 4096 / d_model)


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """Shape after warmup: constant, cosine, linear (decay to the floor) or wsd (warmup-stable-decay)."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps (exclusive with warmup_tokens)."""
    warmup_tokens: int = 0
    """Linear warmup length in tokens, rounded up to whole steps."""
    warmup_fraction: float = 0.0
    """Linear warmup as a fraction of the run's (or stage's) optimizer steps, e.g. 0.01; exclusive with
    warmup_steps and warmup_tokens. A warmup of more than half the run is clamped to half, with a warning."""
    min_lr_ratio: float = 0.1
    """Floor of cosine/linear/wsd decay as a fraction of the peak LR."""
    decay_fraction: float = 0.2
    """wsd: the final fraction of the run spent decaying."""

    def validate(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name={self.name!r} must be one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0 or self.warmup_tokens < 0:
            raise ValueError("schedule.warmup_steps and schedule.warmup_tokens must be >= 0")
        if not 0 <= self.warmup_fraction <= 0.5:
            raise ValueError(f"schedule.warmup_fraction must be in [0, 0.5], got {self.warmup_fraction}")
        given = [f"schedule.{k}={getattr(self, k)}" for k in ("warmup_steps", "warmup_tokens", "warmup_fraction")
                 if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"set one warmup length, not {' and '.join(given)} (the others to 0)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}")


@dataclass
class TrainConfig:
    seed: int = 0
    """Seeds weights, data order and dropout-free training: same command, same losses."""
    seq_len: int = 256
    """Tokens per packed row."""
    micro_batch_size: int = 8
    """Rows per data-parallel rank per forward/backward."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step across all ranks; 0 = one micro-batch per rank (no accumulation) when a run
    starts. A resumed run keeps the global batch its checkpoint recorded (gradient accumulation adapts to
    the world size); a nonzero value that differs from it changes the batch for the rest of the run."""
    max_tokens: int = 0
    """Run length in tokens (exclusive with max_steps); the LR schedule spans it."""
    max_steps: int = 0
    """Run length in optimizer steps (exclusive with max_tokens)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    z_loss: float = 0.0
    """Coefficient of the z-loss, mean(logsumexp(logits)^2)."""
    loss_impl: str = "auto"
    """LM head + loss: fused (chunked over the vocabulary, no full logits), logits, or auto (fused unless
    parallel.tp > 1, whose vocabulary-sharded head needs logits)."""
    precision: str = "auto"
    """Compute precision: auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32."""
    bf16_weights: Optional[bool] = None
    """bf16 autocast on one process: the weights autocast would cast each forward are held in bf16 (rounded
    as autocast rounds them), their fp32 masters kept as those bf16 values plus an int16 of the rest, which
    the optimizer updates together: no casts in forward and backward, the same numbers, and 2 bytes a
    parameter less to hold and to move than fp32 weights with bf16 copies (hybrid_train/train/precision.py).
    None = on where it applies: one process, bf16, optim.impl triton (the CUDA default). Under FSDP its
    all-gather casts the weights instead."""
    overlap_optimizer: Optional[bool] = None
    """Run the optimizer step on a side stream, module by module, beside the next forward, each module of
    which waits for its own weights: the same numbers, and 1.4-1.6% more tokens/s at 9B width on an H100
    (hybrid_train/train/overlap.py, BENCHMARKS.md). None = on where it applies: one CUDA process with
    optim.impl triton (the default there)."""
    device: str = "auto"
    """auto (CUDA when present), cuda or cpu."""

    def validate(self) -> None:
        for key in ("seq_len", "micro_batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be positive, got {getattr(self, key)}")
        if self.max_tokens > 0 and self.max_steps > 0:
            raise ValueError(f"set one of train.max_tokens ({self.max_tokens}) and train.max_steps ({self.max_steps})")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.precision={self.precision!r} must be auto, bf16 or fp32")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"train.device={self.device!r} must be auto, cuda or cpu")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"train.loss_impl={self.loss_impl!r} must be one of {', '.join(LOSS_IMPLS)}")
        if self.global_batch_tokens < 0 or self.grad_clip < 0 or self.z_loss < 0:
            raise ValueError("train.global_batch_tokens, train.grad_clip and train.z_loss must be >= 0")


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Steps between log lines and metrics.jsonl records (the last step is always logged)."""
    progress: bool = True
    """Progress bar on rank 0."""
    wandb: bool = False
    """Log to Weights & Biases from rank 0."""
    wandb_project: str = "hybrid_train"
    """wandb project name."""
    wandb_mode: str = "offline"
    """wandb mode: offline (no network needed; sync later) or online."""
    peak_tflops: Optional[float] = None
    """Dense bf16 peak per device for MFU; None = known GPUs (A100 312, H100/H200 989), else no MFU."""
    profile_from: int = 0
    """Profile steps profile_from+1 .. profile_from+profile_steps with torch.profiler (0 = off): a trace per
    rank and a summary of where the device time went in <run.dir>/profile/ (those steps run slower)."""
    profile_steps: int = 3
    """How many steps to profile from profile_from."""

    def validate(self) -> None:
        if self.log_every <= 0:
            raise ValueError(f"logging.log_every must be positive, got {self.log_every}")
        if self.profile_from < 0 or self.profile_steps <= 0:
            raise ValueError(f"logging.profile_from must be >= 0 (0 = off) and logging.profile_steps positive, got "
                             f"{self.profile_from} and {self.profile_steps}")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb_mode={self.wandb_mode!r} must be offline, online or disabled")


INIT_WHAT = ("model", "model+optimizer")


@dataclass
class CheckpointConfig:
    interval_steps: int = 0
    """Save every this many optimizer steps (0 = off); a final checkpoint is written too (see final)."""
    interval_tokens: int = 0
    """Save whenever this many more tokens have been trained (0 = off)."""
    keep_last: int = 3
    """Keep the newest K checkpoints (0 = keep all); permanent ones are never pruned."""
    permanent_interval_steps: int = 0
    """Checkpoints at multiples of this step count are permanent (0 = none); so is any with a KEEP file."""
    final: bool = True
    """Write a checkpoint when the run reaches its end (false for benchmarks and smoke runs; a stop on
    a signal or STOP file always checkpoints)."""
    async_save: bool = False
    """Write checkpoints in a background thread while training continues."""
    resume: bool = True
    """Continue from <run.dir>/checkpoints/latest when it exists (model, optimizer, data, counters)."""
    resume_from: Optional[str] = None
    """Resume from this checkpoint instead of the run directory's latest (same run, everything)."""
    init_from: Optional[str] = None
    """Start a new stage from this checkpoint (a directory, or hf:DIR for a Hugging Face Bamba model)."""
    init_what: str = "model"
    """What init_from provides: model, or model+optimizer. Data position and schedule always start fresh."""

    def validate(self) -> None:
        for key in ("interval_steps", "interval_tokens", "keep_last", "permanent_interval_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"checkpoint.{key} must be >= 0, got {getattr(self, key)}")
        if self.init_what not in INIT_WHAT:
            raise ValueError(f"checkpoint.init_what={self.init_what!r} must be one of {', '.join(INIT_WHAT)}")
        if self.init_from and self.resume_from:
            raise ValueError(f"checkpoint.resume_from={self.resume_from!r} continues a run and checkpoint.init_from="
                             f"{self.init_from!r} starts a new stage; set one of them")
        if self.init_what == "model+optimizer" and self.init_from and self.init_from.startswith("hf:"):
            raise ValueError("checkpoint.init_what=model+optimizer needs a native checkpoint; a Hugging Face "
                             f"directory ({self.init_from}) has no optimizer state")


@dataclass
class StageConfig:
    name: str = "run"
    """Stage label, written into checkpoints and metrics (pretrain, extend, mix, anneal, ...)."""
    start_tokens: int = 0
    """Total tokens the model has seen when this stage starts (checked against init_from's counter)."""
    end_tokens: int = 0
    """Total tokens at which this stage ends (0 = the run length is train.max_tokens / max_steps)."""
    tokens: int = 0
    """Length of the stage in tokens (`stage.tokens=500e9` on the command line, as any token count),
    counted from where init_from stopped (from start_tokens without init_from, or from a Hugging Face
    model, which records no counter). Replaces the absolute window start_tokens/end_tokens, which are
    then not checked; 0 = use the absolute window."""
    allow_token_mismatch: bool = False
    """Start even if init_from's token counter differs from start_tokens (the counter continues from it)."""
    needs_init_from: bool = False
    """The stage continues an earlier one, so checkpoint.init_from must be set."""

    def validate(self) -> None:
        if self.start_tokens < 0 or self.end_tokens < 0 or self.tokens < 0:
            raise ValueError("stage.start_tokens, stage.end_tokens and stage.tokens must be >= 0")
        if not self.tokens and self.end_tokens and self.end_tokens <= self.start_tokens:
            raise ValueError(f"stage.end_tokens={self.end_tokens:,} must be above stage.start_tokens="
                             f"{self.start_tokens:,}; to give the stage's length from where checkpoint.init_from "
                             f"stopped instead, set stage.tokens={self.end_tokens}")

    @property
    def relative(self) -> bool:
        """The window is stage.tokens from the source's counter, not start_tokens/end_tokens."""
        return self.tokens > 0

    def length(self, start_total: int) -> int | None:
        """Tokens the stage trains from a total-token counter of start_total, when its window sets the run
        length (None: train.max_tokens / max_steps do)."""
        if self.relative:
            return self.tokens
        if self.end_tokens:
            return self.end_tokens - start_total
        return None

    @property
    def absolute(self) -> bool:
        """An absolute window that a source's token counter must match at the start."""
        return not self.relative and bool(self.start_tokens or self.end_tokens)
