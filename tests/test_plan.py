"""The cluster planner (hybrid_train/parallel/plan.py, scripts/plan.py): refusals, scaling, the state bytes
against real runs (one process, and FSDP2 / TP ranks over gloo), the cluster configs, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from distributed import run_distributed
from hybrid_train.config import JobConfig, job_config_from_hydra, register_configs
from hybrid_train.model import ModelConfig, build_model
from hybrid_train.parallel import ParallelConfig, full_tensor_init, init_distributed, parallelize
from hybrid_train.parallel.plan import GIB, Layout, PlanError, make_plan, memory_per_gpu, memory_table
from hybrid_train.train.config import OptimConfig, TrainConfig
from hybrid_train.train.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
BAMBA_ROW = ["model=bamba_9b", "train.seq_len=4096", "train.micro_batch_size=2"]
# 3 x 4096 tokens a GPU with no checkpointing: sharded over a node of 8 the kept activations alone pass 70 GiB.
OVERFLOWING = ["model=bamba_9b", "train.seq_len=4096", "train.micro_batch_size=3"]
# Odd first dimensions (vocab 97, d_model 30, ...) so that FSDP2 pads shards over 2 ranks.
SMALL = ModelConfig(name="plan_small", vocab_size=97, d_model=30, n_layers=3, layer_pattern="MAM", n_heads=4,
                    n_kv_heads=2, head_dim=8, mlp_hidden=66, ssm_d_state=8, ssm_head_dim=15, ssm_n_groups=2,
                    ssm_chunk_size=8)


def plan_for(compose, *overrides):
    return make_plan(compose(list(overrides)))


def compose_plan(overrides: list[str]) -> JobConfig:
    """Compose as scripts/plan.py does: like train.py, but a stage needs no checkpoint to start from."""
    from hybrid_train.overrides import whole_numbers

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=whole_numbers(list(overrides), JobConfig))
    return job_config_from_hydra(cfg, require_init_from=False)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of this process's parameters, gradients and optimizer state tensors (local shards)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters()]
    states = [v.to_local() if hasattr(v, "to_local") else v
              for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"parameters": sum(t.nbytes for t in local), "gradients": sum(t.nbytes for t in grads),
            "optimizer": sum(t.nbytes for t in states)}


def one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, vocab: int) -> None:
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1]).float().logsumexp(-1).mean().backward()
    optimizer.step()


def job_for(model_cfg: ModelConfig, **parallel) -> JobConfig:
    return JobConfig(model=model_cfg.validate(), parallel=ParallelConfig(**parallel).validate(),
                     train=TrainConfig(seq_len=16, micro_batch_size=2, max_tokens=1000))


# ---- refusals ------------------------------------------------------------------------------------

def test_overflowing_activations_are_refused_by_name(compose):
    overrides = OVERFLOWING + ["cluster=h100_64"]
    with pytest.raises(PlanError, match=r"out of memory: activations \d+\.\d GiB \+ .* > 79 GiB on H100-80GB "
                                        r"\(h100_64\): set parallel.activation_checkpoint=full"):
        plan_for(compose, *overrides, "parallel=hsdp")
    fits = plan_for(compose, *overrides, "parallel=hsdp", "parallel.activation_checkpoint=full")
    assert fits.memory.total < 79 * GIB and fits.memory.activations < 8 * GIB


def test_unsharded_states_are_refused_with_the_sharding_fix(compose):
    # Replicas only (DDP-like): 9.78B parameters x 16 bytes of fp32 state per GPU cannot fit in 139 GiB.
    with pytest.raises(PlanError, match=r"out of memory: AdamW states 7\d\.\d GiB .* shard over more ranks"):
        plan_for(compose, *BAMBA_ROW, "cluster=h200_8", "parallel.dp_replicate=-1", "parallel.dp_shard=1",
                 "parallel.activation_checkpoint=full")


@pytest.mark.parametrize("overrides, message", [
    (["parallel.dp_shard=3"], "world size 8 is not divisible by parallel.dp_replicate=1 x parallel.dp_shard=3"),
    (["parallel.tp=2"], "parallel.tp=2 must divide model.ssm_n_groups=1"),
    (["parallel.tp=16", "model.ssm_n_groups=16"], "parallel.tp=16 spans nodes of cluster.gpus_per_node=8"),
])
def test_invalid_layouts_are_refused(compose, overrides, message):
    with pytest.raises(PlanError, match=message):
        plan_for(compose, *BAMBA_ROW, "cluster=h200_8", *overrides)


def test_no_cluster_is_refused(compose):
    with pytest.raises(PlanError, match="no cluster: pick one with cluster=NAME"):
        plan_for(compose, *BAMBA_ROW)


# ---- time and scaling ----------------------------------------------------------------------------

def test_doubling_the_gpus_roughly_halves_the_days(compose):
    base = BAMBA_ROW + ["cluster=a100_192", "parallel.activation_checkpoint=full", "train.max_tokens=2000000000000"]
    small, large = plan_for(compose, *base), plan_for(compose, *base, "cluster.n_gpus=384")
    assert large.layout.world_size == 384 and large.tokens_per_step == 2 * small.tokens_per_step
    assert 0.45 < large.days / small.days < 0.55
    # the same with a fixed global batch: twice the GPUs, half the gradient accumulation
    fixed = ["train.global_batch_tokens=3145728"]
    small, large = plan_for(compose, *base, *fixed), plan_for(compose, *base, *fixed, "cluster.n_gpus=384")
    assert (small.grad_accum, large.grad_accum) == (2, 1)
    assert 0.45 < large.days / small.days < 0.55


def test_links_overlap_and_stage_window(compose):
    one_node = plan_for(compose, *BAMBA_ROW, "cluster=h200_8", "parallel.activation_checkpoint=full")
    assert one_node.links == {"FSDP shard group": "8 ranks over NVLink"}
    hsdp = compose_plan(BAMBA_ROW + ["cluster=h100_64", "parallel=hsdp", "parallel.activation_checkpoint=full",
                                     "+stage=extend"])
    plan = make_plan(hsdp)
    assert plan.links == {"FSDP shard group": "8 ranks over NVLink", "HSDP replica group": "8 ranks over InfiniBand"}
    assert plan.time.replica_all_reduce > 0 and plan.run_steps == math.ceil(500 * 10 ** 9 / plan.tokens_per_step)
    across = make_plan(dataclasses.replace(hsdp, parallel=dataclasses.replace(hsdp.parallel, dp_replicate=1,
                                                                             dp_shard=-1)))
    assert across.links == {"FSDP shard group": "64 ranks over InfiniBand"}
    assert across.time.fsdp > plan.time.fsdp  # the shard group's gathers now cross the slower network
    # exposed: the configured share of the FSDP time, or all of what compute cannot hide
    for p in (plan, across):
        t = p.time
        assert t.exposed == pytest.approx(max(0.1 * t.fsdp, t.fsdp - t.compute))
        assert t.step == pytest.approx(t.compute + t.exposed)
        assert p.days == pytest.approx(p.run_steps * t.step / 86400)
        assert p.days == pytest.approx(500e9 / p.tokens_per_day, rel=1e-5)
    # a stage given by its length (stage.tokens) plans that length, not the stage file's window
    short = make_plan(compose_plan(BAMBA_ROW + ["cluster=h100_64", "+stage=extend", "stage.tokens=100e9"]))
    assert short.run_steps == math.ceil(100 * 10 ** 9 / short.tokens_per_step)


# ---- memory against real runs --------------------------------------------------------------------

def test_state_bytes_match_a_single_process_run(compose):
    """fp32 parameters and gradients (a CPU run; on a GPU without split masters). With split masters:
    tests/kernels_interp_cases.py, through the Triton AdamW that steps them."""
    job = compose(["train.bf16_weights=false"])  # the tiny model, as `python train.py` trains it
    model = build_model(job.model)
    optimizer = build_optimizer(model, job.optim)
    one_step(model, optimizer, job.model.vocab_size)
    measured = state_bytes(model, optimizer)
    planned = memory_per_gpu(job, Layout(1, 1, 1, 1))
    assert {k: getattr(planned, k) for k in measured} == measured


def _sharded_state_bytes(rank: int, world_size: int) -> list[dict[str, int]]:
    results = []
    for layout in (dict(dp_shard=2), dict(tp=2, dp_shard=1)):
        cfg = ParallelConfig(**layout)
        env = init_distributed(cfg, "cpu", SMALL, 16)
        model = build_model(SMALL, device="meta")
        parallelize(model, env)
        model.to_empty(device="cpu")
        with full_tensor_init():
            model.init_weights()
        optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
        one_step(model, optimizer, SMALL.vocab_size)
        results.append(state_bytes(model, optimizer))
    return results


@pytest.mark.slow
def test_state_bytes_match_fsdp_and_tp_ranks():
    """Rank 0 holds the larger (padded) shard of every tensor: the planner's per-GPU peak."""
    rank0 = run_distributed(_sharded_state_bytes, 2)[0]
    for layout, measured in zip((Layout(2, 1, 2, 1), Layout(2, 1, 1, 2)), rank0):
        job = job_for(SMALL, dp_shard=layout.dp_shard, tp=layout.tp)
        planned = memory_per_gpu(job, layout)
        assert {k: getattr(planned, k) for k in measured} == measured, layout


def test_memory_table_over_world_sizes(compose):
    rows = memory_table(compose(BAMBA_ROW), [8, 64])
    assert [(r["world_size"], r["activation_checkpoint"]) for r in rows] == [
        (8, "none"), (8, "selective"), (8, "full"), (64, "none"), (64, "selective"), (64, "full")]
    by = {(r["world_size"], r["activation_checkpoint"]): r for r in rows}
    assert by[8, "none"]["optimizer"] == pytest.approx(8 * by[64, "none"]["optimizer"], rel=1e-3)
    assert by[8, "none"]["activations"] == by[64, "none"]["activations"] > 10 * by[8, "full"]["activations"]
    assert by[8, "full"]["activations"] < by[8, "selective"]["activations"] < by[8, "none"]["activations"]


# ---- configs and CLI -----------------------------------------------------------------------------

def test_cluster_configs_compose_and_validate(compose):
    assert compose([]).cluster is None  # train.py needs no cluster
    names = sorted(p.stem for p in (REPO / "conf" / "cluster").glob("*.yaml"))
    assert names == ["a100_192", "h100_64", "h200_8"]
    for name in names:
        cluster = compose([f"cluster={name}"]).cluster
        assert cluster.name == name and cluster.n_gpus % cluster.gpus_per_node == 0
    assert compose(["cluster=a100_192"]).cluster.peak_tflops == 312.0
    with pytest.raises(ValueError, match=r"cluster.mfu=1.5 must be in \(0, 1\]"):
        compose(["cluster=h200_8", "cluster.mfu=1.5"])
    with pytest.raises(ValueError, match=r"plan.exposed_comm_fraction=2.0 must be in \[0, 1\]"):
        compose(["plan.exposed_comm_fraction=2"])


def test_cli_prints_and_writes_the_plan_and_refuses_with_nonzero_exit(tmp_path, monkeypatch):
    out = tmp_path / "plan.json"
    run = subprocess.run([sys.executable, "scripts/plan.py", "model=bamba_9b", "cluster=a100_192", "train.seq_len=4096",
                          "train.micro_batch_size=2", "+stage=extend", f"plan.out={out}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "192 x A100-80GB" in run.stdout and "tokens/s/GPU" in run.stdout and "stage extend" in run.stdout
    plan = json.loads(out.read_text())
    assert plan["run_steps"] == math.ceil(500 * 10 ** 9 / 1572864) and plan["layout"]["dp_shard"] == 192
    assert f"{plan['days']:,.1f} days" in run.stdout and "317,892 steps" in run.stdout
    # the refusal in this process (a second interpreter costs seconds): same entry point, same argv parsing
    monkeypatch.setattr(sys, "argv", ["plan.py", *OVERFLOWING, "cluster=h100_64", "parallel=hsdp"])
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(REPO / "scripts" / "plan.py"), run_name="__main__")
    assert str(refused.value.code).startswith("refused: out of memory: activations")


def test_kept_head_logits_are_planned_at_the_head_only(compose, monkeypatch):
    """Where the fused loss keeps its bf16 logits (8192 tokens fit its 2 GiB budget), the head's moment
    holds 2 x vocabulary bytes per token more and the bf16 hidden gradient in place of act_head_backward;
    a checkpointed block's moment, later in backward, does not hold them."""
    from hybrid_train.ops import cross_entropy
    from hybrid_train.parallel.plan import activation_bytes

    job = compose(BAMBA_ROW)
    tokens, vocab, d = 8192, job.model.vocab_size, job.model.d_model
    kept = activation_bytes(job, tp=1)
    monkeypatch.setattr(cross_entropy, "_KEEP_LOGITS_BYTES", -1)
    recomputed = activation_bytes(job, tp=1)
    assert kept - recomputed == pytest.approx((2 * (vocab + d) - job.plan.act_head_backward) * tokens)
    monkeypatch.undo()
    # fp32 training keeps fp32 logits, and only up to 4096 tokens at this vocabulary
    fp32 = compose(BAMBA_ROW + ["train.precision=fp32", "train.micro_batch_size=1"])
    monkeypatch.setattr(cross_entropy, "_KEEP_LOGITS_BYTES", -1)
    fp32_recomputed = activation_bytes(fp32, tp=1)
    monkeypatch.undo()
    assert activation_bytes(fp32, tp=1) - fp32_recomputed == pytest.approx(
        (4 * (vocab + d) - job.plan.act_head_backward) * 4096)
    assert activation_bytes(compose(BAMBA_ROW + ["train.precision=fp32"]), tp=1) == pytest.approx(2 * fp32_recomputed)
    # under full checkpointing the head's moment with kept logits is the peak
    full = compose(BAMBA_ROW + ["parallel.activation_checkpoint=full"])
    per_token = activation_bytes(full, tp=1) / tokens
    blocks = 12 + 2 * d * len(full.model.layer_types)
    assert per_token == pytest.approx(blocks + full.plan.act_head + 2 * (vocab + d))
