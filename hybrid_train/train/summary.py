"""The header a run prints first: what it will do, in a user's terms, on one screen."""

from __future__ import annotations

from hybrid_train.config import JobConfig


def count(n: float) -> str:
    """614400 -> '614K', 1572864 -> '1.57M', 2e12 -> '2T' (three significant digits)."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def run_header(job: JobConfig, total_steps: int, tokens_per_step: int, grad_accum: int, *, n_params: int,
               n_embedding: int, world_size: int, device: str, precision: str, start_total_tokens: int,
               resumed_from: object = None, resumed_step: int = 0, warmup_steps: int | None = None,
               overlap: bool = False) -> str:
    """Model and size, data mixture and shares, run length, schedule, stage, devices, where outputs go.
    warmup_steps: the warmup the run takes (after any clamp); None = as the schedule config says.
    overlap: the optimizer steps beside the next forward (train.overlap_optimizer)."""
    m, t, s, d, c = job.model, job.train, job.schedule, job.data, job.checkpoint
    types = "".join(m.layer_types)
    attn = [i for i, kind in enumerate(m.layer_types) if kind == "A"]
    layout = (f"{types} ({types.count('M')} Mamba-2, {len(attn)} attention)" if m.n_layers <= 16 else
              f"({types.count('M')} Mamba-2, attention at {', '.join(map(str, attn)) or 'none'})")
    floor = "0" if s.min_lr_ratio == 0 else f"{s.min_lr_ratio:g} x peak"
    weights = {name: src.weight for name, src in d.sources.items()}
    shares = ", ".join(f"{name} {100 * w / sum(weights.values()):.3g}%" for name, w in weights.items())
    if job.stage.relative:
        length = f"stage.tokens={count(job.stage.tokens)}"
    elif job.stage.end_tokens:
        length = f"stage.end_tokens={count(job.stage.end_tokens)}"
    elif t.max_steps:
        length = f"train.max_steps={t.max_steps}"
    else:
        length = f"train.max_tokens={count(t.max_tokens)}"
    warmup = (f"{s.warmup_steps} warmup steps" if s.warmup_steps else
              f"{count(s.warmup_tokens)} warmup tokens" if s.warmup_tokens else "no warmup")
    if warmup_steps is not None:
        warmup = f"{warmup_steps} warmup steps" if warmup_steps else "no warmup"
    elif max(s.warmup_steps, -(-s.warmup_tokens // tokens_per_step)) >= total_steps:
        warmup += " (covers the whole run)"
    shape = {"constant": "then constant", "cosine": f"cosine to {floor}", "linear": f"linear to {floor}",
             "wsd": f"stable, then the last {s.decay_fraction:.0%} decaying to {floor}"}[s.name]
    every = [f"every {c.interval_steps} steps"] * bool(c.interval_steps) + \
            [f"every {count(c.interval_tokens)} tokens"] * bool(c.interval_tokens)
    lines = [
        f"run {job.run.name}: outputs in {job.run.dir} (config.yaml, metrics.jsonl, checkpoints/)",
        f"  model     {m.name}: {count(n_params)} parameters ({count(n_embedding)} embedding), {m.n_layers} blocks "
        f"{layout}, d_model {m.d_model}, vocab {m.vocab_size}",
        f"  data      {d.root} ({d.tokenizer} tokenizer): {shares}",
        f"  length    {total_steps:,} steps x {tokens_per_step:,} tokens = {count(total_steps * tokens_per_step)} "
        f"tokens ({length}); {t.micro_batch_size} rows of {t.seq_len} tokens per micro-batch, "
        f"grad accumulation {grad_accum}",
        f"  schedule  {s.name}: peak lr {job.optim.lr:g} after {warmup}, {shape}; AdamW"
        f"{' (bf16 moments, stochastically rounded)' if job.optim.moment_dtype == 'bfloat16' else ''}, weight decay "
        f"{job.optim.weight_decay:g}, grad clip {t.grad_clip:g}",
        f"  devices   {world_size} process(es) on {device}, {precision}, "
        f"{'fused head + loss' if job.fused_loss() else 'loss from full logits'}, "
        f"{'compiled blocks' if job.parallel.compile_on(device) else 'eager'}"
        f"{', optimizer beside the next forward' if overlap else ''}",
        f"  saves     {''.join(e + ', ' for e in every)}at the end (keep last {c.keep_last or 'all'}); the same "
        "command resumes",
    ]
    if job.stage.name != "run" or start_total_tokens:
        end = start_total_tokens + job.stage.tokens if job.stage.relative else job.stage.end_tokens
        window = f" -> {count(end)}" if end else ""
        lines.append(f"  stage     {job.stage.name}: total tokens {count(start_total_tokens)}{window}"
                     + (f", weights from {c.init_from}" if c.init_from else ""))
    if resumed_from is not None:
        lines.append(f"  resumed from {resumed_from} at step {resumed_step}")
    return "\n".join(lines)
