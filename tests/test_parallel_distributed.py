"""Every parallel layout against the single-process model, in real gloo process groups on CPU.

The parent process computes the reference with the plain model: initial weights, logits and
gradients of one batch, then losses, gradient norms and weights over optimizer steps with clipping.
The layouts run in processes spawned once per world size (a module fixture runs them all in turn),
each from the same full state dict, on its data-parallel share of the same batches; the tests
compare what they return. fp32 throughout: agreement to rtol 1e-5 (summation order differs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from distributed import run_distributed
from hybrid_train.model import ModelConfig, build_model
from hybrid_train.parallel import (ParallelConfig, all_reduce_mean, full_tensor_init, grad_norm, init_distributed,
                                   loss_context, parallelize, sum_over_data_parallel)
from hybrid_train.train.config import OptimConfig
from hybrid_train.train.loss import lm_loss
from hybrid_train.train.optim import build_optimizer, clip_and_step

# Attention (4 query / 2 KV heads), Mamba-2 with 4 heads in 2 groups (GVA), SwiGLU in every block.
MODEL = ModelConfig(name="ptiny", vocab_size=96, d_model=32, n_layers=3, layer_pattern="MAM", n_heads=4, n_kv_heads=2,
                    head_dim=8, mlp_hidden=64, ssm_d_state=8, ssm_head_dim=16, ssm_n_groups=2, ssm_chunk_size=8)
ROWS, SEQ, STEPS = 4, 16, 3  # 4 rows: one per data-parallel rank at dp=4; chunk 8 < 16 so states cross chunks
OPTIM = OptimConfig(lr=1e-2)
CLIP = 0.05  # below the gradient norms of these steps: clipping is active and needs the true global norm
RTOL = 1e-5
# Weights after optimizer steps: Adam divides by sqrt(v), so a gradient element that is tiny (rounding
# noise at 1e-5 relative) still moves its weight by up to lr per step. Agreement to 0.1% of one step
# size bounds that; losses, norms, logits and gradients are held to RTOL.
STEP_ATOL = 1e-3 * OPTIM.lr

# name -> ParallelConfig fields (anything not given keeps its default).
LAYOUTS_2 = {
    "tp2": dict(tp=2, sequence_parallel=False),
    "tp2_sp": dict(tp=2),
    "tp2_sp_loss_parallel": dict(tp=2, loss_parallel=True),
    "tp2_sp_ac_full": dict(tp=2, activation_checkpoint="full"),
    "tp2_sp_ac_every2": dict(tp=2, activation_checkpoint="selective", ac_every_n_blocks=2),
    "tp2_sp_ac_per_op": dict(tp=2, activation_checkpoint="selective"),
    "fsdp2": dict(dp_shard=2),
    "fsdp2_keep_gathered": dict(dp_shard=2, reshard_after_forward=False),
    "fsdp2_fused_loss": dict(dp_shard=2),
}
LAYOUTS_4 = {
    "fsdp2_tp2": dict(dp_shard=2, tp=2),
    "hsdp2x2": dict(dp_replicate=2, dp_shard=2),
    "fsdp4_from_fsdp2_tp2": dict(dp_shard=4),
    "fsdp2_tp2_ac_compile": dict(dp_shard=2, tp=2, activation_checkpoint="selective", compile=True,
                                 compile_backend="aot_eager"),
}
SAVES, LOADS = "fsdp2_tp2", "fsdp4_from_fsdp2_tp2"
# Layouts trained through the head's fused loss (labels into the model, as the trainer's default):
# under FSDP the head's weight is gathered only inside its forward, where that loss runs.
FUSED_LOSS = {"fsdp2_fused_loss"}


def make_batches(n: int) -> list[dict[str, torch.Tensor]]:
    """n batches of ROWS rows, each row two packed documents (seq_idx 0 then 1, positions restart)."""
    gen = torch.Generator().manual_seed(123)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, MODEL.vocab_size, (ROWS, SEQ + 1), generator=gen)
        cut = torch.randint(3, SEQ - 3, (ROWS, 1), generator=gen)
        t = torch.arange(SEQ).expand(ROWS, SEQ)
        seq_idx = (t >= cut).int()
        position_ids = torch.where(t >= cut, t - cut, t)
        batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": position_ids,
                        "seq_idx": seq_idx})
    return batches


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: full(v) for k, v in model.state_dict().items()}


def step(model, optimizer, batch, env, want_grads=False,
         fused=False) -> tuple[torch.Tensor | None, torch.Tensor, float, dict]:
    """One optimizer step. Returns (logits, or None with the fused loss; local loss; global grad norm
    before clipping; full grads)."""
    inputs = (batch["input_ids"], batch["position_ids"], batch["seq_idx"])
    if fused:
        logits = None
        loss, _ = model(*inputs, labels=batch["labels"])
        loss.backward()
    else:
        with loss_context(env):
            logits = model(*inputs)
            loss, _ = lm_loss(logits, batch["labels"])
            loss.backward()
    grads = {n: full(p.grad) for n, p in model.named_parameters()} if want_grads else {}
    # The trainer's step: the clip and the non-finite skip ride the fused AdamW on DTensor shards.
    norm = grad_norm(model.parameters())
    assert clip_and_step(optimizer, norm, CLIP, all_reduce_mean(loss.detach())).item() == 0.0
    optimizer.zero_grad(set_to_none=True)
    return None if logits is None else full(logits), full(loss), norm.item(), grads


# ---- the reference: the plain model in this process ---------------------------------------------
@pytest.fixture(scope="module")
def reference():
    model = build_model(MODEL, device="meta")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    init = full_state(model)
    optimizer = build_optimizer(model, OPTIM)
    batches = make_batches(STEPS + 1)
    ref = {"init": init, "batches": batches, "losses": [], "norms": []}
    for i in range(STEPS + 1):
        logits = model(batches[i]["input_ids"], batches[i]["position_ids"], batches[i]["seq_idx"])
        loss = F.cross_entropy(logits.flatten(0, 1), batches[i]["labels"].flatten())
        loss.backward()
        if i == 0:
            ref["logits"] = logits.detach().clone()
            ref["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        ref["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        ref["losses"].append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i == STEPS - 1:
            ref["trained"] = full_state(model)  # what the checkpoint saved after STEPS steps must hold
    ref["continued"] = full_state(model)
    return ref


# ---- what each process runs ---------------------------------------------------------------------
def build(cfg: ParallelConfig):
    env = init_distributed(cfg, "cpu")
    model = build_model(MODEL, device="meta")
    parallelize(model, env)
    model.to_empty(device="cpu")
    model.tie_weights()
    torch.manual_seed(0)
    with full_tensor_init():
        model.init_weights()
    return env, model


def rows(env, batch):
    """This data-parallel rank's share of the global batch (TP ranks of one replica share it)."""
    per = ROWS // env.dp_size
    return {k: v[env.dp_rank * per:(env.dp_rank + 1) * per] for k, v in batch.items()}


def comm_counts(env, model) -> dict:
    """Collectives in forward and backward of each kind of TP module, on random inputs."""
    t = SEQ // env.tp_size if env.cfg.sequence_parallel else SEQ
    pos = torch.arange(SEQ).expand(2, SEQ)
    out = {}
    for name, block, part in (("mamba", "0", "mixer"), ("attention", "1", "mixer"), ("mlp", "0", "mlp")):
        module = getattr(model.layers[block], part)
        norm = getattr(model.layers[block], f"{part}_norm")
        x = torch.randn(2, t, MODEL.d_model, requires_grad=True)
        with CommDebugMode() as fwd:
            y = module(norm(x), pos, None) if part == "mixer" else module(norm(x))
        with CommDebugMode() as bwd:
            y.sum().backward()
        out[name] = [{str(k): v for k, v in c.get_comm_counts().items()} for c in (fwd, bwd)]
    model.zero_grad(set_to_none=True)
    return out


def run_layout(name: str, fields: dict, init: dict, batches: list, ckpt_dir: str) -> dict:
    cfg = ParallelConfig(**fields)
    env, model = build(cfg)
    out = {"dp_rank": env.dp_rank, "dp_size": env.dp_size, "init": full_state(model),
           "dp_sum": sum_over_data_parallel(torch.tensor([env.dp_rank + 1.0], dtype=torch.float64), env.tp_size)}
    if env.tp_size > 1 and name.startswith("tp2"):
        out["comm"] = comm_counts(env, model)
    optimizer = build_optimizer(model, OPTIM)
    if name == LOADS:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        out["loaded"] = full_state(model)
        _, loss, norm, _ = step(model, optimizer, rows(env, batches[STEPS]), env)
        out.update(losses=[all_reduce_mean(loss).item()], norms=[norm], final=full_state(model))
        return out
    # Every layout starts from the reference's weights (rank 0's copy, broadcast).
    # (A copy: set_model_state_dict puts the loaded DTensors into the dict it is given.)
    set_model_state_dict(model, dict(init), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if env.tp_size > 1:
        mixer = model.layers["0"].mixer
        out["local_in_proj"] = {c: mixer.in_proj[c].weight.to_local().detach().clone() for c in mixer.in_proj}
    out.update(losses=[], norms=[])
    for i in range(STEPS):
        logits, loss, norm, grads = step(model, optimizer, rows(env, batches[i]), env, want_grads=i == 0,
                                         fused=name in FUSED_LOSS)
        if i == 0:
            out.update(logits=logits, grads=grads)
        out["losses"].append(all_reduce_mean(loss).item())
        out["norms"].append(norm)
    out["final"] = full_state(model)
    if name == SAVES:
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=ckpt_dir)
    return out


def run_layouts(rank: int, world: int, layouts: dict, init: dict, batches: list, ckpt_dir: str) -> dict:
    return {name: run_layout(name, fields, init, batches, ckpt_dir) for name, fields in layouts.items()}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpt") / "step_3")


@pytest.fixture(scope="module")
def two(reference, ckpt_dir):
    return run_distributed(run_layouts, 2, LAYOUTS_2, reference["init"], reference["batches"], ckpt_dir)


@pytest.fixture(scope="module")
def four(reference, ckpt_dir):
    return run_distributed(run_layouts, 4, LAYOUTS_4, reference["init"], reference["batches"], ckpt_dir)


# ---- comparisons --------------------------------------------------------------------------------
def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float | None = None) -> None:
    """rtol 1e-5 relative to each tensor's scale (an element near zero gets the tensor's absolute slack)."""
    atol = RTOL * float(expected.abs().max()) if atol is None else atol
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol,
                               msg=lambda detail: f"{what}: {detail}")


def check_layout(results: list[dict], name: str, ref: dict) -> None:
    for rank_results in results:
        got = rank_results[name]
        per, dp = ROWS // got["dp_size"], got["dp_rank"]
        if name not in FUSED_LOSS:  # the fused loss never forms the logits
            assert_close(got["logits"], ref["logits"][dp * per:(dp + 1) * per], f"{name}: logits of rank-local rows")
    got = results[0][name]
    for n, g in ref["grads"].items():
        assert_close(got["grads"][n], g, f"{name}: gradient of {n}")
    torch.testing.assert_close(got["norms"], ref["norms"][:STEPS], rtol=RTOL, atol=0, msg=f"{name}: grad norms")
    torch.testing.assert_close(got["losses"], ref["losses"][:STEPS], rtol=RTOL, atol=0, msg=f"{name}: losses")
    for n, w in ref["trained"].items():
        assert_close(got["final"][n], w, f"{name}: {n} after {STEPS} steps", atol=STEP_ATOL)


@pytest.mark.parametrize("name", [n for n in LAYOUTS_2 if "ac_" not in n])
def test_two_rank_layouts_match_single_process(two, reference, name):
    check_layout(two, name, reference)


@pytest.mark.parametrize("name", [n for n in LAYOUTS_4 if n != LOADS])
def test_four_rank_layouts_match_single_process(four, reference, name):
    check_layout(four, name, reference)


@pytest.mark.parametrize("name", ["tp2_sp_ac_full", "tp2_sp_ac_every2", "tp2_sp_ac_per_op"])
def test_activation_checkpointing_gives_identical_gradients(two, name):
    """Recomputation repeats the same ops on the same inputs: bitwise the same gradients and steps."""
    for rank_results in two:
        base, got = rank_results["tp2_sp"], rank_results[name]
        for n, g in base["grads"].items():
            torch.testing.assert_close(got["grads"][n], g, rtol=0, atol=0, msg=f"{name}: gradient of {n}")
        assert got["losses"] == base["losses"]


def test_init_weights_on_sharded_parameters_gives_single_process_values(two, four, reference):
    """init_weights runs on DTensor parameters (normal_, uniform_, copy_ of A_log / dt_bias) and, under
    full_tensor_init, draws exactly the values the single-process model gets from the same seed."""
    for results in (two, four):
        for name, got in results[0].items():
            for n, w in reference["init"].items():
                torch.testing.assert_close(got["init"][n], w, rtol=0, atol=0, msg=f"{name}: initial {n}")


def test_data_parallel_rank_and_size_and_sums(two, four):
    """Data-parallel ranks cover 0..dp_size-1 (TP ranks of a replica share theirs), and a count summed
    over data-parallel ranks counts each replica once."""
    for results in (two, four):
        for name in results[0]:
            ranks = sorted({r[name]["dp_rank"] for r in results})
            dp_size = results[0][name]["dp_size"]
            assert ranks == list(range(dp_size)), name
            assert {float(r[name]["dp_sum"]) for r in results} == {dp_size * (dp_size + 1) / 2}, name


def test_one_collective_per_mixer_and_mlp(two):
    """Non-SP: one all-reduce per mixer/MLP in forward and one in backward (not one per projection).
    SP: one all-gather in front and one reduce-scatter after, in each direction."""
    plain = {"c10d_functional.all_reduce": 1}
    sp = {"c10d_functional.all_gather_into_tensor": 1, "c10d_functional.reduce_scatter_tensor": 1}
    for module in ("mamba", "attention", "mlp"):
        assert two[0]["tp2"]["comm"][module] == [plain, plain], module
        assert two[0]["tp2_sp"]["comm"][module] == [sp, sp], module


def test_tp_ranks_hold_heads_and_groups_not_a_contiguous_split_of_hf_in_proj(two, reference):
    """TP rank r holds the r-th half of each component of HF's packed [z | x | B | C | dt] in_proj: z
    and x by heads, B and C by groups, dt by heads (rank 0 of a contiguous split would hold z and half
    of x; test_parallel.py shows that this computes something else)."""
    init = reference["init"]
    names = ("z", "x", "B", "C", "dt")
    packed = torch.cat([init[f"layers.0.mixer.in_proj.{c}.weight"] for c in names])
    widths = [init[f"layers.0.mixer.in_proj.{c}.weight"].shape[0] for c in names]
    starts = [sum(widths[:i]) for i in range(len(names))]
    for rank in range(2):
        local = two[rank]["tp2"]["local_in_proj"]
        for c, start, width in zip(names, starts, widths):
            half = width // 2
            expected = packed[start + rank * half:start + (rank + 1) * half]
            torch.testing.assert_close(local[c], expected, rtol=0, atol=0, msg=f"rank {rank} in_proj.{c}")
        contiguous = packed.chunk(2)[rank]
        assert not torch.equal(torch.cat([local[c] for c in names]), contiguous)


def test_checkpoint_saved_under_fsdp_tp_loads_under_fsdp4_and_single_process(four, reference, ckpt_dir):
    """DCP reshards: saved under FSDP 2 x TP 2, loaded under FSDP 4 (model and optimizer: the next step
    matches the single-process run) and into the plain model of a single process."""
    got, saved = four[0][LOADS], four[0][SAVES]["final"]
    for n, w in reference["trained"].items():
        torch.testing.assert_close(got["loaded"][n], saved[n], rtol=0, atol=0, msg=f"FSDP 4: loaded {n}")
        assert_close(got["loaded"][n], w, f"FSDP 4: loaded {n} vs single process", atol=STEP_ATOL)
    assert got["losses"] == pytest.approx([reference["losses"][STEPS]], rel=RTOL)
    assert got["norms"] == pytest.approx([reference["norms"][STEPS]], rel=RTOL)
    for n, w in reference["continued"].items():
        assert_close(got["final"][n], w, f"FSDP 4: {n} after a step with the loaded optimizer state", atol=STEP_ATOL)

    model = build_model(MODEL)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=ckpt_dir)  # no process group: a plain single-process load
    for n, w in saved.items():
        torch.testing.assert_close(state["model"][n], w, rtol=0, atol=0, msg=f"single process: loaded {n}")


# ---- end to end through the trainer -------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _train_cli(launcher: list[str], args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_torchrun_tensor_parallel_losses_match_single_process(tmp_path):
    """`torchrun --nproc_per_node=2 train.py parallel.tp=2` (one data-parallel rank: the same batches)
    logs the losses and gradient norms of the single-process run from the same seed. Needs the trainer
    to initialize under `full_tensor_init()` (otherwise CPU ranks draw equal shards) and to clip by the
    global gradient norm (`grad_norm`)."""
    args = ["train.seq_len=64", "train.micro_batch_size=4", "train.max_steps=4", "train.max_tokens=0",
            "logging.log_every=1", "logging.progress=false", "model.ssm_n_groups=2"]
    runs = {"single": [sys.executable], "tp2": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc_per_node=2"]}
    metrics = {}
    for name, launcher in runs.items():
        extra = ["parallel.tp=2"] if name == "tp2" else []
        proc = _train_cli(launcher, [*args, *extra, f"run.dir={tmp_path / name}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        metrics[name] = [json.loads(line) for line in lines]
    single, tp2 = metrics["single"], metrics["tp2"]
    assert [r["step"] for r in tp2] == [r["step"] for r in single] == [1, 2, 3, 4]
    assert [r["loss"] for r in tp2] == pytest.approx([r["loss"] for r in single], rel=RTOL)
    norms = [r["grad_norm"] for r in single]
    assert [r["grad_norm"] for r in tp2] == pytest.approx(norms, rel=RTOL)
    # Both TP ranks read the one replica's batches: counted once.
    assert [r["source_tokens"] for r in tp2] == [r["source_tokens"] for r in single]
