"""bf16 weights with split fp32 masters (hybrid_train/train/precision.py): the split's arithmetic against
float64 bit reasoning, which parameters are split, the state dict as fp32, gradient folding, and where the
trainer turns them on. Training with them against plain autocast (the same losses, gradients and weights)
runs in tests/kernels_interp_cases.py, through the Triton AdamW that steps them."""

import pytest
import torch

from hybrid_train.model import ModelConfig, build_model
from hybrid_train.ops.fp32_halves import join_fp32, split_fp32
from hybrid_train.parallel import total_norm
from hybrid_train.train.precision import BF16Weights

CFG = dict(name="t", vocab_size=61, d_model=32, n_layers=2, attn_layer_indices=[1], mlp_hidden=48, n_heads=2,
           n_kv_heads=1, head_dim=16, ssm_d_state=16, ssm_head_dim=16, ssm_n_groups=2, ssm_chunk_size=16)


def _special_and_random_fp32() -> torch.Tensor:
    torch.manual_seed(0)
    magnitudes = torch.logspace(-44, 38, 200_000, dtype=torch.float64)  # subnormals to near the largest fp32
    values = (torch.randn(200_000, dtype=torch.float64) * magnitudes).float()
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.0, -1.0, 3.4028235e38, -3.4028235e38,
                             1e-45, -1e-45, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 2.0 - 2 ** -9, -(1.0 + 3 * 2 ** -8)])
    return torch.cat([values, specials])


def test_split_rounds_as_autocast_and_keeps_the_master():
    """The high half is torch's bf16 cast (round to nearest even), checked in float64 too: no bf16 value is
    nearer, and exact ties go to the even one; join(split(w)) is w bit for bit, but for ties that round down,
    which come back one fp32 ulp toward zero; NaN stays NaN."""
    w = _special_and_random_fp32()
    high, low = split_fp32(w)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16 and high.shape == w.shape
    finite = torch.isfinite(w)
    assert torch.equal(high[finite].view(torch.int16), w[finite].to(torch.bfloat16).view(torch.int16))
    exact, h = w.double()[finite], high.double()[finite]
    in_range = h.abs() < float("inf")  # (the largest fp32 values round to inf: past bf16's range)
    bits = high[finite].view(torch.int16)
    sign, magnitude = bits & -0x8000, bits & 0x7FFF
    nonzero = (magnitude > 0) & in_range
    neighbours = [((magnitude + step) | sign).view(torch.bfloat16).double() for step in (-1, 1)]
    for neighbour in neighbours:  # the bf16 values one ulp either side (in magnitude) are no nearer
        assert torch.all(((exact - h).abs() <= (exact - neighbour).abs())[nonzero])
    assert torch.all(exact[magnitude == 0].abs() <= 2.0 ** -134)  # rounded to zero: at most half the least bf16
    ties = nonzero & (exact != h) & (((exact - h).abs() == (exact - neighbours[0]).abs())
                                     | ((exact - h).abs() == (exact - neighbours[1]).abs()))
    assert ties.sum() >= 3 and torch.all(bits[ties] % 2 == 0)  # the planted ties: to even
    back = join_fp32(high, low).view(torch.int32)
    kept = back == w.view(torch.int32)
    tie_down = torch.zeros_like(kept)
    tie_down[finite] = ties & (h.abs() < exact.abs())
    assert tie_down.sum() >= 2 and torch.all(kept | tie_down)
    assert torch.equal(back[tie_down], w.view(torch.int32)[tie_down] - 1)  # one ulp toward zero, in magnitude
    assert torch.equal(split_fp32(join_fp32(high, low))[0], high)
    nan_high, nan_low = split_fp32(torch.tensor([float("nan"), -float("nan")]))
    assert torch.isnan(nan_high.float()).all() and torch.isnan(join_fp32(nan_high, nan_low)).all()


def test_split_weights_are_the_linear_layers_in_bf16_and_the_state_dict_stays_fp32():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**CFG).validate())
    masters = {k: v.clone() for k, v in model.state_dict().items()}
    head = model.lm_head.weight
    weights = BF16Weights(model)
    assert model.lm_head.weight is head and head.dtype == torch.bfloat16 and head in weights.low  # in place
    assert model.embed.weight.dtype == torch.float32 and model.embed.weight not in weights.low
    assert model.layers["0"].mixer.A_log not in weights.low and model.norm.weight not in weights.low
    assert model.layers["0"].mixer.conv1d["x"].weight.dtype == torch.float32
    assert torch.equal(head, split_fp32(masters["lm_head.weight"])[0])
    state = model.state_dict()  # the fp32 masters: checkpoints, export and merges see an fp32 model
    assert state.keys() == masters.keys()
    split_names = {n for n, p in model.named_parameters() if p in weights.low}
    kept = {k: join_fp32(*split_fp32(v)) if k in split_names else v for k, v in masters.items()}
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], v) for k, v in kept.items())
    assert sum(int((kept[k] != v).sum()) for k, v in masters.items()) <= 2  # ties that round down, if any
    assert model.layers["1"].state_dict()["mixer.q_proj.weight"].dtype == torch.float32  # any module's own
    # loading fp32 values writes both halves
    shifted = {k: v + 1e-4 for k, v in masters.items()}
    model.load_state_dict(shifted)
    assert all(torch.equal(model.state_dict()[k], join_fp32(*split_fp32(v)) if k in split_names else v)
               for k, v in shifted.items())
    assert torch.equal(head, split_fp32(shifted["lm_head.weight"])[0])

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(torch.randint(0, 61, (1, 16)), labels=torch.randint(0, 61, (1, 16)))
    loss.backward()
    assert head.grad.dtype == torch.bfloat16 and model.embed.weight.grad.dtype == torch.float32
    grads = weights.grads(model.parameters())
    assert len(grads) == sum(1 for p in model.parameters() if p.grad is not None)
    # the norm over bf16 gradients is summed in fp32: the fp32 gradients' norm, not a bf16-rounded one
    expected = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])).float()
    torch.testing.assert_close(total_norm(grads), expected, rtol=1e-6, atol=0)
    first = {p: p.grad.clone() for p in weights.low}
    weights.fold_grads()
    assert all(p.grad is None for p in weights.low)
    assert all(weights.grad(p).dtype == torch.float32 and torch.equal(weights.grad(p), g.float())
               for p, g in first.items())
    weights.zero_grad()
    assert all(weights.grad(p) is None for p in weights.low)


def test_tied_embedding_and_head_stay_fp32():
    """A head tied to the embedding is used by the embedding lookup too, which autocast leaves in fp32."""
    model = build_model(ModelConfig(**CFG, tie_embeddings=True).validate())
    weights = BF16Weights(model)
    assert model.lm_head.weight is model.embed.weight and model.embed.weight.dtype == torch.float32
    assert model.embed.weight not in weights.low and weights


def test_trainer_turns_them_on_only_where_they_apply(compose, tmp_path):
    from hybrid_train.train.optim import build_optimizer
    from hybrid_train.train.precision import bf16_weights_for

    job = compose(["model=tiny", f"run.dir={tmp_path}", "train.max_steps=1"])
    model = build_model(job.model)
    fused = build_optimizer(model, job.optim)  # CPU: torch's fused AdamW
    assert not bf16_weights_for(job, model, fused, 1, torch.bfloat16)  # auto: off, no error
    off = bf16_weights_for(job, model, fused, 1, None)
    assert not off and all(p.dtype == torch.float32 for p in model.parameters())
    explicit = compose(["model=tiny", f"run.dir={tmp_path}", "train.max_steps=1", "train.bf16_weights=true"])
    with pytest.raises(ValueError, match=r"train.bf16_weights=true: .*optim.impl=auto resolved to torch's"):
        bf16_weights_for(explicit, model, fused, 1, torch.bfloat16)
    with pytest.raises(ValueError, match=r"train.bf16_weights=true: .*one process.*world size 8"):
        bf16_weights_for(explicit, model, fused, 8, torch.bfloat16)
    with pytest.raises(TypeError, match="Triton AdamW"):
        BF16Weights(model).attach(fused)


def test_unsplit_restores_the_fp32_model_and_misuse_is_refused():
    """unsplit() puts the fp32 masters back (the state dict's values) and drops the hooks; a split model
    converted in place, loaded with assign=True, or a gradient left unfolded after folded ones, are refused
    with errors that say what to do instead of losing the masters or a micro-batch."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**CFG).validate())
    weights = BF16Weights(model)
    masters = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"load_state_dict\(assign=True\) would replace the split bf16 weight"):
        model.load_state_dict(masters, assign=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 61, (1, 16)), labels=torch.randint(0, 61, (1, 16)))[0].backward()
    weights.fold_grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 61, (1, 16)), labels=torch.randint(0, 61, (1, 16)))[0].backward()
    with pytest.raises(RuntimeError, match=r"fold_grads\(\) after every micro-batch, the last one too"):
        weights.grads(model.parameters())
    head = model.lm_head.weight
    weights.unsplit()
    assert not weights and head.dtype == torch.float32 and model.lm_head.weight is head
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(v, masters[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p, masters[n]) for n, p in model.named_parameters())
    converted = build_model(ModelConfig(**CFG).validate())
    BF16Weights(converted)
    converted.float()  # in place, while split: the low halves no longer belong to these values
    with pytest.raises(RuntimeError, match=r"became torch.float32 .*after BF16Weights.unsplit\(\)"):
        converted.state_dict()
