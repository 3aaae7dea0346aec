"""The trainer's optimizer step: clip folded into the fused AdamW, non-finite steps skipped on the device,
the width-scaled default LR; checked against torch's own clip + AdamW step."""

import copy

import pytest
import torch

from hybrid_train.parallel import grad_norm
from hybrid_train.train.config import OptimConfig, default_lr
from hybrid_train.train.optim import build_optimizer, clip_and_step


def _model_and_grads(seed: int, scale: float):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    x = torch.randn(4, 16)
    (model(x).square().sum() * scale).backward()
    return model


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))


@pytest.mark.parametrize("fused", [True, False])
def test_clip_and_step_matches_torch_clip_then_adamw(fused, reference_adamw):
    """Three steps whose gradients are below, far above and again below max_norm: the clip changes the
    moments, so a clip that is ignored or applied twice shows from the second step on (one Adam step
    alone is nearly lr * sign(grad) and cannot tell)."""
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    ours, ref, unclipped = _tiny(), _tiny(), _tiny()
    opt = build_optimizer(ours, cfg)
    for group in opt.param_groups:  # the reference loop, as for parameters the fused kernel cannot take
        group["fused"] = fused or None
        group["foreach"] = None if fused else False
    ref_opt, unclipped_opt = reference_adamw(ref, cfg), reference_adamw(unclipped, cfg)
    for step, scale in enumerate([1e-4, 1e3, 1e-2]):
        x = torch.randn(4, 16)
        for model in (ours, ref, unclipped):
            (model(x).square().sum() * scale).backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        unclipped_opt.step()
        norm = grad_norm(ours.parameters())
        assert clip_and_step(opt, norm, 1.0).item() == 0.0
        assert norm.item() == pytest.approx(expected_norm.item(), rel=1e-6)
        for o in (opt, ref_opt, unclipped_opt):
            o.zero_grad(set_to_none=True)
        for p, q in zip(ours.parameters(), ref.parameters()):  # the fused kernel divides where torch multiplies
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # The clip mattered: without it the weights end elsewhere.
    assert max((p - q).abs().max().item() for p, q in zip(ours.parameters(), unclipped.parameters())) > 1e-3


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", ["grad", "loss"])
def test_non_finite_step_writes_nothing(fused, bad):
    model = _model_and_grads(1, 1.0)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    for group in opt.param_groups:
        group["fused"] = fused or None
        group["foreach"] = None if fused else False
    clip_and_step(opt, grad_norm(model.parameters()), 1.0)  # one good step: moments exist
    before = copy.deepcopy((list(model.parameters()), opt.state_dict()))
    if bad == "grad":
        next(model.parameters()).grad[0, 0] = float("nan")
    loss = torch.tensor(float("inf") if bad == "loss" else 2.0)
    skipped = clip_and_step(opt, grad_norm(model.parameters()), 1.0, loss)
    assert skipped.item() == 1.0
    for p, q in zip(model.parameters(), before[0]):
        assert torch.equal(p, q)
    state, old = opt.state_dict()["state"], before[1]["state"]
    for key in state:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key][name], old[key][name]), name


def test_fused_adamw_is_used_on_cpu_and_cuda_parameters():
    opt = build_optimizer(torch.nn.Linear(4, 4), OptimConfig(lr=1e-3))
    assert all(group["fused"] for group in opt.param_groups)
    opt64 = build_optimizer(torch.nn.Linear(4, 4).double(), OptimConfig(lr=1e-3))
    assert not any(group["fused"] for group in opt64.param_groups)  # float64: the reference loop


def test_default_lr_scales_with_width(compose):
    assert default_lr(4096) == pytest.approx(1e-4)
    assert default_lr(2048) == pytest.approx(2e-4)
    assert default_lr(128) == 3e-3  # the tiny models' LR, unchanged
    assert compose(["model=bamba_9b"]).optim.lr == pytest.approx(1e-4)
    assert compose(["model=hybrid_1b"]).optim.lr == pytest.approx(2e-4)
    assert compose([]).optim.lr == pytest.approx(3e-3)
    assert compose(["model=bamba_9b", "optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)  # the user's value wins


def test_bf16_moments_without_the_triton_step_are_refused_by_name():
    """optim.moment_dtype=bfloat16 where optim.impl=auto resolves to torch's AdamW (CPU, no interpreter):
    refused when the optimizer is built, naming both settings, rather than silently keeping fp32 moments."""
    with pytest.raises(ValueError, match="optim.moment_dtype=bfloat16: .*optim.impl=auto resolved to torch's AdamW"):
        build_optimizer(torch.nn.Linear(4, 4), OptimConfig(lr=1e-2, moment_dtype="bfloat16"))
