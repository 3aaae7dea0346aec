"""Mixture of experts: the layer against a dense per-token reference (float64), the grouped GEMM against
the loop over experts, the router losses on hand-computed cases and against transformers, the layout
knobs and the config errors, and the router losses inside the model's loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybrid_train.model import ModelConfig, active_params, build_model, count_params, flops_per_token
from hybrid_train.model.moe import MoE, grouped_mm_supported, router_stats
from hybrid_train.train.loss import lm_loss


def moe_cfg(**overrides) -> ModelConfig:
    base = dict(name="moe", vocab_size=97, d_model=32, n_layers=4, attn_layer_indices=[1], mlp_hidden=48,
                n_heads=4, n_kv_heads=2, head_dim=8, ssm_d_state=8, ssm_head_dim=16, ssm_n_groups=2,
                ssm_chunk_size=8, moe_n_experts=6, moe_top_k=2, moe_hidden=24, moe_every=2, moe_offset=1)
    base.update(overrides)
    return ModelConfig(**base).validate()


def build_moe(cfg: ModelConfig, seed: int = 0, dtype=torch.float64) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg)
    moe.init_weights(0.3, 0.3)  # scores far from ties, outputs of order 1
    return moe.to(dtype)


def dense_reference(moe: MoE, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Each token on its own: scores of all experts, its top-k, each chosen expert's SwiGLU, weighted."""
    out = torch.zeros_like(x)
    gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
    for t in range(x.shape[0]):
        logits = moe.router.weight @ x[t]
        scores = logits.softmax(-1) if cfg.moe_score == "softmax" else logits.sigmoid()
        chosen = sorted(range(cfg.moe_n_experts), key=lambda e: -float(scores[e]))[:cfg.moe_top_k]
        weights = torch.stack([scores[e] for e in chosen])
        if cfg.moe_norm_topk:
            weights = weights / weights.sum()
        for w, e in zip(weights, chosen):
            h = gate_up[e] @ x[t]
            gate, up = h[:cfg.expert_hidden], h[cfg.expert_hidden:]
            out[t] += w * (down[e] @ (F.silu(gate) * up))
        if moe.shared_expert is not None:
            s = moe.shared_expert
            out[t] += s.down_proj.weight @ (F.silu(s.gate_proj.weight @ x[t]) * (s.up_proj.weight @ x[t]))
    return out


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(moe_shared_hidden=40, moe_norm_topk=False),
    dict(moe_score="sigmoid", moe_top_k=3),
    dict(moe_top_k=1, moe_n_experts=4),
])
def test_moe_matches_dense_per_token_reference_float64(overrides):
    cfg = moe_cfg(**overrides)
    moe = build_moe(cfg)
    x = torch.randn(2, 9, cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        got = moe(x)
        ref = dense_reference(moe, x.view(-1, cfg.d_model), cfg).view_as(x)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    counts = moe.stats["counts"]
    assert counts.sum() == 18 * cfg.moe_top_k and counts.shape == (cfg.moe_n_experts,)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch build has no torch._grouped_mm")
@pytest.mark.parametrize("shared, tokens", [(0, 3), (16, 40)])
def test_grouped_gemm_path_equals_loop_over_experts(shared, tokens):
    """The same sorted tokens through torch._grouped_mm and through one matmul per expert: outputs and
    every gradient agree (fp32; some experts get no token)."""
    cfg = moe_cfg(moe_n_experts=8, moe_top_k=2, moe_shared_hidden=shared)
    results = {}
    for impl in ("grouped", "loop"):
        moe = build_moe(cfg, dtype=torch.float32)
        moe.experts.impl = impl
        # 3 tokens x 2 slots on 8 experts: at least two experts get no token.
        x = torch.randn(1, tokens, cfg.d_model, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = moe(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[impl] = (y, x.grad, {n: p.grad for n, p in moe.named_parameters()}, moe.stats["counts"])
    (yg, xg, pg, cg), (yl, xl, pl, cl) = results["grouped"], results["loop"]
    assert torch.equal(cg, cl) and (tokens > 4 or (cg == 0).sum() >= 2)
    assert grouped_mm_supported(torch.zeros(1, cfg.d_model), moe.experts.gate_up_proj, moe.experts.down_proj)
    torch.testing.assert_close(yg, yl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xg, xl, rtol=1e-5, atol=1e-6)
    for name in pl:
        torch.testing.assert_close(pg[name], pl[name], rtol=1e-5, atol=1e-6, msg=name)


def test_auto_falls_back_to_the_loop_where_grouped_mm_cannot_run():
    f64 = torch.float64
    assert not grouped_mm_supported(torch.zeros(2, 32, dtype=f64), torch.zeros(2, 48, 32, dtype=f64))
    assert not grouped_mm_supported(torch.zeros(2, 30), torch.zeros(2, 48, 30))  # 120-byte rows
    moe = build_moe(moe_cfg(moe_impl="grouped"))  # float64
    with pytest.raises(RuntimeError, match="model.moe_impl=grouped"):
        moe(torch.randn(4, 32, dtype=torch.float64))


def test_router_losses_on_hand_computed_cases():
    """Two experts, top-1, logits given directly. Both tokens on expert 0 with probabilities (3/4, 1/4):
    f = (1, 0), P = (3/4, 1/4), aux = 2 * 3/4 = 1.5. One token on each: aux = 2 * (1/2 * 1/2 * 2) = 1,
    the balanced value (top_k). z = mean(logsumexp^2) = ln(4)^2 in both."""
    l3 = math.log(3.0)
    skewed = torch.tensor([[l3, 0.0], [l3, 0.0]])
    stats = router_stats(skewed, torch.tensor([2, 0]), "softmax")
    assert stats["aux"].item() == pytest.approx(1.5, rel=1e-6)
    assert stats["z"].item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)
    balanced = torch.tensor([[l3, 0.0], [0.0, l3]])
    stats = router_stats(balanced, torch.tensor([1, 1]), "softmax")
    assert stats["aux"].item() == pytest.approx(1.0, rel=1e-6)
    # sigmoid scores: P is the normalized sigmoid. sigmoid(l3) = 3/4, sigmoid(0) = 1/2 -> P = (3/5, 2/5).
    stats = router_stats(skewed, torch.tensor([2, 0]), "sigmoid")
    assert stats["aux"].item() == pytest.approx(2 * 0.6, rel=1e-6)


def test_load_balancing_loss_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = moe_cfg(moe_n_experts=8, moe_top_k=2)
    moe = build_moe(cfg, dtype=torch.float32)
    x = torch.randn(40, cfg.d_model)
    moe(x)
    logits = moe.router(x).float()
    theirs = load_balancing_loss_func((logits,), cfg.moe_n_experts, cfg.moe_top_k)
    torch.testing.assert_close(moe.stats["aux"], theirs.float(), rtol=1e-6, atol=0)
    assert transformers  # imported for the reference


def test_layout_knobs_place_moe_blocks_with_stable_names():
    assert moe_cfg().moe_layers == [1, 3]  # Jamba's rule: every 2nd block from 1
    assert moe_cfg(moe_every=1, moe_offset=0).moe_layers == [0, 1, 2, 3]  # Granite: every block
    cfg = moe_cfg(moe_layer_indices=[0, 2])
    assert cfg.moe_layers == [0, 2]
    names = set(build_model(cfg, device="meta").state_dict())
    assert {"layers.0.mlp.router.weight", "layers.0.mlp.experts.gate_up_proj", "layers.2.mlp.experts.down_proj",
            "layers.1.mlp.gate_proj.weight"} <= names
    assert "layers.1.mlp.router.weight" not in names and "layers.0.mlp.shared_expert.gate_proj.weight" not in names
    with_shared = set(build_model(moe_cfg(moe_shared_hidden=16), device="meta").state_dict())
    assert "layers.1.mlp.shared_expert.up_proj.weight" in with_shared


@pytest.mark.parametrize("overrides, message", [
    (dict(moe_top_k=7), "model.moe_top_k=7 must be in 1..model.moe_n_experts=6"),
    (dict(moe_top_k=0), "model.moe_top_k=0"),
    (dict(moe_layer_indices=[1, 4]), "model.moe_layer_indices has 4, outside 0..n_layers-1=3"),
    (dict(moe_layer_indices=[1, 1]), "repeats an index"),
    (dict(moe_every=2, moe_offset=2), "model.moe_every=2 and model.moe_offset=2"),
    (dict(moe_score="relu"), "model.moe_score='relu'"),
    (dict(moe_impl="triton"), "model.moe_impl='triton'"),
    (dict(moe_hidden=0, mlp_hidden=0), "both are 0"),
    (dict(moe_aux_loss_coef=-1.0), "model.moe_aux_loss_coef=-1.0"),
    (dict(moe_n_experts=0, moe_layer_indices=[1]), "needs model.moe_n_experts > 0"),
    (dict(n_layers=1, attn_layer_indices=[0], moe_every=2, moe_offset=1), "no block is an MoE block"),
])
def test_bad_moe_config_names_the_fields(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        moe_cfg(**overrides)


def test_model_loss_includes_router_losses_and_trains_the_router():
    cfg = moe_cfg(moe_aux_loss_coef=0.1, moe_z_loss_coef=0.01)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids, labels = torch.randint(0, 97, (2, 2, 13))
    loss, ce = model(ids, labels=labels)
    router = model.router_loss()
    stats = model.router_stats()
    assert stats["counts"].shape == (2, 6) and (stats["counts"].sum(1) == 2 * 13 * 2).all()
    model(ids)  # the load sums forwards until reset
    assert torch.equal(model.router_stats(reset=True)["load"], 2 * stats["counts"])
    model(ids)
    assert torch.equal(model.router_stats()["load"], stats["counts"])
    expected = 0.1 * stats["aux"].mean() + 0.01 * stats["z"].mean()
    torch.testing.assert_close(router.detach(), expected, rtol=1e-6, atol=0)
    ref_loss, ref_ce = lm_loss(model(ids), labels)
    torch.testing.assert_close(loss, ref_loss + model.router_loss(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-6, atol=0)
    # The router losses alone reach the router weights.
    model.zero_grad(set_to_none=True)
    model(ids)
    model.router_loss().backward()
    assert model.layers["1"].mlp.router.weight.grad.abs().sum() > 0


def test_active_parameters_and_flops_count_top_k_experts():
    cfg = moe_cfg(moe_shared_hidden=16)
    model = build_model(cfg, device="meta")
    total, embedding = count_params(model)
    expert = 3 * cfg.d_model * cfg.moe_hidden
    assert active_params(cfg, total) == total - 2 * (6 - 2) * expert
    dense = moe_cfg(moe_n_experts=0)
    assert active_params(dense, 1000) == 1000
    f_moe = flops_per_token(cfg, total, embedding, 16)
    f_all = flops_per_token(ModelConfig(**{**vars(cfg), "moe_top_k": 6}), total, embedding, 16)
    assert f_all - f_moe == 6 * 2 * 4 * expert


@pytest.mark.parametrize("name, total, active, layout, moe_layers", [
    ("jamba_52b", 51_485_722_112, 12_025_710_080, "MMMMAMMM" * 4, list(range(1, 32, 2))),
    ("granite4_h_small", 32_207_337_984, 8_803_121_664, ("M" * 5 + "A" + "M" * 4) * 4, list(range(40))),
])
def test_large_moe_configs_parameter_counts_on_meta(compose, name, total, active, layout, moe_layers):
    """Jamba-v0.1's layout and sizes with Mamba-2 mixers (Jamba itself: 52B total, 12B active with
    Mamba-1 mixers); Granite-4.0-H-Small's sizes (32.2B total, 9B active as IBM states it)."""
    job = compose([f"model={name}"])
    model = build_model(job.model, device="meta")
    n, _ = count_params(model)
    assert (n, active_params(job.model, n)) == (total, active)
    assert "".join(job.model.layer_types) == layout and job.model.moe_layers == moe_layers
    expert = model.layers[str(moe_layers[0])].mlp.experts
    assert expert.gate_up_proj.shape == (job.model.moe_n_experts, 2 * job.model.expert_hidden, job.model.d_model)


def test_training_logs_expert_load_and_router_losses(tmp_path):
    """Two steps of the trainer on the Jamba-layout tiny config: metrics.jsonl carries the per-block
    expert load (max/mean over the steps since the last line) and the router losses; both loss paths
    (fused head and logits) train."""
    import json

    from conftest import compose_job
    from hybrid_train.train.trainer import train

    small = ["model=jamba_mamba2_tiny", "train.max_tokens=0", "train.max_steps=2", "train.seq_len=32",
             "train.micro_batch_size=2", "logging.progress=false", "logging.log_every=1"]
    for impl in ("fused", "logits"):
        run = tmp_path / impl
        train(compose_job(small + [f"run.dir={run}", f"train.loss_impl={impl}"]))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2]
        for r in records:
            assert sorted(r["moe_load"]) == ["1", "3", "5", "7"]
            assert all(1.0 <= v <= 16.0 for v in r["moe_load"].values())
            assert r["moe_load_max"] == max(r["moe_load"].values())
            assert r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_of_moe_blocks_gives_identical_gradients(mode):
    """The router losses are read from the blocks after forward; under recomputation they still carry
    their gradients, and recomputed routing is the same routing."""
    from hybrid_train.parallel.ac import apply_ac

    cfg = moe_cfg(moe_shared_hidden=16, moe_aux_loss_coef=0.1)
    ids, labels = torch.randint(0, 97, (2, 2, 13), generator=torch.Generator().manual_seed(3))
    grads = []
    for ac in ("none", mode):
        torch.manual_seed(0)
        model = build_model(cfg)
        apply_ac(model, ac)
        loss, _ = model(ids, labels=labels)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)


def test_compiled_moe_blocks_match_eager():
    """torch.compile (aot_eager) of blocks with MoE MLPs: the same loss and gradients as eager."""
    from hybrid_train.parallel.compile import apply_compile

    cfg = moe_cfg(moe_shared_hidden=16)
    ids, labels = torch.randint(0, 97, (2, 2, 13), generator=torch.Generator().manual_seed(4))
    out = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg)
        if compiled:
            apply_compile(model, "aot_eager")
        loss, _ = model(ids, labels=labels)
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=0)
    for name, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_experts_with_no_rows_keep_the_graph(impl):
    """An expert-parallel rank may receive no rows: the output still depends on the weights (zero
    gradients), so every rank runs the same backward collectives."""
    from hybrid_train.model.moe import GroupedExperts

    experts = GroupedExperts(2, 32, 16, impl)
    experts.init_weights(0.1, 0.1)
    x = torch.zeros(0, 32, requires_grad=True)
    y = experts(x, torch.zeros(2, dtype=torch.long))
    assert y.shape == (0, 32) and y.requires_grad
    y.sum().backward()
    assert torch.equal(experts.gate_up_proj.grad, torch.zeros_like(experts.gate_up_proj))
