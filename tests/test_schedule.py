"""LR schedules at known points, and the optimizer's decay groups."""

import math

import pytest
import torch

from hybrid_train.model import ModelConfig, build_model
from hybrid_train.train.config import OptimConfig, ScheduleConfig
from hybrid_train.train.optim import (build_lr_scheduler, build_optimizer, clamped_warmup, lr_multiplier,
                                     warmup_steps_for)


def lrs(name, total=110, warmup=10, **kw):
    cfg = ScheduleConfig(name=name, warmup_steps=warmup, **kw)
    return [lr_multiplier(s, total, warmup, cfg) for s in range(total)]


def test_warmup_is_linear_to_peak():
    values = lrs("constant")
    assert values[0] == pytest.approx(0.1) and values[4] == pytest.approx(0.5) and values[9] == 1.0
    assert all(v == 1.0 for v in values[10:])


def test_cosine_known_points():
    values = lrs("cosine", total=111, min_lr_ratio=0.1)  # 101 decay steps: midpoint at step 60
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55)
    assert values[110] == pytest.approx(0.1)
    assert values[35] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_linear_known_points():
    values = lrs("linear", total=111, min_lr_ratio=0.0)
    assert values[10] == pytest.approx(1.0) and values[60] == pytest.approx(0.5) and values[110] == pytest.approx(0.0)


def test_wsd_stable_then_decay():
    values = lrs("wsd", total=100, warmup=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert all(v == 1.0 for v in values[10:80])
    assert values[89] == pytest.approx(0.5) and values[99] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(values[80:], values[81:]))


def test_warmup_in_tokens_rounds_up():
    assert warmup_steps_for(ScheduleConfig(warmup_tokens=10_001), tokens_per_step=1000) == 11


def test_warmup_fraction_scales_with_the_run():
    assert warmup_steps_for(ScheduleConfig(warmup_fraction=0.05), tokens_per_step=64, total_steps=200) == 10
    assert clamped_warmup(ScheduleConfig(warmup_fraction=0.01), 64, 50) == (1, None)  # rounded up


def test_a_warmup_longer_than_half_the_run_is_clamped_with_a_warning():
    """A stage file's 100 warmup steps in a 10-step stage ran at 1e-6..2e-6 and never reached 2e-5."""
    assert clamped_warmup(ScheduleConfig(warmup_steps=100), 64, 200) == (100, None)
    steps, warning = clamped_warmup(ScheduleConfig(warmup_steps=100), 64, 10)
    assert steps == 5 and warning.startswith("schedule.warmup_steps=100 is more than half of the run's 10 steps; "
                                             "warming up over 5 steps instead")
    steps, warning = clamped_warmup(ScheduleConfig(warmup_tokens=6400), 64, 10)
    assert steps == 5 and "schedule.warmup_tokens=6400 (100 steps)" in warning
    with pytest.raises(ValueError, match="set one warmup length, not schedule.warmup_steps=20 and "
                                         "schedule.warmup_fraction=0.1"):
        ScheduleConfig(warmup_steps=20, warmup_fraction=0.1).validate()
    with pytest.raises(ValueError, match=r"warmup_fraction must be in \[0, 0.5\]"):
        ScheduleConfig(warmup_steps=0, warmup_fraction=0.7).validate()


def test_scheduler_drives_optimizer_lr():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, OptimConfig(lr=2e-5))
    sched = build_lr_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1), 12, 1)
    seen = []
    for _ in range(12):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-5) and seen[1] == pytest.approx(2e-5) and seen[-1] == pytest.approx(2e-6)


def test_no_weight_decay_on_vectors():
    model = build_model(ModelConfig(n_layers=2, attn_layer_indices=[1]))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for suffix in ("A_log", "D", "dt_bias", "norm.weight", "conv1d.x.bias"):
        assert any(n.endswith(suffix) for n in no_decay), suffix
        assert not any(n.endswith(suffix) for n in decay), suffix
    assert "embed.weight" in decay and "layers.0.mixer.in_proj.x.weight" in decay
