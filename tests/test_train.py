"""End-to-end training on the bundled sample: a few steps in-process, via the CLI and via torchrun."""

import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_train import load_model
from hybrid_train.config import load_config
from hybrid_train.train import trainer
from hybrid_train.train.metrics import MetricsLogger
from hybrid_train.train.trainer import NonFiniteLossError, forward_backward, train

REPO = Path(__file__).resolve().parents[1]
SMALL = ["train.seq_len=64", "train.micro_batch_size=4", "train.max_tokens=0", "logging.progress=false"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_few_steps_end_to_end(compose, tmp_path):
    run_dir = tmp_path / "run"
    job = compose(SMALL + [f"run.dir={run_dir}", "train.max_steps=6", "logging.log_every=2",
                           "train.global_batch_tokens=512", "train.z_loss=1e-4"])
    result = train(job)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "source_tokens", "time_ms"):
            assert key in r, key
        split = r["time_ms"]
        assert set(split) == {"forward", "backward", "clip", "optimizer", "data", "host"}
        assert split["forward"] > 0 and split["backward"] > 0 and split["optimizer"] > 0
    assert records[-1]["tokens"] == 6 * 512  # 2 micro-batches of 4x64 per step
    assert sum(records[-1]["source_tokens"].values()) == 6 * 512
    assert (run_dir / "config.yaml").is_file()
    loaded = load_model(run_dir)
    assert not loaded.training
    trained = result.model.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0, msg=name)


def test_same_seed_same_losses(compose, tmp_path):
    losses = []
    for i in range(2):
        job = compose(SMALL + [f"run.dir={tmp_path / str(i)}", "train.max_steps=4", "logging.log_every=1"])
        train(job)
        losses.append([r["loss"] for r in read_metrics(tmp_path / str(i))])
    assert losses[0] == losses[1]
    job = compose(SMALL + [f"run.dir={tmp_path / 'other'}", "train.max_steps=4", "logging.log_every=1", "train.seed=1"])
    train(job)
    assert [r["loss"] for r in read_metrics(tmp_path / "other")] != losses[0]


def test_fused_and_logits_loss_train_alike(compose, tmp_path):
    """train.loss_impl=fused (the default on one process) and logits log the same losses (cross entropy
    without the z-loss term) and gradient norms, with gradient accumulation and z-loss on."""
    metrics = {}
    for impl in ("fused", "logits"):
        train(compose(SMALL + [f"run.dir={tmp_path / impl}", "train.max_steps=3", "logging.log_every=1",
                               "train.global_batch_tokens=512", "train.z_loss=1e-2", f"train.loss_impl={impl}"]))
        metrics[impl] = read_metrics(tmp_path / impl)
    fused, logits = metrics["fused"], metrics["logits"]
    assert [r["loss"] for r in fused] == pytest.approx([r["loss"] for r in logits], rel=1e-5)
    assert [r["grad_norm"] for r in fused] == pytest.approx([r["grad_norm"] for r in logits], rel=1e-5)
    assert fused[0]["loss"] == pytest.approx(math.log(258), rel=0.05)  # the cross entropy of a fresh model


def test_non_finite_loss_stops_before_writing_weights(compose, tmp_path):
    job = compose(SMALL + [f"run.dir={tmp_path}", "train.max_steps=3", "model.init_std=1e20"])
    with pytest.raises(NonFiniteLossError, match="step 1"):
        train(job)
    assert not (tmp_path / "checkpoints").exists()


def _live_custom_autograd_nodes() -> int:
    """Backward nodes of torch.autograd.Function ops (the fused head + loss among them) still alive."""
    node = torch.autograd.function.BackwardCFunction
    return sum(issubclass(type(o), node) for o in gc.get_objects())  # type(), not isinstance: no proxy warnings


@pytest.mark.parametrize("impl", ["fused", "logits"])
def test_no_autograd_graph_outlives_its_step(compose, tmp_path, monkeypatch, impl):
    """Regression: the fused head's cross entropy came back attached to its graph node, and the loop's
    in-place `loss_sum += ce` chained every step's autograd graph onto the next; CPU RSS grew ~20 MB a
    step on the default run. Between steps, no graph may be alive, and the logged cross entropy is detached."""
    live: list[int] = []  # counted after each optimizer step
    returned: list[torch.Tensor] = []
    advance = MetricsLogger.advance

    def counting(self):
        advance(self)
        live.append(_live_custom_autograd_nodes())

    def recording(*args, **kwargs):
        returned.append(forward_backward(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(MetricsLogger, "advance", counting)
    monkeypatch.setattr(trainer, "forward_backward", recording)
    train(compose(SMALL + [f"run.dir={tmp_path}", "train.max_steps=5", f"train.loss_impl={impl}"]))
    assert live == [0] * 5, live  # before the fix (fused): [1, 2, 3, 4, 5]
    assert all(ce.grad_fn is None and not ce.requires_grad for ce in returned)


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_cli_runs_and_writes_run_dir(tmp_path):
    run_dir = tmp_path / "cli"
    proc = run_cli([sys.executable, "train.py", *SMALL, "train.max_steps=3", f"run.dir={run_dir}",
                    "model=mamba2_tiny"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_metrics(run_dir)) == 1
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # nothing written elsewhere


@pytest.mark.slow
def test_torchrun_two_processes_share_one_run_dir(tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "train.py", *SMALL, "train.max_steps=3", "logging.log_every=1", f"run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]  # written once, by rank 0
    assert records[-1]["tokens"] == 3 * 2 * 4 * 64
    assert sum(records[-1]["source_tokens"].values()) == records[-1]["tokens"]
    model = load_model(run_dir)
    assert torch.isfinite(model(torch.randint(0, 258, (1, 16)))).all()


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """`python train.py` as shipped (model, data, optimizer, schedule) over the first 100 of its 300 steps
    (tests/test_readme.py runs the quickstart's own command, smaller): the loss ends far below ln(vocab)."""
    shipped = load_config([])
    assert shipped.train.max_tokens == 300 * shipped.train.seq_len * shipped.train.micro_batch_size
    run_dir = tmp_path / "default"
    proc = run_cli([sys.executable, "train.py", f"run.dir={run_dir}", "logging.progress=false", "train.max_steps=100"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run_dir)
    assert records[-1]["step"] == 100
    assert records[0]["loss"] < 5.6  # about ln(258) = 5.55 at the start
    assert records[-1]["loss"] < 2.5  # 2.0 measured
    model = load_model(run_dir)
    assert model.cfg.name == "tiny"


def test_wandb_offline_keeps_one_run_across_resume(compose, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "wb"
    common = SMALL + [f"run.dir={run_dir}", "logging.wandb=true", "logging.wandb_mode=offline"]
    train(compose(common + ["train.max_steps=2"]))
    run_id = (run_dir / "wandb_id").read_text().strip()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    # Where the offline run is, and how to upload it: on the console and in train.log.
    line = f"wandb: offline run in {offline[0]}; upload it with: wandb sync {offline[0]}"
    assert line in capsys.readouterr().out and line in (run_dir / "train.log").read_text()
    train(compose(common + ["train.max_steps=4"]))  # resumes the run directory: same wandb run id
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_no_final_checkpoint_when_switched_off(compose, tmp_path):
    """checkpoint.final=false (benchmarks, smoke runs): the run ends without writing a checkpoint."""
    result = train(compose(SMALL + [f"run.dir={tmp_path}", "train.max_steps=2", "checkpoint.final=false"]))
    assert result.state.step == 2 and result.checkpoint is None
    assert not (tmp_path / "checkpoints").exists()


def test_profiler_start_and_export_stay_out_of_the_logged_windows(compose, tmp_path, monkeypatch):
    """The profiler starts after the step it follows has been logged, and the window then restarts: a slow
    start (here 0.5 s) shows in no window's rate or host time, and the profiled window is its steps alone."""
    import time as time_module

    from hybrid_train.train.profile import StepProfiler

    started = StepProfiler._start
    monkeypatch.setattr(StepProfiler, "_start", lambda self: (time_module.sleep(0.5), started(self)))
    run_dir = tmp_path / "run"
    train(compose(SMALL + [f"run.dir={run_dir}", "train.max_steps=6", "logging.log_every=2",
                           "logging.profile_from=4", "logging.profile_steps=2"]))
    records = {r["step"]: r for r in read_metrics(run_dir)}
    assert records[4]["time_ms"]["host"] < 150, records[4]["time_ms"]  # 2 steps: 250 ms each if it landed here
    assert (run_dir / "profile" / "rank0_steps5-6.json.gz").exists()
    assert "profiled steps 5-6" in (run_dir / "train.log").read_text()


def test_a_profile_past_the_run_is_cut_to_it_and_said(compose, tmp_path):
    run_dir = tmp_path / "run"
    train(compose(SMALL + [f"run.dir={run_dir}", "train.max_steps=4", "logging.log_every=2",
                           "logging.profile_from=3", "logging.profile_steps=3"]))
    log = (run_dir / "train.log").read_text()
    assert ("logging.profile_from=3 with logging.profile_steps=3 runs past the run's last step (4): profiling "
            "steps 4-4") in log
    assert (run_dir / "profile" / "rank0_steps4-4.json.gz").exists() and "profiled steps 4-4" in log
    later = tmp_path / "later"
    train(compose(SMALL + [f"run.dir={later}", "train.max_steps=2", "logging.profile_from=5"]))
    assert "nothing is profiled" in (later / "train.log").read_text() and not (later / "profile").exists()
