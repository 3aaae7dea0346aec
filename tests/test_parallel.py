"""Parallel layout config, and single-process checks of the parallel code (multi-process ones are in
test_parallel_distributed.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from hybrid_train.model import ModelConfig, build_model
from hybrid_train.model.hybrid import Mamba2Mixer
from hybrid_train.parallel import ParallelConfig, clip_grad_norm_, init_distributed, parallelize

CONF = Path(__file__).resolve().parents[1] / "conf"
MODEL = ModelConfig(name="ptiny", vocab_size=96, d_model=32, n_layers=3, layer_pattern="MAM", n_heads=4, n_kv_heads=2,
                    head_dim=8, mlp_hidden=64, ssm_d_state=8, ssm_head_dim=16, ssm_n_groups=2, ssm_chunk_size=8)


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, world, sizes", [
    (dict(), 8, (1, 8, 1)),
    (dict(tp=2), 8, (1, 4, 2)),
    (dict(dp_replicate=-1, dp_shard=2, tp=2), 8, (2, 2, 2)),
    (dict(dp_replicate=2, dp_shard=-1), 4, (2, 2, 1)),
    (dict(dp_shard=1, tp=2), 2, (1, 1, 2)),
])
def test_resolve_sizes(fields, world, sizes):
    assert ParallelConfig(**fields).resolve(world) == sizes


@pytest.mark.parametrize("fields, world, message", [
    (dict(tp=3), 8, "not divisible by parallel.dp_replicate=1 x parallel.dp_shard=-1 x parallel.tp=3"),
    (dict(dp_shard=2, tp=2), 8, "parallel.dp_replicate=1 x parallel.dp_shard=2 x parallel.tp=2 = 4 != world size 8"),
    (dict(dp_shard=0), 2, "parallel.dp_shard=0 must be positive or -1"),
    (dict(dp_replicate=-1), 2, "only one of parallel.dp_replicate and parallel.dp_shard may be -1"),
    (dict(tp=0), 2, "parallel.tp=0 must be >= 1"),
    (dict(activation_checkpoint="some"), 1, "parallel.activation_checkpoint='some' must be one of none, full"),
    (dict(ac_every_n_blocks=-1), 1, "parallel.ac_every_n_blocks=-1 must be >= 0"),
    (dict(reduce_dtype="fp8"), 1, "parallel.reduce_dtype='fp8' must be one of float32, bfloat16"),
    (dict(loss_parallel=True), 1, "parallel.loss_parallel=true needs parallel.tp > 1"),
])
def test_bad_layouts_fail_naming_field_and_value(fields, world, message):
    with pytest.raises(ValueError) as info:
        ParallelConfig(**fields).resolve(world)
    assert message in str(info.value)


def test_tp_must_divide_every_split_count():
    cfg = ParallelConfig(tp=4)
    with pytest.raises(ValueError) as info:
        cfg.check_model(MODEL)
    # 4 query heads and 4 Mamba-2 heads split; 2 KV heads and 2 groups do not.
    assert str(info.value) == "parallel.tp=4 must divide model.n_kv_heads=2, model.ssm_n_groups=2"
    ParallelConfig(tp=2).check_model(MODEL)
    with pytest.raises(ValueError, match="train.seq_len=15 is not divisible by parallel.tp=2"):
        ParallelConfig(tp=2).check_model(MODEL, seq_len=15)
    ParallelConfig(tp=2, sequence_parallel=False).check_model(MODEL, seq_len=15)
    # Bamba-9B has one Mamba-2 group: TP would split the gated norm's only group.
    bamba = dataclasses.replace(MODEL, ssm_n_groups=1)
    with pytest.raises(ValueError, match="model.ssm_n_groups=1"):
        ParallelConfig(tp=2).check_model(bamba)


def test_single_process_refuses_a_multi_process_layout():
    with pytest.raises(ValueError, match="world size 1 is not divisible"):
        init_distributed(ParallelConfig(tp=2), "cpu", MODEL)


def test_every_shipped_parallel_option_validates(compose):
    for path in sorted((CONF / "parallel").glob("*.yaml")):
        job = compose([f"parallel={path.stem}"])
        job.parallel.validate()
        job.parallel.check_model(dataclasses.replace(MODEL, n_heads=8, n_kv_heads=8, d_model=256, ssm_n_groups=8,
                                                     mlp_hidden=512))


# ---- Mamba-2 tensor-parallel split, simulated in one process ------------------------------------
def _local_mixer(full: Mamba2Mixer, cfg: ModelConfig, tp: int, rank: int, in_proj: dict) -> Mamba2Mixer:
    """The mixer one TP rank runs: local heads/groups, sliced weights (the model infers its local
    counts from shapes; here a config of the local width builds the same module)."""
    local_cfg = dataclasses.replace(cfg, ssm_expand=cfg.ssm_expand // tp, ssm_n_groups=cfg.ssm_n_groups // tp)
    local = Mamba2Mixer(local_cfg)
    state = {f"in_proj.{c}.weight": w for c, w in in_proj.items()}
    for name, tensor in full.state_dict().items():
        if name.startswith("in_proj."):
            continue
        if name == "out_proj.weight":  # row-parallel: this rank's input columns
            state[name] = tensor.chunk(tp, dim=1)[rank]
        else:  # conv channels, A_log, D, dt_bias, norm weight: this rank's heads / groups
            state[name] = tensor.chunk(tp, dim=0)[rank]
    local.load_state_dict(state)
    return local


def test_mamba_tp_split_by_heads_and_groups_matches_and_contiguous_split_does_not():
    """Summing the row-parallel out_proj partials of TP ranks that hold whole heads and groups of each
    in_proj component gives the single-process mixer; a contiguous split of HF's packed
    [z | x | B | C | dt] in_proj (rank 0: z and half of x) computes something else."""
    cfg, tp = dataclasses.replace(MODEL, layer_pattern="M", n_layers=1), 2
    torch.manual_seed(0)
    full = Mamba2Mixer(cfg)
    full.init_weights(0.2, 0.2)
    u = torch.randn(2, 16, cfg.d_model)
    pos = torch.arange(16).expand(2, 16)
    seq_idx = (torch.arange(16) >= 6).int().expand(2, 16)
    with torch.no_grad():
        reference = full(u, pos, seq_idx)

        names = ("z", "x", "B", "C", "dt")
        weights = {c: full.in_proj[c].weight for c in names}
        by_heads = [{c: w.chunk(tp)[r] for c, w in weights.items()} for r in range(tp)]
        packed = torch.cat([weights[c] for c in names])  # HF's in_proj.weight
        widths = [weights[c].shape[0] // tp for c in names]
        contiguous = [dict(zip(names, packed.chunk(tp)[r].split(widths))) for r in range(tp)]

        ours = sum(_local_mixer(full, cfg, tp, r, by_heads[r])(u, pos, seq_idx) for r in range(tp))
        naive = sum(_local_mixer(full, cfg, tp, r, contiguous[r])(u, pos, seq_idx) for r in range(tp))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    # Not a rounding matter: the contiguous split is off by the size of the output itself.
    assert (naive - reference).abs().max() > 0.5 * reference.abs().max()


# ---- single-process pieces ----------------------------------------------------------------------
def _grads(model) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, MODEL.vocab_size, (2, 16))
    model(ids).float().square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("fields", [dict(activation_checkpoint="full"),
                                    dict(activation_checkpoint="selective", ac_every_n_blocks=2),
                                    dict(activation_checkpoint="selective")])
def test_activation_checkpointing_single_process_same_grads_and_names(fields):
    torch.manual_seed(0)
    base = build_model(MODEL)
    model = build_model(MODEL, device="meta")
    parallelize(model, init_distributed(ParallelConfig(**fields), "cpu"))
    model.to_empty(device="cpu")
    model.load_state_dict(base.state_dict())  # same names: no wrapper module
    expected, got = _grads(base), _grads(model)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=0, msg=name)


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a, b = build_model(MODEL), build_model(MODEL)
    b.load_state_dict(a.state_dict())
    _grads(a), _grads(b)
    expected = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.01).item()
    assert clip_grad_norm_(b.parameters(), 0.01) == pytest.approx(expected, rel=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-6, atol=0, msg=name)
