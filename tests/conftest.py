"""Shared fixtures: Hydra composition of the shipped configs, small helpers."""

import weakref
from pathlib import Path

import pytest

from hybrid_train.config import JobConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def compose_job(overrides: list[str] | None = None, config_dir: Path = CONF) -> JobConfig:
    """Compose conf/config.yaml with overrides exactly as train.py does, and validate it."""
    return load_config(list(overrides or []), config_dir=config_dir)


@pytest.fixture
def reference_adamw():
    """torch's single-tensor AdamW with build_optimizer's groups and an OptimConfig's hyperparameters."""
    import torch

    def build(model, cfg):
        return torch.optim.AdamW(
            [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": cfg.weight_decay},
             {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)
    return build


@pytest.fixture
def compose():
    return compose_job


@pytest.fixture
def head_dtypes(monkeypatch):
    """The dtype of the model's head weight each time the trainer runs a micro-batch's forward and backward
    (bf16 with bf16 weights on split fp32 masters, fp32 otherwise)."""
    from hybrid_train.train import trainer

    seen = []
    real = trainer.forward_backward

    def forward_backward(model, *args, **kwargs):
        seen.append(model.lm_head.weight.dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "forward_backward", forward_backward)
    return seen


class LiveTensors:
    """Counts the tensors that checkpoint sources (anything with a ``tensor(name)`` reader) have handed
    out and that are still alive; ``peak`` is the most at once, what a streaming writer must bound."""

    def __init__(self, *sources):
        self.live = self.peak = 0
        for source in sources:
            source.tensor = self._tracked(source.tensor)

    def _tracked(self, read):
        def tensor(name):
            t = read(name)
            self.live += 1
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release)
            return t

        return tensor

    def _release(self) -> None:
        self.live -= 1
