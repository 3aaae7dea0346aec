"""Checkpoints: exact resume, atomicity under SIGKILL, fallback past broken checkpoints, clean stops,
refusals of mismatched configs, pruning, async saves."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hybrid_train.train.checkpoint import checkpoint_problem, read_meta
from hybrid_train.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
SMALL = ["train.seq_len=32", "train.micro_batch_size=2", "train.max_tokens=0", "logging.progress=false",
         "logging.log_every=1", "model.d_model=64", "model.mlp_hidden=128", "model.n_layers=3",
         "model.attn_layer_indices=[1]", "model.ssm_d_state=8", "model.ssm_head_dim=16", "model.head_dim=16",
         "model.ssm_n_groups=2", "model.ssm_chunk_size=16", "schedule.warmup_steps=3"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_resume_is_exact(compose, tmp_path):
    """20 steps in one go == 10 steps, then the same command again (auto-resume) to 20."""
    full = compose(SMALL + [f"run.dir={tmp_path / 'full'}", "train.max_steps=20"])
    train(full)
    first = compose(SMALL + [f"run.dir={tmp_path / 'split'}", "train.max_steps=20", "checkpoint.interval_steps=10"])
    # Stop after step 10 the way a preempted job does: a STOP request, then the same command again.
    (tmp_path / "split").mkdir()
    result = _train_with_stop_at(first, tmp_path / "split", step=10)
    assert result.stopped and result.state.step == 10
    again = train(first)
    assert not again.stopped and again.state.step == 20
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    meta = read_meta(again.checkpoint)
    assert meta["step"] == 20 and meta["tokens"] == 20 * 2 * 32 and meta["final"]
    assert sum(meta["source_tokens"].values()) == meta["stage_tokens"]


def _train_with_stop_at(job, run_dir: Path, step: int):
    """Run `job`, asking it to stop once `step` is done (through the STOP file, as the batch script does)."""
    import hybrid_train.train.trainer as trainer

    original = trainer.StopRequest.should_stop

    def should_stop(self):
        # Called after each optimizer step, before that step is logged.
        logged = len(losses(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
        if logged >= step - 1 and not (run_dir / "STOP").exists():
            (run_dir / "STOP").touch()
        return original(self)

    trainer.StopRequest.should_stop = should_stop
    try:
        return train(job)
    finally:
        trainer.StopRequest.should_stop = original


def test_resume_refuses_a_different_model(compose, tmp_path):
    train(compose(SMALL + [f"run.dir={tmp_path}", "train.max_steps=2"]))
    with pytest.raises(ValueError, match=r"different model config:\n  d_model: 64 -> 96"):
        train(compose(SMALL + [f"run.dir={tmp_path}", "train.max_steps=4", "model.d_model=96"]))


def test_falls_back_past_an_incomplete_checkpoint(compose, tmp_path):
    job = compose(SMALL + [f"run.dir={tmp_path}", "train.max_steps=4", "checkpoint.interval_steps=2",
                           "checkpoint.keep_last=0"])
    train(job)
    ckpts = tmp_path / "checkpoints"
    newest = ckpts / "step_00000004"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])  # a shard cut short, as by a full disk
    assert "truncated shard" in checkpoint_problem(newest)
    longer = compose(SMALL + [f"run.dir={tmp_path}", "train.max_steps=6", "checkpoint.interval_steps=2",
                              "checkpoint.keep_last=0"])
    with pytest.warns(UserWarning, match="step_00000004 is incomplete \\(truncated shard"):
        result = train(longer)
    assert result.state.step == 6
    steps = [s for s, _ in losses(tmp_path)]
    # Steps 3-4 were retrained from the step-2 checkpoint; the rows the first run logged for them are
    # dropped at the resume, so each step keeps one row (it used to read 1, 2, 3, 4, 3, 4, 5, 6).
    assert steps == [1, 2, 3, 4, 5, 6]


def test_keep_last_prunes_but_keeps_permanent(compose, tmp_path):
    job = compose(SMALL + [f"run.dir={tmp_path}", "train.max_steps=8", "checkpoint.interval_steps=1",
                           "checkpoint.keep_last=2", "checkpoint.permanent_interval_steps=3"])
    train(job)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_00000003", "step_00000006", "step_00000007", "step_00000008"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000008"


def test_async_save_matches_sync(compose, tmp_path):
    for mode in ("sync", "async"):
        train(compose(SMALL + [f"run.dir={tmp_path / mode}", "train.max_steps=4", "checkpoint.interval_steps=2",
                               f"checkpoint.async_save={mode == 'async'}", "checkpoint.keep_last=0"]))
    for step in ("step_00000002", "step_00000004"):
        a, b = (tmp_path / m / "checkpoints" / step for m in ("sync", "async"))
        assert checkpoint_problem(a) is None and checkpoint_problem(b) is None
    from hybrid_train import load_model

    sd_a = load_model(tmp_path / "sync").state_dict()
    sd_b = load_model(tmp_path / "async").state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def _spawn_train(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=180.0):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigusr1_checkpoints_and_exits_then_resumes_exactly(tmp_path):
    run_dir, ref_dir = tmp_path / "sig", tmp_path / "ref"
    args = SMALL + ["train.max_steps=30"]
    ref = _spawn_train(args + [f"run.dir={ref_dir}"])
    proc = _spawn_train(args + [f"run.dir={run_dir}"])
    _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 5, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert "stopping at step" in out and "SIGUSR1" in out
    stopped_at = losses(run_dir)[-1][0]
    assert stopped_at < 30
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert checkpoint_problem(latest) is None and read_meta(latest)["step"] == stopped_at
    again = _spawn_train(args + [f"run.dir={run_dir}"])
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    ref.communicate(timeout=300)
    assert losses(run_dir) == losses(ref_dir)


@pytest.mark.slow
def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    """Kill the trainer while it writes a checkpoint: the previous one stays complete and `latest`."""
    run_dir = tmp_path / "kill"
    # Large-ish checkpoints (d_model 256) so a save takes long enough to be caught mid-way.
    args = [a for a in SMALL if not a.startswith(("model.d_model", "model.mlp_hidden"))] + [
        "model.d_model=256", "model.mlp_hidden=1024", "train.max_steps=200", "checkpoint.interval_steps=1",
        "checkpoint.keep_last=0", f"run.dir={run_dir}"]
    proc = _spawn_train(args)
    ckpts = run_dir / "checkpoints"
    _wait_for(lambda: (ckpts / "latest").exists() and any(ckpts.glob(".tmp_step_*/*.distcp")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    latest = ckpts / (ckpts / "latest").read_text().strip()
    assert checkpoint_problem(latest) is None
    from hybrid_train import load_model

    model = load_model(run_dir)
    assert torch.isfinite(model(torch.randint(0, 258, (1, 8)))).all()


@pytest.mark.slow
def test_resume_on_a_different_world_size(tmp_path):
    """Saved by 2 FSDP processes, resumed by 1: model, optimizer and data position are resharded."""
    run_dir = tmp_path / "rescale"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = SMALL + ["train.max_steps=6", "checkpoint.interval_steps=3", f"run.dir={run_dir}"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *args[:-2], "train.max_steps=3", f"run.dir={run_dir}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    first = losses(run_dir)
    assert [s for s, _ in first] == [1, 2, 3]
    # The same run, now 6 steps long, continued by a single process.
    one = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed from" in one.stdout + one.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # Two ranks made 3 steps of 2 x 64 tokens; one rank keeps the run's 128 tokens per step, accumulating
    # two micro-batches (it used to drop to 64 per step without a word).
    assert records[2]["tokens"] == 3 * 128 and records[-1]["tokens"] == 6 * 128
    assert "with gradient accumulation 2 on 1" in one.stdout + one.stderr
    assert sum(records[-1]["source_tokens"].values()) == records[-1]["tokens"]
