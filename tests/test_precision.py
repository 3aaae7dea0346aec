"""bf16 weight copies (hybrid_train/train/precision.py): which parameters get one, the swap around forward
and backward, gradient folding, and where the trainer turns them on. Training with them against plain
autocast (the same losses, gradients and weights) runs in tests/kernels_interp_cases.py, through the
Triton AdamW that writes them."""

import pytest
import torch

from hybrid_train.model import ModelConfig, build_model
from hybrid_train.parallel import grad_norm
from hybrid_train.train.precision import WeightCopies

CFG = dict(name="t", vocab_size=61, d_model=32, n_layers=2, attn_layer_indices=[1], mlp_hidden=48, n_heads=2,
           n_kv_heads=1, head_dim=16, ssm_d_state=16, ssm_head_dim=16, ssm_n_groups=2, ssm_chunk_size=16)


def test_copies_are_the_rounded_linear_weights_and_swap_only_inside():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**CFG).validate())
    copies = WeightCopies(model)
    head = model.lm_head.weight
    assert head in copies.copies and model.embed.weight not in copies.copies
    assert model.layers["0"].mixer.A_log not in copies.copies and model.norm.weight not in copies.copies
    assert model.layers["0"].mixer.conv1d["x"].weight not in copies.copies
    assert torch.equal(copies.copies[head], head.detach().to(torch.bfloat16))
    with copies.in_use():
        assert model.lm_head.weight is copies.copies[head] and model.lm_head.weight.dtype == torch.bfloat16
        assert model.embed.weight.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model(torch.randint(0, 61, (1, 16)), labels=torch.randint(0, 61, (1, 16)))
        loss.backward()
    assert model.lm_head.weight is head  # the masters are back: state dict, checkpoints, export see fp32
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    assert head.grad is None and copies.copies[head].grad.dtype == torch.bfloat16
    holders = copies.grad_holders(model.parameters())
    assert sum(h is copies.copies.get(p) for h, p in zip(holders, model.parameters())) == len(copies.copies)
    # the norm over bf16 gradients is summed in fp32: the fp32 gradients' norm, not a bf16-rounded one
    expected = torch.linalg.vector_norm(torch.stack([h.grad.float().norm() for h in holders]))
    torch.testing.assert_close(grad_norm(holders), expected, rtol=1e-6, atol=0)
    first = {p: c.grad.clone() for p, c in copies.copies.items()}
    copies.fold_grads()
    assert all(c.grad is None for c in copies.copies.values())
    assert all(p.grad.dtype == torch.float32 and torch.equal(p.grad, g.float()) for p, g in first.items())


def test_tied_embedding_and_head_stay_fp32():
    """A head tied to the embedding is used by the embedding lookup too, which autocast leaves in fp32."""
    model = build_model(ModelConfig(**CFG, tie_embeddings=True).validate())
    copies = WeightCopies(model)
    assert model.lm_head.weight is model.embed.weight and model.embed.weight not in copies.copies
    with copies.in_use():
        assert model.lm_head.weight is model.embed.weight


def test_trainer_turns_copies_on_only_where_they_apply(compose, tmp_path):
    from hybrid_train.train.optim import build_optimizer
    from hybrid_train.train.precision import weight_copies_for

    job = compose(["model=tiny", f"run.dir={tmp_path}", "train.max_steps=1"])
    model = build_model(job.model)
    fused = build_optimizer(model, job.optim)  # CPU: torch's fused AdamW
    assert not weight_copies_for(job, model, fused, 1, torch.bfloat16)  # auto: off, no error
    off = weight_copies_for(job, model, fused, 1, None)
    assert not off
    with off.in_use():
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert off.grad_holders(model.parameters()) == list(model.parameters())
    explicit = compose(["model=tiny", f"run.dir={tmp_path}", "train.max_steps=1", "train.bf16_weight_copies=true"])
    with pytest.raises(ValueError, match=r"train.bf16_weight_copies=true: .*optim.impl=auto resolved to torch's"):
        weight_copies_for(explicit, model, fused, 1, torch.bfloat16)
    with pytest.raises(ValueError, match=r"train.bf16_weight_copies=true: .*one process.*world size 8"):
        weight_copies_for(explicit, model, fused, 8, torch.bfloat16)
