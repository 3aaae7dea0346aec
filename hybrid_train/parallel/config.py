"""Configuration of the parallel layout and of the memory/speed knobs applied with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hybrid_train.model.config import ATTENTION, MAMBA, ModelConfig

AC_MODES = ("none", "full", "selective")
REDUCE_DTYPES = ("float32", "bfloat16")


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    """Replicas of the sharded model (HSDP: replicate across nodes); -1 = what remains of the world."""
    dp_shard: int = -1
    """FSDP shard group size; -1 = what remains of the world."""
    tp: int = 1
    """Tensor-parallel degree (keep it within a node); divides attention/KV heads, Mamba-2 heads and groups."""
    ep: int = 1
    """Expert-parallel degree: routed experts split over ep adjacent FSDP ranks; divides dp_shard and moe_n_experts."""
    sequence_parallel: bool = True
    """With tp > 1: norms and the residual stream hold 1/tp of the sequence (less activation memory)."""
    loss_parallel: bool = False
    """With tp > 1: logits stay sharded over the vocabulary; loss and backward run under `loss_context(env)`."""
    reshard_after_forward: bool = True
    """FSDP: free each block's gathered parameters after its forward (gather again for backward)."""
    reduce_dtype: str = "float32"
    """FSDP: dtype of gradient reductions, float32 or bfloat16."""
    activation_checkpoint: str = "none"
    """Recompute activations in backward: none, full (every block) or selective."""
    ac_every_n_blocks: int = 0
    """selective: checkpoint every n-th block whole; 0 = every block, saving matmul and collective outputs."""
    compile: Optional[bool] = None
    """torch.compile each block (after TP and activation checkpointing, before FSDP). None (the default):
    on when the run's device is a CUDA GPU (+12% tokens/s at 9B width on an H200), off on CPU, where
    compiling a small model costs more than it gains."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; aot_eager or eager to debug)."""

    def validate(self) -> "ParallelConfig":
        """Field checks that need no world size; raises ValueError naming the field and value."""
        for key in ("dp_replicate", "dp_shard"):
            value = getattr(self, key)
            if value == 0 or value < -1:
                raise ValueError(f"parallel.{key}={value} must be positive or -1")
        if self.dp_replicate == -1 and self.dp_shard == -1:
            raise ValueError("only one of parallel.dp_replicate and parallel.dp_shard may be -1")
        if self.tp < 1:
            raise ValueError(f"parallel.tp={self.tp} must be >= 1")
        if self.ep < 1:
            raise ValueError(f"parallel.ep={self.ep} must be >= 1")
        if self.ep > 1 and self.tp > 1:
            raise ValueError(f"parallel.ep={self.ep} with parallel.tp={self.tp}: expert parallelism runs without "
                             "tensor parallelism (parallel.tp=1)")
        if self.reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"parallel.reduce_dtype={self.reduce_dtype!r} must be one of {', '.join(REDUCE_DTYPES)}")
        if self.activation_checkpoint not in AC_MODES:
            raise ValueError(f"parallel.activation_checkpoint={self.activation_checkpoint!r} must be one of "
                             f"{', '.join(AC_MODES)}")
        if self.ac_every_n_blocks < 0:
            raise ValueError(f"parallel.ac_every_n_blocks={self.ac_every_n_blocks} must be >= 0")
        if self.loss_parallel and self.tp == 1:
            raise ValueError("parallel.loss_parallel=true needs parallel.tp > 1 (the vocabulary is sharded over TP)")
        return self

    def compile_on(self, device_type: str) -> bool:
        """Whether blocks are compiled on this device type (parallel.compile, None = on for CUDA)."""
        return device_type == "cuda" if self.compile is None else bool(self.compile)

    def resolve(self, world_size: int) -> tuple[int, int, int]:
        """(dp_replicate, dp_shard, tp) for this world size; raises ValueError naming the sizes."""
        self.validate()
        rep, shard, tp = self.dp_replicate, self.dp_shard, self.tp
        known = (rep if rep > 0 else 1) * (shard if shard > 0 else 1) * tp
        if world_size % known:
            raise ValueError(f"world size {world_size} is not divisible by parallel.dp_replicate={rep} x "
                             f"parallel.dp_shard={shard} x parallel.tp={tp} (the sizes that are not -1)")
        rep = rep if rep > 0 else world_size // known
        shard = shard if shard > 0 else world_size // known
        if rep * shard * tp != world_size:
            raise ValueError(f"parallel.dp_replicate={rep} x parallel.dp_shard={shard} x parallel.tp={tp} "
                             f"= {rep * shard * tp} != world size {world_size}")
        if shard % self.ep:
            raise ValueError(f"parallel.ep={self.ep} must divide parallel.dp_shard={shard} (experts are split over "
                             "ranks of one FSDP group)")
        return rep, shard, tp

    def check_model(self, model_cfg: ModelConfig, seq_len: int | None = None) -> None:
        """TP splits whole heads and groups: each count it splits must be divisible by parallel.tp. EP
        splits whole experts: parallel.ep must divide model.moe_n_experts."""
        if self.ep > 1:
            if not model_cfg.moe_n_experts:
                raise ValueError(f"parallel.ep={self.ep} needs an MoE model (model.moe_n_experts=0)")
            if model_cfg.moe_n_experts % self.ep:
                raise ValueError(f"parallel.ep={self.ep} does not divide model.moe_n_experts={model_cfg.moe_n_experts}")
        tp = self.tp
        if tp == 1:
            return
        if model_cfg.moe_n_experts:
            raise ValueError(f"parallel.tp={tp} with model.moe_n_experts={model_cfg.moe_n_experts}: tensor parallelism "
                             "of MoE blocks is not supported; shard the model with FSDP (parallel.tp=1)")
        types = model_cfg.layer_types
        counts = []
        if ATTENTION in types:
            counts += [("model.n_heads", model_cfg.n_heads), ("model.n_kv_heads", model_cfg.n_kv_heads)]
        if MAMBA in types:
            # The gated norm is per group, so whole groups per rank keep it free of communication.
            counts += [("Mamba-2 heads (d_inner / model.ssm_head_dim)", model_cfg.ssm_n_heads),
                       ("model.ssm_n_groups", model_cfg.ssm_n_groups)]
        if model_cfg.mlp_hidden:
            counts.append(("model.mlp_hidden", model_cfg.mlp_hidden))
        bad = [f"{name}={count}" for name, count in counts if count % tp]
        if bad:
            raise ValueError(f"parallel.tp={tp} must divide {', '.join(bad)}")
        if self.sequence_parallel and seq_len is not None and seq_len % tp:
            raise ValueError(f"parallel.sequence_parallel splits the sequence: train.seq_len={seq_len} is not "
                             f"divisible by parallel.tp={tp}")


@dataclass
class ClusterConfig:
    """A cluster for the planner (`conf/cluster/*.yaml`); nothing here changes how a run trains."""

    name: str = "h200_8"
    """Label printed in the plan."""
    gpu: str = "H200"
    """GPU model, as printed in the plan and in its refusals."""
    n_gpus: int = 8
    """GPUs in the job (the world size the plan checks the layout against)."""
    gpus_per_node: int = 8
    """GPUs per node: groups within one node talk over NVLink, larger ones over InfiniBand."""
    memory_gib: float = 139.0
    """Memory per GPU one process can allocate (GiB): the total less the CUDA context."""
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (TFLOP/s), the denominator of MFU."""
    nvlink_gbps: float = 360.0
    """Bus bandwidth per GPU of a collective within a node (GB/s), as nccl-tests reports it."""
    ib_gbps: float = 40.0
    """Bus bandwidth per GPU of a collective across nodes (GB/s): each GPU's share of the network."""
    mfu: float = 0.48
    """Model FLOPs utilization of one GPU's forward + backward, eager (measured: BENCHMARKS.md)."""
    mfu_compiled: float = 0.54
    """The same with parallel.compile=true."""

    def validate(self) -> "ClusterConfig":
        """Field checks; raises ValueError naming the field and value."""
        for key in ("n_gpus", "gpus_per_node", "memory_gib", "peak_tflops", "nvlink_gbps", "ib_gbps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"cluster.{key}={getattr(self, key)} must be positive")
        if self.n_gpus % self.gpus_per_node and self.n_gpus > self.gpus_per_node:
            raise ValueError(f"cluster.n_gpus={self.n_gpus} is not a whole number of nodes of "
                             f"cluster.gpus_per_node={self.gpus_per_node}")
        for key in ("mfu", "mfu_compiled"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"cluster.{key}={getattr(self, key)} must be in (0, 1]")
        return self


@dataclass
class PlanConfig:
    """Inputs of the cluster planner (`scripts/plan.py`) that are not the cluster's or the job's."""

    out: Optional[str] = None
    """Also write the plan (or the memory table) as JSON to this file."""
    memory_table: bool = False
    """Print peak memory per GPU over table_world_sizes x activation checkpointing none/selective/full instead."""
    table_world_sizes: List[int] = field(default_factory=lambda: [8, 64])
    """FSDP world sizes of the memory table."""
    exposed_comm_fraction: float = 0.1
    """Share of the FSDP communication that compute does not hide (prefetch, first gather, last reduce)."""
    units_in_flight: int = 2
    """FSDP units gathered at once in bf16: the one computing and the one prefetched."""
    overhead_gib: float = 2.0
    """Fixed memory per GPU outside the tensors: NCCL buffers, cuBLAS and Triton workspaces (GiB)."""
    fragmentation: float = 0.05
    """Allocator margin: cached but unusable memory, as a fraction of the tensor bytes."""
    # Activation bytes per token, measured on an H200 (BENCHMARKS.md, "Cluster plan"): bf16 parameters,
    # Triton kernels, eager, fused head + loss recomputing its logits, 4 documents per row; each mixer
    # counts its pre-norm.
    act_ref_d_model: int = 4096
    """d_model at which the act_* bytes were measured; other widths scale them by d_model / this."""
    act_mamba: float = 92_424.0
    """Bytes per token a Mamba-2 mixer keeps for backward (no checkpointing)."""
    act_attention: float = 38_020.0
    """Bytes per token an attention mixer keeps for backward."""
    act_mlp: float = 102_404.0
    """Bytes per token a SwiGLU MLP keeps for backward: the 131,076 measured before the fused SwiGLU kernel,
    less the bf16 SiLU output it no longer keeps (2 x 14336; the 9B slice's peak fell by that, 1.0 GB)."""
    act_head: float = 16_401.0
    """Bytes per token the embedding, final norm and fused LM head + loss keep for backward, the logits
    recomputed; when the head keeps its bf16 logits (they fit its 2 GiB budget) the planner adds them."""
    act_head_backward: float = 63_472.0
    """Bytes per token in flight in the head + loss backward, beyond its kept bytes and weight gradient
    (logits recomputed; with kept logits it is the bf16 hidden gradient)."""
    act_block_backward: float = 3_698.0
    """full checkpointing: bytes per token in flight in one block's backward beyond its recomputed
    activations (which are the block's act_* bytes) and its weight gradients."""
    act_selective_mamba: float = 49_920.0
    """selective per-op checkpointing (matmul and attention outputs kept): a Mamba-2 mixer's bytes per token."""
    act_selective_attention: float = 28_672.0
    """selective per-op: an attention mixer's bytes per token."""
    act_selective_mlp: float = 65_536.0
    """selective per-op: an MLP's bytes per token."""
    act_selective_recompute: float = 111_725.0
    """selective per-op: bytes per token recomputed and in flight at the peak of a Mamba-2 + MLP block's
    backward, beyond the kept bytes and its weight gradients."""

    def validate(self) -> "PlanConfig":
        """Field checks; raises ValueError naming the field and value."""
        if not 0 <= self.exposed_comm_fraction <= 1:
            raise ValueError(f"plan.exposed_comm_fraction={self.exposed_comm_fraction} must be in [0, 1]")
        if self.units_in_flight < 1:
            raise ValueError(f"plan.units_in_flight={self.units_in_flight} must be >= 1")
        if not self.table_world_sizes or min(self.table_world_sizes) < 1:
            raise ValueError(f"plan.table_world_sizes={list(self.table_world_sizes)} must be positive sizes")
        act_fields = tuple(k for k in self.__dataclass_fields__ if k.startswith("act_"))
        for key in ("overhead_gib", "fragmentation") + act_fields:
            if getattr(self, key) < 0:
                raise ValueError(f"plan.{key}={getattr(self, key)} must be >= 0")
        if self.act_ref_d_model <= 0:
            raise ValueError(f"plan.act_ref_d_model={self.act_ref_d_model} must be positive")
        return self
