"""Expert parallelism against the single-process MoE model, in real gloo process groups on CPU.

The parent computes the reference (logits, gradients, losses, gradient norms and weights over 3
clipped optimizer steps) and saves its initial state as a DCP checkpoint. EP = 2 (2 processes) and
EP = 2 x FSDP 2 (4 processes) start from that checkpoint (DCP loads the single-process tensors into the
expert-sharded layout), train on their data-parallel share of the same batches and must match; the
EP = 2 run saves a checkpoint that the parent loads into the plain model. fp32, rtol 1e-5.

The load-balancing loss is off here: it is a product of per-batch averages, so a data-parallel run
balances each rank's batch (as Megatron and torchtitan do) rather than the global batch; the z-loss,
a mean over tokens, is on.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict)
from torch.distributed.tensor import DTensor

from distributed import run_distributed
from hybrid_train.model import ModelConfig, build_model
from hybrid_train.parallel import (ParallelConfig, all_reduce_mean, clip_grad_norm_, full_tensor_init, init_distributed,
                                   parallelize)
from hybrid_train.train.config import OptimConfig
from hybrid_train.train.loss import lm_loss
from hybrid_train.train.optim import build_optimizer

# Mamba-2, attention and MoE blocks (4 experts, top-2, a shared expert), dense SwiGLU in block 0.
MODEL = ModelConfig(name="eptiny", vocab_size=96, d_model=32, n_layers=3, layer_pattern="MAM", n_heads=4, n_kv_heads=2,
                    head_dim=8, mlp_hidden=32, ssm_d_state=8, ssm_head_dim=16, ssm_n_groups=2, ssm_chunk_size=8,
                    moe_n_experts=4, moe_top_k=2, moe_hidden=16, moe_shared_hidden=16, moe_every=2, moe_offset=1,
                    moe_aux_loss_coef=0.0, moe_z_loss_coef=0.01, moe_layer_indices=[1, 2])
ROWS, SEQ, STEPS = 4, 16, 3
OPTIM = OptimConfig(lr=1e-2)
CLIP = 0.05
RTOL = 1e-5
STEP_ATOL = 1e-3 * OPTIM.lr  # see test_parallel_distributed.py
EXPERTS = ("layers.1.mlp.experts.gate_up_proj", "layers.2.mlp.experts.down_proj")


def make_batches(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(0, MODEL.vocab_size, (ROWS, SEQ + 1), generator=gen)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(SEQ).expand(ROWS, SEQ),
                    "seq_idx": torch.zeros(ROWS, SEQ, dtype=torch.int32)})
    return out


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def step(model, optimizer, batch):
    logits = model(batch["input_ids"], batch["position_ids"], batch["seq_idx"])
    loss = lm_loss(logits, batch["labels"])[0] + model.router_loss()
    loss.backward()
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    norm = clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return full(logits), loss.detach(), norm, grads


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ep") / "init"
    model = build_model(MODEL, device="meta")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))  # single process, no process group
    optimizer = build_optimizer(model, OPTIM)
    batches = make_batches(STEPS)
    ref = {"ckpt": str(ckpt), "batches": batches, "losses": [], "norms": [],
           "init": {k: v.clone() for k, v in model.state_dict().items()}}
    for i in range(STEPS):
        logits, loss, norm, grads = step(model, optimizer, batches[i])
        if i == 0:
            ref.update(logits=logits, grads=grads)
        ref["losses"].append(loss.item())
        ref["norms"].append(norm)
    ref["trained"] = {k: v.clone() for k, v in model.state_dict().items()}
    return ref


def run_ep(rank: int, world: int, fields: dict, ref_ckpt: str, batches: list, save_to: str | None) -> dict:
    env = init_distributed(ParallelConfig(**fields), "cpu")
    model = build_model(MODEL, device="meta")
    parallelize(model, env)
    model.to_empty(device="cpu")
    torch.manual_seed(1)  # not the reference's seed: the weights must come from the checkpoint
    with full_tensor_init():
        model.init_weights()
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=ref_ckpt)  # saved by a single process, loaded expert-sharded
    set_model_state_dict(model, state["model"])
    experts = model.layers["1"].mlp.experts
    out = {"loaded": {k: full(v) for k, v in model.state_dict().items()},
           "local_experts": experts.gate_up_proj.to_local().shape[0] if isinstance(experts.gate_up_proj, DTensor)
           else None, "dp_rank": env.dp_rank, "losses": [], "norms": []}
    optimizer = build_optimizer(model, OPTIM)
    per = ROWS // env.dp_size
    for i in range(STEPS):
        batch = {k: v[env.dp_rank * per:(env.dp_rank + 1) * per] for k, v in batches[i].items()}
        logits, loss, norm, grads = step(model, optimizer, batch)
        if i == 0:
            out.update(logits=logits, grads=grads)
        out["losses"].append(all_reduce_mean(loss).item())
        out["norms"].append(norm)
    out["final"] = {k: full(v) for k, v in model.state_dict().items()}
    if save_to:
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=save_to)
    return out


def check(results: list[dict], ref: dict, what: str) -> None:
    for got in results:
        per, dp = ROWS // len(results), got["dp_rank"]
        torch.testing.assert_close(got["logits"], ref["logits"][dp * per:(dp + 1) * per], rtol=RTOL,
                                   atol=RTOL * float(ref["logits"].abs().max()), msg=f"{what}: logits")
        for n, w in ref["init"].items():
            assert torch.equal(got["loaded"][n], w), f"{what}: {n} loaded from the single-process checkpoint"
    got = results[0]
    assert got["local_experts"] == MODEL.moe_n_experts // len(results)  # split over EP, then over FSDP
    for n, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][n], g, rtol=RTOL, atol=RTOL * float(g.abs().max()),
                                   msg=f"{what}: gradient of {n}")
    torch.testing.assert_close(got["norms"], ref["norms"], rtol=RTOL, atol=0, msg=f"{what}: grad norms")
    torch.testing.assert_close(got["losses"], ref["losses"], rtol=RTOL, atol=0, msg=f"{what}: losses")
    for n, w in ref["trained"].items():
        torch.testing.assert_close(got["final"][n], w, rtol=RTOL, atol=STEP_ATOL,
                                   msg=f"{what}: {n} after {STEPS} steps")


def test_ep2_matches_single_process_and_its_checkpoint_loads_in_one_process(reference, tmp_path):
    saved = str(tmp_path / "ep2")
    results = run_distributed(run_ep, 2, dict(dp_shard=2, ep=2), reference["ckpt"], reference["batches"], saved)
    check(results, reference, "EP 2")
    model = build_model(MODEL)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=saved)  # EP 2 -> EP 1
    for n in EXPERTS:
        torch.testing.assert_close(state["model"][n], results[0]["final"][n], rtol=0, atol=0, msg=n)
    for n, w in results[0]["final"].items():
        assert torch.equal(state["model"][n], w), n


def test_ep2_x_fsdp2_matches_single_process(reference):
    results = run_distributed(run_ep, 4, dict(dp_shard=4, ep=2), reference["ckpt"], reference["batches"], None)
    check(results, reference, "EP 2 x FSDP 2")


@pytest.mark.parametrize("fields, world, model, words", [
    (dict(dp_shard=2, ep=3), 2, MODEL, "parallel.ep=3 must divide parallel.dp_shard=2"),
    (dict(dp_shard=4, ep=4), 4, ModelConfig(**{**vars(MODEL), "moe_n_experts": 6}),
     "parallel.ep=4 does not divide model.moe_n_experts=6"),
    (dict(dp_shard=2, ep=2), 2, ModelConfig(**{**vars(MODEL), "moe_n_experts": 0, "moe_layer_indices": None}),
     "needs an MoE model"),
    (dict(dp_shard=1, tp=2), 2, MODEL, "parallel.tp=2 with model.moe_n_experts=4"),
    (dict(dp_shard=1, tp=2, ep=2), 2, MODEL, "parallel.ep=2 with parallel.tp=2"),
])
def test_bad_expert_parallel_layouts_name_the_fields(fields, world, model, words):
    cfg = ParallelConfig(**fields)
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        cfg.resolve(world)
        cfg.check_model(model)


@pytest.mark.slow
def test_torchrun_expert_parallel_losses_match_fsdp(tmp_path):
    """`torchrun --nproc_per_node=2 train.py model=jamba_mamba2_tiny parallel.ep=2` logs the losses,
    gradient norms and expert loads of the same job under FSDP 2 without EP (both data-parallel over
    the same batches, so their load-balancing losses are the same per-rank losses)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    args = ["model=jamba_mamba2_tiny", "train.seq_len=64", "train.micro_batch_size=2", "train.max_steps=3",
            "train.max_tokens=0", "logging.log_every=1", "logging.progress=false"]
    metrics = {}
    for ep in (1, 2):
        run = tmp_path / f"ep{ep}"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "train.py", *args, f"parallel.ep={ep}", f"run.dir={run}"], cwd=repo,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics[ep] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "grad_norm", "moe_aux_loss", "moe_load_max"):
        assert [r[key] for r in metrics[2]] == pytest.approx([r[key] for r in metrics[1]], rel=RTOL), key
