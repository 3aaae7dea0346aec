"""The optimizer step beside the next forward (hybrid_train/train/overlap.py): where the trainer turns it on.

That a step taken module by module is the whole step runs in tests/kernels_interp_cases.py (the Triton AdamW
through the interpreter); that the overlapped trainer logs the plain trainer's losses runs on a GPU
(tests/test_gpu.py)."""

import pytest
import torch

from hybrid_train.model import build_model


def test_trainer_turns_it_on_only_where_it_applies(compose, tmp_path):
    from hybrid_train.train.optim import build_optimizer
    from hybrid_train.train.overlap import overlap_for

    job = compose(["model=tiny", f"run.dir={tmp_path}", "train.max_steps=1", "train.overlap_optimizer=null"])
    model = build_model(job.model)
    fused = build_optimizer(model, job.optim)  # CPU: torch's fused AdamW
    off = overlap_for(job, model, fused, 1, torch.device("cpu"))  # where it applies: not here, no error
    assert not off.enabled and off.groups == []
    off.begin()
    off.join()
    off.close()
    explicit = compose(["model=tiny", f"run.dir={tmp_path}", "train.max_steps=1", "train.overlap_optimizer=true"])
    for device, world, why in (("cpu", 1, "on the CPU"), ("cuda", 8, "one process.*world size 8"),
                               ("cuda", 1, "optim.impl=auto resolved to torch's AdamW")):
        with pytest.raises(ValueError, match=f"train.overlap_optimizer=true: .*{why}"):
            overlap_for(explicit, model, fused, world, torch.device(device))


def test_trainer_refuses_it_on_the_cpu_before_training(compose, tmp_path):
    from hybrid_train.train.trainer import train

    with pytest.raises(ValueError, match="train.overlap_optimizer=true: it overlaps CUDA streams"):
        train(compose(["model=tiny", f"run.dir={tmp_path}", "train.max_steps=2", "train.overlap_optimizer=true"]))
    assert not (tmp_path / "checkpoints").exists()


def test_a_disabled_overlap_steps_the_optimizer_itself(compose, tmp_path):
    from hybrid_train.train.optim import build_optimizer, clip_and_step
    from hybrid_train.train.overlap import OptimizerOverlap

    job = compose(["model=tiny", f"run.dir={tmp_path}", "train.max_steps=1"])
    model = build_model(job.model)
    opt = build_optimizer(model, job.optim)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randint(0, job.model.vocab_size, (1, 8))).float().square().mean().backward()
    overlap = OptimizerOverlap(model, opt, enabled=False)
    clip_and_step(opt, torch.tensor(1.0), 1.0, step=lambda: overlap.step(opt))
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


class _Event(float):
    """A time in seconds that answers `query` as a CUDA event does (done or still running)."""
    running = False

    def query(self) -> bool:
        return not self.running


def test_step_timer_reports_spans_beside_the_loop_once_done():
    """StepTimer.beside: a finished span is reported under its phase (a mean per span) and not counted as the
    loop's device time; one still running waits for the next window; reset drops it."""
    from hybrid_train.train.metrics import StepTimer

    timer = StepTimer(torch.device("cpu"))
    later = _Event(1.0)
    later.running = True
    for start, end in ((0.0, 0.010), (0.5, 0.530)):
        timer.begin()
        timer.mark("forward")
        timer.beside("optimizer_beside_forward", _Event(start), _Event(end))
    timer.begin()
    timer.mark("forward")
    timer.beside("optimizer_beside_forward", _Event(0.9), later)
    first = timer.split()
    assert first["optimizer_beside_forward"] == pytest.approx(20.0)  # (10 + 30) / 2, the running one left out
    assert first["host"] >= 0 and set(first) == {"forward", "optimizer_beside_forward", "data", "host"}
    later.running = False
    timer.begin()
    timer.mark("forward")
    assert timer.split()["optimizer_beside_forward"] == pytest.approx(100.0)  # carried: 1.0 - 0.9 s
    timer.begin()
    timer.mark("forward")
    timer.beside("optimizer_beside_forward", _Event(0.0), later)
    timer.reset()
    timer.begin()
    timer.mark("forward")
    assert "optimizer_beside_forward" not in timer.split()
