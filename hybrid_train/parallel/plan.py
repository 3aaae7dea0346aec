"""Cluster planner: per-GPU memory and step time of a job's layout on a cluster, from its config alone.

Pure functions (the model is built on the meta device; nothing runs on a GPU). Memory counts what
FSDP2 and AdamW allocate per rank, exactly for parameters, gradients and optimizer states, and from
measured bytes per token for activations (PlanConfig). Step time is compute at a measured MFU plus the
collectives' ring volumes over the link each group uses, with an overlap assumption.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from hybrid_train.config import JobConfig
from hybrid_train.model import build_model, count_params, flops_per_token
from hybrid_train.model.config import ATTENTION, MAMBA
from hybrid_train.model.moe import CAST_BY_AUTOCAST
from hybrid_train.ops.cross_entropy import keeps_logits
from hybrid_train.parallel.config import ClusterConfig, PlanConfig

GIB = 2 ** 30
FP32, BF16 = 4, 2
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, the shape of the parameter, in optim.moment_dtype
ADAMW_STEP_BYTES = 4  # AdamW's per-tensor `step` counter: a float32 scalar tensor per parameter
# Tensor-parallel weights split on their input dimension (row-parallel); other sharded ones on dim 0.
ROW_PARALLEL = ("out_proj.weight", "o_proj.weight", "down_proj.weight")
# RMSNorm weights of the residual stream stay whole on every TP rank (the Mamba-2 gated norm is split).
TP_REPLICATED = ("mixer_norm.weight", "mlp_norm.weight")


class PlanError(ValueError):
    """The layout cannot run on the cluster (memory) or is not a valid layout; names what and why."""


@dataclass
class Layout:
    world_size: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard


@dataclass
class Memory:
    """Peak bytes per GPU, by part."""
    parameters: float
    gradients: float
    optimizer: float
    gathered: float
    grad_buffers: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def parts(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class StepTime:
    """Seconds per optimizer step on one GPU, by part; communication as totals before overlap."""
    compute: float
    all_gather: float
    reduce_scatter: float
    replica_all_reduce: float
    tp_all_reduce: float
    exposed: float

    @property
    def fsdp(self) -> float:
        return self.all_gather + self.reduce_scatter + self.replica_all_reduce

    @property
    def communication(self) -> float:
        return self.fsdp + self.tp_all_reduce

    @property
    def step(self) -> float:
        return self.compute + self.exposed


@dataclass
class Plan:
    model: str
    n_params: int
    layer_types: str
    cluster: ClusterConfig
    layout: Layout
    activation_checkpoint: str
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    tokens_per_step: int
    flops_per_token: float
    mfu: float
    links: dict[str, str]
    memory: Memory
    time: StepTime
    run_steps: int
    run_tokens: int
    run_label: str
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.layout.world_size / self.time.step

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.time.step

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_s * 86400

    @property
    def days(self) -> float:
        """Whole optimizer steps, as the trainer runs them (the last one may pass the window's end)."""
        return self.run_steps * self.time.step / 86400

    def to_dict(self) -> dict:
        return {"model": self.model, "n_params": self.n_params, "layer_types": self.layer_types,
                "cluster": asdict(self.cluster), "layout": asdict(self.layout),
                "activation_checkpoint": self.activation_checkpoint, "seq_len": self.seq_len,
                "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum,
                "tokens_per_step": self.tokens_per_step, "flops_per_token": self.flops_per_token, "mfu": self.mfu,
                "links": self.links, "memory_bytes": {**self.memory.parts(), "total": self.memory.total},
                "time_s": {**asdict(self.time), "communication": self.time.communication, "step": self.time.step},
                "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu, "tokens_per_s": self.tokens_per_s,
                "tokens_per_day": self.tokens_per_day, "run_steps": self.run_steps, "run_tokens": self.run_tokens,
                "run": self.run_label,
                "days": self.days, "notes": self.notes}


# ---- the model's FSDP units ----------------------------------------------------------------------

def _local_numel(name: str, shape: torch.Size, tp: int, dp_shard: int) -> int:
    """Elements of one parameter on one rank: its TP slice (ceil), then FSDP2's dim-0 shard (padded)."""
    dims = list(shape)
    if tp > 1 and not any(name.endswith(s) for s in TP_REPLICATED) and name != "norm.weight":
        split = 1 if any(name.endswith(s) for s in ROW_PARALLEL) and len(dims) > 1 else 0
        dims[split] = math.ceil(dims[split] / tp)
    dims[0] = math.ceil(dims[0] / dp_shard)
    return math.prod(dims)


def fsdp_units(job: JobConfig, tp: int, dp_shard: int, model: torch.nn.Module | None = None) -> list[dict]:
    """The FSDP units in forward order (embedding, blocks, [norm + head]; fsdp.py), each with its
    parameters: elements per rank, elements of the TP slice (what an all-gather rebuilds), elements per
    rank of the weights autocast casts to bf16 in every module holding them (linear layers, experts: what
    one GPU splits) and in any (a tied head's matrix too), tensors.
    model: the job's model built on meta (built here when not given)."""
    model = model if model is not None else build_model(job.model, device="meta")
    casts: dict[int, list[bool]] = {}  # per parameter, whether each module holding it is one autocast casts
    for module in model.modules():
        for p in module.parameters(recurse=False):
            casts.setdefault(id(p), []).append(isinstance(module, CAST_BY_AUTOCAST))
    groups = [("embed", ["embed."])] + [(f"block {i}", [f"layers.{i}."]) for i in model.layers]
    groups.append(("norm + head", ["norm.", "lm_head."]))
    if job.model.tie_embeddings:  # a tied matrix lives in the root unit (fsdp.py)
        groups = [g for g in groups if g[0] not in ("embed", "norm + head")]
        groups.append(("root", ["embed.", "norm.", "lm_head."]))
    units = []
    for label, prefixes in groups:
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(tuple(prefixes))]
        units.append({"name": label,
                      "numel": sum(_local_numel(n, p.shape, tp, dp_shard) for n, p in params),
                      "gathered_numel": sum(_local_numel(n, p.shape, tp, 1) for n, p in params),
                      # split on one GPU (every holder casts it; BF16Weights), and cast by some holder
                      "cast_numel": sum(_local_numel(n, p.shape, tp, dp_shard) for n, p in params if all(casts[id(p)])),
                      "copied_numel": sum(_local_numel(n, p.shape, tp, dp_shard) for n, p in params
                                          if any(casts[id(p)])),
                      "tensors": len(params)})
    return units


# ---- memory --------------------------------------------------------------------------------------

def _scale(plan_cfg: PlanConfig, job: JobConfig) -> float:
    return job.model.d_model / plan_cfg.act_ref_d_model


def activation_bytes_per_token(job: JobConfig, selective: bool = False) -> dict[str, float]:
    """Bytes kept for backward per token: per block type (mixer + its MLP), and the head's.
    selective: under per-op selective checkpointing (matmul and attention outputs kept)."""
    p, cfg = job.plan, job.model
    s = _scale(p, job)
    mamba, attention, mlp = ((p.act_selective_mamba, p.act_selective_attention, p.act_selective_mlp) if selective
                             else (p.act_mamba, p.act_attention, p.act_mlp))
    mlp = mlp if cfg.mlp_hidden else 0.0
    return {MAMBA: (mamba + mlp) * s, ATTENTION: (attention + mlp) * s, "head": p.act_head * s}


def activation_bytes(job: JobConfig, tp: int) -> float:
    """Activation bytes per GPU at their peak, for one micro-batch: the bytes every block keeps, plus
    the larger of two moments of the backward: the head's (its kept bytes and what its backward holds)
    and a checkpointed block's (its recomputed activations and gradients in flight).

    none: every block's act_* bytes. full: each block keeps its input (the bf16 residual, and the position
    ids and document index all blocks share). selective with ac_every_n_blocks: blocks 0, n, 2n, ... as
    full, the rest as none. selective per-op: the act_selective_* bytes. With tensor parallel each rank
    keeps 1/tp (sequence parallel splits the residual stream too; an assumption, not a measurement)."""
    p, par = job.plan, job.parallel
    s = _scale(p, job)
    types = job.model.layer_types
    mode, every = par.activation_checkpoint, par.ac_every_n_blocks
    per_op = mode == "selective" and not every
    kept = activation_bytes_per_token(job, selective=per_op)
    tokens = job.train.micro_batch_size * job.train.seq_len
    logits = FP32 if job.train.precision == "fp32" else BF16  # the head's matmul dtype (bf16 on GPUs by default)
    if job.fused_loss() and keeps_logits(tokens, job.model.vocab_size, logits):
        # the logits, held from the head's forward to its backward, and the hidden gradient
        head = kept["head"] + logits * (job.model.vocab_size + job.model.d_model)
    else:
        head = kept["head"] + p.act_head_backward * s
    if mode == "none" or per_op:
        blocks = sum(kept[t] for t in types)
        recompute = kept["head"] + p.act_selective_recompute * s if per_op else 0.0
    else:
        checkpointed = [True] * len(types) if mode == "full" else [i % every == 0 for i in range(len(types))]
        ids = 8 + 4  # position ids (int64) and document index (int32)
        blocks = ids + sum(BF16 * job.model.d_model if c else kept[t] for t, c in zip(types, checkpointed))
        recompute = max(kept[t] for t, c in zip(types, checkpointed) if c) + p.act_block_backward * s
    return (blocks + max(head, recompute)) * tokens / tp


def memory_per_gpu(job: JobConfig, layout: Layout, units: list[dict] | None = None, grad_accum: int = 1) -> Memory:
    """Peak memory of one rank. World size 1 is the single-process trainer on a GPU, no FSDP: with bf16
    weights on split fp32 masters where they apply (`split_masters`: the same 4 bytes a weight, bf16
    gradients for the weights autocast casts, summed into fp32 ones beside them over accumulated
    micro-batches, no copies), else fp32 parameters with the bf16 autocast copies of the weights autocast
    casts held through forward and backward (counted as `gathered`; a tied head's matrix is copied either way)."""
    units = units if units is not None else fsdp_units(job, layout.tp, layout.dp_shard)
    par, p = job.parallel, job.plan
    local = sum(u["numel"] for u in units)
    tensors = sum(u["tensors"] for u in units)
    cast, copied = sum(u["cast_numel"] for u in units), sum(u["copied_numel"] for u in units)
    parameters = FP32 * local  # (a split master: a bf16 weight and its int16 low half)
    split = layout.world_size == 1 and split_masters(job)
    # sharded gradients keep the parameters' dtype (fp32); a split master's is its bf16 weight's, beside the
    # fp32 sum of the micro-batches before it when they accumulate
    gradients = FP32 * local
    if split:
        gradients += -(FP32 - BF16) * cast + (FP32 * cast if grad_accum > 1 else 0)
    if layout.tp > 1 and layout.dp_size == 1 and not job.model.tie_embeddings:
        # DTensor's embedding backward returns the vocabulary-sharded table's gradient whole (Replicate)
        # on every TP rank; FSDP, when present, reduce-scatters it back to the shard.
        gradients += FP32 * (job.model.vocab_size * job.model.d_model - units[0]["numel"])
    moment = BF16 if job.optim.moment_dtype == "bfloat16" else FP32
    optimizer = ADAMW_STATES * moment * local + ADAMW_STEP_BYTES * tensors
    gathered_sizes = [BF16 * u["gathered_numel"] for u in units]
    if layout.world_size == 1:
        copies = 0 if job.train.precision == "fp32" else copied - cast if split else copied
        gathered, grad_buffers = float(BF16 * copies), 0.0
    elif layout.dp_size == 1:
        gathered, grad_buffers = float(sum(gathered_sizes)), 0.0
    else:
        k = min(p.units_in_flight, len(units))
        if par.reshard_after_forward:
            gathered = max(sum(gathered_sizes[i:i + k]) for i in range(len(units) - k + 1))
        else:
            gathered = float(sum(gathered_sizes))
        # One unit's unsharded gradient in bf16, and with reduce_dtype float32 the copy the reduce-scatter reads.
        fp32_copy = FP32 if par.reduce_dtype == "float32" else 0
        grad_buffers = max(u["gathered_numel"] for u in units) * (BF16 + fp32_copy)
    activations = activation_bytes(job, layout.tp)
    tensors_total = parameters + gradients + optimizer + gathered + grad_buffers + activations
    overhead = p.overhead_gib * GIB + p.fragmentation * tensors_total
    return Memory(parameters, gradients, optimizer, gathered, grad_buffers, activations, overhead)


def split_masters(job: JobConfig) -> bool:
    """Whether a one-GPU run of `job` keeps bf16 weights on split fp32 masters (train.bf16_weights; None =
    where they apply: bf16 autocast and the Triton AdamW, the CUDA default)."""
    if job.train.bf16_weights is not None:
        return job.train.bf16_weights
    triton_step = job.optim.impl == "triton" or (job.optim.impl == "auto" and job.model.kernels != "torch")
    return job.train.precision != "fp32" and triton_step


# ---- time ----------------------------------------------------------------------------------------

def _group_link(span: int, cluster: ClusterConfig) -> tuple[str, float]:
    """(link name, bus bandwidth in bytes/s) of a group whose ranks span `span` consecutive ranks."""
    if span <= cluster.gpus_per_node:
        return "NVLink", cluster.nvlink_gbps * 1e9
    return "InfiniBand", cluster.ib_gbps * 1e9


def recompute_flops_fraction(job: JobConfig) -> float:
    """Extra block FLOPs of recomputation as a fraction of the training FLOPs (forward = 1/3)."""
    par, n = job.parallel, job.model.n_layers
    if par.activation_checkpoint == "full":
        return 1 / 3
    if par.activation_checkpoint == "selective" and par.ac_every_n_blocks:
        return len(range(0, n, par.ac_every_n_blocks)) / n / 3
    return 0.0  # none; per-op selective keeps the matmuls and attention, recomputing cheap element-wise ops


def _mfu(job: JobConfig, cluster: ClusterConfig) -> float:
    """The one-GPU MFU a step runs at: compiled blocks (the GPU default) or eager."""
    return cluster.mfu_compiled if job.parallel.compile_on("cuda") else cluster.mfu


def step_time(job: JobConfig, cluster: ClusterConfig, layout: Layout, units: list[dict], flops_token: float,
              grad_accum: int) -> tuple[StepTime, dict[str, str]]:
    par, p = job.parallel, job.plan
    tokens_micro = job.train.micro_batch_size * job.train.seq_len  # per data-parallel rank
    mfu = _mfu(job, cluster)
    compute = grad_accum * flops_token * (1 + recompute_flops_fraction(job)) * tokens_micro / layout.tp \
        / (cluster.peak_tflops * 1e12 * mfu)
    links = {}
    shard_name, shard_bw = _group_link(layout.dp_shard * layout.tp, cluster)
    rep_name, rep_bw = _group_link(layout.world_size, cluster)
    tp_name, tp_bw = _group_link(layout.tp, cluster)
    n, r, t = layout.dp_shard, layout.dp_replicate, layout.tp
    reduce_bytes = FP32 if par.reduce_dtype == "float32" else BF16
    gathered = sum(u["gathered_numel"] for u in units)  # elements of a TP slice of the whole model
    all_gather = reduce_scatter = replica = tp_comm = 0.0
    if n > 1:
        links["FSDP shard group"] = f"{n} ranks over {shard_name}"
        # Forward gathers every unit; backward again unless kept (the head always is: fsdp.py).
        head = units[-1]["gathered_numel"] if not job.model.tie_embeddings else 0
        regather = gathered - head if par.reshard_after_forward else 0
        all_gather = grad_accum * (n - 1) / n * BF16 * (gathered + regather) / shard_bw
        reduce_scatter = grad_accum * (n - 1) / n * reduce_bytes * gathered / shard_bw
    if r > 1:
        links["HSDP replica group"] = f"{r} ranks over {rep_name}"
        # All-reduce of each rank's gradient shard with its replicas: 2 (r - 1) / r of it in a ring.
        replica = grad_accum * 2 * (r - 1) / r * reduce_bytes * gathered / n / rep_bw
    if t > 1:
        links["TP group"] = f"{t} ranks over {tp_name}"
        # Per mixer and per MLP one all-reduce of the (micro-batch, d_model) bf16 activations in forward
        # and one in backward (sequence parallel: all-gather + reduce-scatter, the same volume), plus the
        # embedding and the head; full checkpointing repeats the forward ones.
        sublayers = job.model.n_layers * (2 if job.model.mlp_hidden else 1)
        count = (2 + (1 if par.activation_checkpoint == "full" else 0)) * sublayers + 2
        tp_comm = grad_accum * count * 2 * (t - 1) / t * BF16 * tokens_micro * job.model.d_model / tp_bw
    fsdp = all_gather + reduce_scatter + replica
    # FSDP collectives overlap compute except a share; what compute cannot cover is exposed too.
    # TP collectives sit between the layers' matmuls: exposed in full.
    exposed = max(p.exposed_comm_fraction * fsdp, fsdp - compute) + tp_comm
    return StepTime(compute, all_gather, reduce_scatter, replica, tp_comm, exposed), links


# ---- the plan ------------------------------------------------------------------------------------

def resolve_layout(job: JobConfig, world_size: int) -> Layout:
    """The layout for this world size, checked against the model (ParallelConfig.resolve / check_model)."""
    try:
        rep, shard, tp = job.parallel.resolve(world_size)
        job.parallel.check_model(job.model, job.train.seq_len)
    except ValueError as e:
        raise PlanError(str(e)) from e
    return Layout(world_size, rep, shard, tp)


def run_window(job: JobConfig) -> tuple[int | None, str]:
    """(tokens of the stage's window or None, label): a stage's window, else train.max_tokens / max_steps."""
    stage = job.stage
    tokens = stage.length(stage.start_tokens)  # (a relative window counts from the stage file's start)
    if tokens is not None:
        return tokens, (f"stage {stage.name}: {stage.start_tokens / 1e9:,.0f}B -> "
                        f"{(stage.start_tokens + tokens) / 1e9:,.0f}B tokens")
    if job.train.max_steps:
        return None, f"train.max_steps={job.train.max_steps}"
    return None, f"train.max_tokens={job.train.max_tokens:,}"


SHORT_LABELS = {"parameters": "parameters", "gradients": "gradients", "optimizer": "AdamW states",
                "gathered": "gathered bf16 units", "grad_buffers": "unsharded gradient buffers",
                "activations": "activations", "overhead": "overhead"}


def overflow_message(memory: Memory, cluster: ClusterConfig, job: JobConfig) -> str:
    """What does not fit, largest part first, and the knob that shrinks that part."""
    parts = sorted(memory.parts().items(), key=lambda kv: -kv[1])
    listed = " + ".join(f"{SHORT_LABELS[name]} {value / GIB:.1f} GiB" for name, value in parts)
    biggest = parts[0][0]
    if biggest == "activations":
        fix = ("set parallel.activation_checkpoint=full or lower train.micro_batch_size"
               if job.parallel.activation_checkpoint != "full" else "lower train.micro_batch_size or raise parallel.tp")
    elif biggest in ("parameters", "gradients", "optimizer"):
        fix = "shard over more ranks (parallel.dp_shard=-1, fewer replicas) or raise parallel.tp"
    else:
        fix = "lower plan.units_in_flight or set parallel.reshard_after_forward=true"
    return (f"out of memory: {listed} = {memory.total / GIB:.1f} GiB > {cluster.memory_gib:g} GiB on "
            f"{cluster.gpu} ({cluster.name}): {fix}")


def _run_geometry(job: JobConfig, layout: Layout):
    """(the trainer's batch geometry of `job` on `layout`: RunPlan, the run window's label)."""
    from hybrid_train.train.trainer import plan_run

    try:
        window, label = run_window(job)
        return plan_run(job, layout.dp_size, window), label
    except ValueError as e:
        raise PlanError(str(e)) from e


def make_plan(job: JobConfig, cluster: ClusterConfig | None = None, world_size: int | None = None,
              check_memory: bool = True) -> Plan:
    """Plan `job` on `cluster` (default job.cluster) over world_size GPUs (default all of them).

    Raises PlanError for an invalid layout or (check_memory) one that does not fit in memory."""
    cluster = cluster or job.cluster
    if cluster is None:
        raise PlanError("no cluster: pick one with cluster=NAME (conf/cluster/: a100_192, h100_64, h200_8)")
    world = world_size or cluster.n_gpus
    if world_size is None and job.parallel.tp > cluster.gpus_per_node:
        raise PlanError(f"parallel.tp={job.parallel.tp} spans nodes of cluster.gpus_per_node={cluster.gpus_per_node}")
    layout = resolve_layout(job, world)
    run, label = _run_geometry(job, layout)
    model = build_model(job.model, device="meta")
    units = fsdp_units(job, layout.tp, layout.dp_shard, model)
    n_params, n_embedding = count_params(model)
    flops = flops_per_token(job.model, n_params, n_embedding, job.train.seq_len)
    memory = memory_per_gpu(job, layout, units, run.grad_accum)
    if check_memory and memory.total > cluster.memory_gib * GIB:
        raise PlanError(overflow_message(memory, cluster, job))
    time, links = step_time(job, cluster, layout, units, flops, run.grad_accum)
    notes = []
    if time.fsdp > time.compute:
        notes.append("FSDP communication exceeds compute: the step is communication-bound")
    return Plan(job.model.name, n_params, "".join(job.model.layer_types), cluster, layout,
                job.parallel.activation_checkpoint, job.train.seq_len, job.train.micro_batch_size, run.grad_accum,
                run.tokens_per_step, flops, _mfu(job, cluster), links,
                memory, time, run.total_steps, run.total_steps * run.tokens_per_step, label, notes)


# ---- text ----------------------------------------------------------------------------------------

MEMORY_LABELS = {
    "parameters": "parameters (fp32, sharded)",
    "gradients": "gradients (fp32, sharded)",
    "optimizer": "AdamW states (2 moments, + step counters)",
    "gathered": "gathered bf16 units in flight",
    "grad_buffers": "unsharded gradient of one unit (bf16, + fp32 to reduce)",
    "activations": "activations",
    "overhead": "NCCL/workspaces + allocator margin",
}


def _tokens(n: float) -> str:
    return f"{n / 1e9:,.1f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def _duration(days: float) -> str:
    if days >= 1:
        return f"{days:,.1f} days"
    hours = days * 24
    return f"{hours:.1f} hours" if hours >= 1 else f"{hours * 60:.1f} minutes" if hours * 60 >= 1 else \
        f"{hours * 3600:.1f} s"


def format_plan(plan: Plan) -> str:
    c, lay, m, t = plan.cluster, plan.layout, plan.memory, plan.time
    types = plan.layer_types
    nodes = max(1, c.n_gpus // c.gpus_per_node)
    lines = [
        f"plan: {plan.model} ({plan.n_params / 1e9:.2f}B parameters; {len(types)} blocks: {types.count(MAMBA)} "
        f"Mamba-2, {types.count(ATTENTION)} attention) on {c.name}: {lay.world_size} x {c.gpu} "
        f"({nodes} node(s) x {c.gpus_per_node})",
        f"layout: dp_replicate {lay.dp_replicate} x dp_shard {lay.dp_shard} x tp {lay.tp}; activation checkpointing "
        f"{plan.activation_checkpoint}; micro-batch {plan.micro_batch_size} x {plan.seq_len} tokens; grad accumulation "
        f"{plan.grad_accum}; {plan.tokens_per_step:,} tokens per step",
        "memory per GPU:",
    ]
    for key, value in m.parts().items():
        lines.append(f"  {MEMORY_LABELS[key]:<56}{value / GIB:>8.2f} GiB")
    lines.append(f"  {'total':<56}{m.total / GIB:>8.2f} GiB of {c.memory_gib:g} GiB "
                 f"({m.total / GIB / c.memory_gib:.0%})")
    lines.append("step time per GPU:")
    lines.append(f"  {'compute':<56}{t.compute:>8.3f} s   ({plan.flops_per_token / 1e9:.1f} GFLOP/token, "
                 f"{c.peak_tflops:g} TFLOP/s x {plan.mfu:.0%} MFU)")
    for key, label in (("all_gather", "FSDP all-gather (bf16 parameters)"),
                       ("reduce_scatter", "FSDP reduce-scatter (gradients)"),
                       ("replica_all_reduce", "HSDP all-reduce across replicas"),
                       ("tp_all_reduce", "TP activation all-reduces")):
        if getattr(t, key):
            lines.append(f"  {label:<56}{getattr(t, key):>8.3f} s")
    for group, how in plan.links.items():
        lines.append(f"    {group}: {how}")
    lines.append(f"  {'communication total / exposed':<56}{t.communication:>8.3f} s / {t.exposed:.3f} s")
    lines.append(f"  {'step':<56}{t.step:>8.3f} s")
    lines.append(f"throughput: {plan.tokens_per_s_per_gpu:,.0f} tokens/s/GPU; {plan.tokens_per_s:,.0f} tokens/s "
                 f"cluster; {plan.tokens_per_day / 1e9:,.1f}B tokens/day "
                 f"(MFU at the step: {plan.tokens_per_s_per_gpu * plan.flops_per_token / (c.peak_tflops * 1e12):.1%})")
    steps = f"{plan.run_steps:,} step{'s' if plan.run_steps != 1 else ''}"
    lines.append(f"run: {plan.run_label}: {steps}, {_tokens(plan.run_tokens)} tokens, "
                 f"{_duration(plan.days)}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


TABLE_AC_MODES = ("none", "selective", "full")


def memory_table(job: JobConfig, world_sizes: list[int]) -> list[dict]:
    """Peak memory per GPU (GiB, by part) of job's layout over each FSDP world size, for each activation
    checkpointing mode (selective: per op, unless parallel.ac_every_n_blocks says otherwise)."""
    rows = []
    model = build_model(job.model, device="meta")
    for world in world_sizes:
        layout = resolve_layout(job, world)  # (the checkpointing mode changes neither layout, units nor batch)
        units = fsdp_units(job, layout.tp, layout.dp_shard, model)
        grad_accum = _run_geometry(job, layout)[0].grad_accum
        for mode in TABLE_AC_MODES:
            memory = memory_per_gpu(_with_ac(job, mode), layout, units, grad_accum)
            rows.append({"world_size": world, "layout": asdict(layout), "activation_checkpoint": mode,
                         **{k: v / GIB for k, v in memory.parts().items()}, "total": memory.total / GIB})
    return rows


def _with_ac(job: JobConfig, mode: str) -> JobConfig:
    from dataclasses import replace
    return replace(job, parallel=replace(job.parallel, activation_checkpoint=mode))


def format_memory_table(rows: list[dict], job: JobConfig) -> str:
    keys = list(MEMORY_LABELS)
    cluster = job.cluster
    head = ["GPUs", "AC", "params", "grads", "AdamW", "gathered", "grad buf", "activations", "overhead", "total"]
    head += [f"fits {cluster.memory_gib:g} GiB ({cluster.gpu})"] if cluster else []
    lines = [f"peak memory per GPU (GiB): {job.model.name}, micro-batch {job.train.micro_batch_size} x "
             f"{job.train.seq_len}, reduce {job.parallel.reduce_dtype}",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [str(r["world_size"]), r["activation_checkpoint"], *(f"{r[k]:.2f}" for k in keys),
                 f"**{r['total']:.1f}**"]
        cells += (["yes" if r["total"] <= cluster.memory_gib else "no"] if cluster else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
