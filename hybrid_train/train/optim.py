"""AdamW with decay only on matrices, and LR schedules defined over the run's length."""

from __future__ import annotations

import math

import torch

from hybrid_train.parallel.collectives import local_tensor
from hybrid_train.train.config import OptimConfig, ScheduleConfig, default_lr


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay on tensors of 2+ dims (projections, embeddings, conv kernels); none on vectors:
    A_log, D, dt_bias, norm weights and biases. The step is optim.impl's (see OptimConfig.impl)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    lr = cfg.lr if cfg.lr is not None else default_lr(model.cfg.d_model)  # JobConfig.validate resolves it too
    hyper = dict(lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    impl = cfg.impl
    if impl == "auto":
        # The per-tensor loop took 43 ms a step for 1.4B parameters on an H100; torch's fused kernel is
        # one pass (2.8 TB/s on an H200), the Triton one too, nearer copy bandwidth (BENCHMARKS.md).
        impl = ("triton" if _triton_can_step(params) else
                "fused" if params and all(p.device.type in ("cuda", "cpu") and p.dtype in FUSED_DTYPES for p in params)
                else "loop")
    elif impl == "triton" and not _triton_can_step(params, interpreter_ok=True):
        raise ValueError("optim.impl=triton needs contiguous float32/bfloat16/float16 parameters on a CUDA "
                         "device (or TRITON_INTERPRET=1) and triton installed; use optim.impl=fused")
    if cfg.moment_dtype != "float32" and impl != "triton":
        raise ValueError(f"optim.moment_dtype={cfg.moment_dtype}: the Triton AdamW keeps bf16 moments, and "
                         f"optim.impl={cfg.impl} resolved to torch's AdamW here (the Triton step runs on CUDA, or "
                         "under TRITON_INTERPRET=1 with optim.impl=triton)")
    if impl == "triton":
        moments = torch.bfloat16 if cfg.moment_dtype == "bfloat16" else None
        return TritonAdamW(groups, moment_dtype=moments, **hyper)
    return torch.optim.AdamW(groups, **hyper, fused=True if impl == "fused" else None,
                             foreach=False if impl == "loop" else None)


def _triton_can_step(params: list[torch.Tensor], interpreter_ok: bool = False) -> bool:
    from hybrid_train.ops.dispatch import interpreting, kernels_mode, triton_available

    if not params or not triton_available() or (kernels_mode() == "torch" and not interpreter_ok):
        return False
    device_ok = (lambda t: t.is_cuda or (interpreter_ok and interpreting()))
    held = (local_tensor(p) for p in params)
    return all(device_ok(t) and t.is_contiguous() and t.dtype in FUSED_DTYPES for t in held)


class TritonAdamW(torch.optim.AdamW):
    """torch's AdamW (same groups, hyperparameters and state, so checkpoints move between the two),
    stepped by Triton kernels: a launch per large tensor, one for all small ones of a kind
    (hybrid_train/ops/triton/adamw.py). Like the fused AdamW it takes `grad_scale` (gradients are divided
    by it) and `found_inf` (non-zero: nothing is written, step counts stay) as device scalars set on the
    optimizer (clip_and_step), and reads nothing back.

    With `keep_split_masters(BF16Weights)` it steps the split fp32 masters of bf16 parameters (both
    halves), and takes their gradients where BF16Weights keeps them (hybrid_train/train/precision.py).

    moment_dtype: the dtype both moments are kept in (None: the master's, as torch's AdamW keeps the
    parameter's: fp32 for a split master). bf16 moments of fp32 masters are stochastically rounded
    (hybrid_train/ops/triton/adamw.py). Moments loaded in another dtype are cast at the next step; a
    state dict loaded into bf16 parameters keeps its saved moments as they are (torch's load casts them
    to the parameter's dtype, which would round fp32 moments of split masters to bf16)."""

    takes_grad_scale = True

    def __init__(self, params, moment_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(params, foreach=False, **kwargs)
        if any(g["amsgrad"] or g["maximize"] for g in self.param_groups):
            raise ValueError("TritonAdamW has no amsgrad or maximize")
        self.moment_dtype = moment_dtype
        self.grad_scale = self.found_inf = None
        self.split_masters = None

    def keep_split_masters(self, weights) -> None:
        """Step these split masters (a BF16Weights) from now on."""
        self.split_masters = weights

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.split_masters is not None:
            self.split_masters.zero_grad()

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            for key in ("exp_avg", "exp_avg_sq"):
                value = saved.get(i, {}).get(key)
                if isinstance(value, torch.Tensor) and value.dtype != self.state[p][key].dtype:
                    self.state[p][key] = value.to(self.state[p][key].device)

    def grads(self, params=None) -> list[torch.Tensor]:
        """The gradients a step reads (of `params`, default all): the split masters' where they keep them."""
        params = params if params is not None else [p for group in self.param_groups for p in group["params"]]
        if self.split_masters is not None:
            return self.split_masters.grads(params)
        return [p.grad for p in params if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None, only=None):
        """only: step just these parameters (a set; the rest wait for another call in the same step, as
        OptimizerOverlap steps a model module by module). Each tensor keeps its place in the optimizer, so
        a step taken in parts is the one taken whole, to the bit."""
        from hybrid_train.ops.triton.adamw import adamw_steps

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masters = self.split_masters
        index = 0  # each tensor's place in the optimizer: with its step count, the seed of its rounding
        for group in self.param_groups:
            work = []
            for p in group["params"]:
                index += 1
                if only is not None and p not in only:
                    continue
                low = masters.low.get(p) if masters is not None else None
                grad = masters.grad(p) if masters is not None else p.grad
                if grad is None:
                    continue
                state = self.state[p]
                local = local_tensor(p)
                moment_dtype = self.moment_dtype or (torch.float32 if low is not None else p.dtype)
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=local.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype,
                                                           memory_format=torch.preserve_format)
                elif state["step"].device != local.device:  # loaded from a checkpoint: counts on the host
                    state["step"] = state["step"].to(local.device, torch.float32)
                for key in ("exp_avg", "exp_avg_sq"):
                    if state[key].dtype != moment_dtype:  # loaded (as the parameter's dtype) or saved in another
                        state[key] = state[key].to(moment_dtype)
                work.append((local, local_tensor(grad).contiguous(), local_tensor(state["exp_avg"]),
                             local_tensor(state["exp_avg_sq"]), state["step"], low, index))
            if not work:
                continue
            device = work[0][0].device
            skip = (self.found_inf.to(device, torch.float32) if self.found_inf is not None
                    else torch.zeros((), dtype=torch.float32, device=device))
            scale = self.grad_scale.to(device, torch.float32) if self.grad_scale is not None else None
            steps = [w[4] for w in work]
            torch._foreach_add_(steps, 1.0)
            beta1, beta2 = group["betas"]
            adamw_steps(work, scale, skip, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"])
            if self.found_inf is not None:
                torch._foreach_sub_(steps, [skip] * len(steps))
        return loss


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.no_grad()
def clip_and_step(optimizer: torch.optim.Optimizer, norm: torch.Tensor, max_norm: float,
                  loss: torch.Tensor | None = None, step=None) -> torch.Tensor:
    """One optimizer step on gradients clipped to a global norm of max_norm (0 = no clip), skipped
    (no weight or moment written, step count unchanged) when the norm or the loss is not finite.

    Returns the skip flag (a device tensor, 1.0 when skipped). With the fused AdamW both ride the one
    kernel as its `grad_scale` (gradients are divided by max(1, norm / max_norm)) and `found_inf`, so
    the step needs neither a host sync nor another pass over the gradients. norm and loss must agree
    on every rank (global norm, all-reduced loss), so every rank takes or skips the step together.
    step: what takes the step once the clip and skip are set (default `optimizer.step`; the trainer's
    OptimizerOverlap.step takes it on a side stream)."""
    step = step or optimizer.step
    bad = ~torch.isfinite(norm if loss is None else norm + loss.to(norm.device))
    found_inf = bad.float()
    fused = getattr(optimizer, "takes_grad_scale", False) or all(group.get("fused") for group in optimizer.param_groups)
    if not fused:  # the reference loop: a host read decides, then an explicit scale
        if not bad.item():
            if max_norm > 0:
                coef = max_norm / (float(norm) + 1e-6)
                if coef < 1.0:
                    _scale_grads(optimizer, coef)
            step()
        return found_inf
    if max_norm > 0:
        # As torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
        optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
    optimizer.found_inf = found_inf
    try:
        step()
    finally:
        optimizer.grad_scale = optimizer.found_inf = None
    return found_inf


def _scale_grads(optimizer: torch.optim.Optimizer, coef: float) -> None:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    for p_grad in grads:
        p_grad.mul_(coef)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, cfg: ScheduleConfig) -> float:
    """Fraction of the peak LR used at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    if cfg.name == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / decay_steps
        return 1.0 - (1.0 - floor) * min(progress, 1.0)
    progress = min((step - warmup_steps) / max(1, decay_steps - 1), 1.0) if decay_steps > 1 else 1.0
    if cfg.name == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - floor) * progress  # linear


def warmup_steps_for(cfg: ScheduleConfig, tokens_per_step: int, total_steps: int = 0) -> int:
    """The configured warmup in steps (before any clamp; see clamped_warmup)."""
    if cfg.warmup_tokens:
        return math.ceil(cfg.warmup_tokens / tokens_per_step)
    if cfg.warmup_fraction:
        return math.ceil(cfg.warmup_fraction * total_steps)
    return cfg.warmup_steps


def clamped_warmup(cfg: ScheduleConfig, tokens_per_step: int, total_steps: int) -> tuple[int, str | None]:
    """(warmup steps, warning or None): a warmup of more than half the run is clamped to half, so the
    peak LR is always reached (a stage file's 100 warmup steps in a 10-step test stage would never get there)."""
    warmup = warmup_steps_for(cfg, tokens_per_step, total_steps)
    cap = total_steps // 2
    if warmup <= cap:
        return warmup, None
    given = (f"schedule.warmup_tokens={cfg.warmup_tokens} ({warmup} steps)" if cfg.warmup_tokens
             else f"schedule.warmup_steps={cfg.warmup_steps}")
    return cap, (f"{given} is more than half of the run's {total_steps} steps; warming up over {cap} steps "
                 "instead (schedule.warmup_fraction, e.g. 0.01, scales the warmup with the run)")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int,
                       tokens_per_step: int, warmup_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """warmup_steps: the warmup already resolved (and clamped) by the caller; None = from cfg as given."""
    warmup = warmup_steps_for(cfg, tokens_per_step, total_steps) if warmup_steps is None else warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, cfg))
