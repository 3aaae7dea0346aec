"""Resuming as a user meets it, through `train.py` as typed: after a crash mid-save, under another world
size, and re-running a finished run; and what train.log keeps of it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_train.train.trainer import train
from test_stages import TINY, records

REPO = Path(__file__).resolve().parents[1]
STEP = 64  # tokens per micro-batch in TINY


def run(args: list[str], nproc: int = 0) -> subprocess.CompletedProcess:
    """`python train.py ARGS`, or `torchrun --nproc_per_node=N train.py ARGS`."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launch, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_crash_mid_save_then_resume_keeps_one_row_per_step(tmp_path):
    """kill -9 while step 6 was saved left a truncated shard; the resume fell back to step 4 and logged
    steps 5 and 6 a second time. Now they are dropped first, and train.log tells the story."""
    run_dir = tmp_path / "run"
    args = [*TINY, "train.max_tokens=384", "checkpoint.interval_steps=2", f"run.dir={run_dir}"]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shard = sorted((run_dir / "checkpoints" / "step_00000006").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # what the killed save left behind
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4, 5, 6]
    log = (run_dir / "train.log").read_text()
    for line in (f"warning: checkpoint {run_dir}/checkpoints/step_00000006 is incomplete (truncated shard",
                 f"resumed from {run_dir}/checkpoints/step_00000004 at step 4",
                 "metrics.jsonl: dropped 2 row(s) logged after step 4",
                 f"finished: stage run, step 6, 384 tokens (384 in total)"):
        assert line in log, line
    assert log.count("finished: ") == 2 and log.count("step=6 ") == 2  # both runs' lines, in order
    # The same command once more: complete, exit 0, nothing touched.
    before = snapshot(run_dir)
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run {run_dir} is complete: stage run, step 6" in proc.stdout
    assert snapshot(run_dir) == before


def bad_lines_source(root: Path) -> str:
    """A JSON-lines shard with malformed lines throughout, so every rank skips some (and warns)."""
    lines = []
    for i in range(400):
        lines.append('{"text": "broken' if i % 4 else json.dumps({"text": f"document {i} " * 20}))
    (root / "web").mkdir(parents=True)
    (root / "web" / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    return f"data.root={root}"


@pytest.mark.slow
def test_world_size_change_keeps_the_global_batch_or_refuses(tmp_path):
    """128 tokens per step on 2 processes became 64 on 1 (and 192 on 3) with the step schedule unchanged."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").touch()  # stop after the first step, as a preempted job does
    args = [*TINY, bad_lines_source(tmp_path / "data"), "~data.sources.code", "data.sources.web.paths=[web/*.jsonl]",
            "data.sources.web.weight=1", "train.max_tokens=512", f"run.dir={run_dir}"]
    proc = run(args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(r["step"], r["tokens"]) for r in records(run_dir)] == [(1, 2 * STEP)]
    log = (run_dir / "train.log").read_text()
    assert "[rank 1] warning: source 'web': " in log  # the other rank's warnings, prefixed
    assert any(" warning: source 'web': " in line and "[rank" not in line for line in log.splitlines())

    proc = run(args, nproc=3)
    assert proc.returncode != 0
    refusal = ("this run trains 128 tokens per step (its checkpoint was saved by 2 process(es)); with 3 "
               "data-parallel process(es) a step is a whole number of micro-batches of 192 tokens")
    assert refusal in proc.stderr and "set train.global_batch_tokens=192 to train the rest" in proc.stderr
    assert refusal in (run_dir / "train.log").read_text()  # the error is kept too

    proc = run(args)  # one process: the same 128 tokens per step, accumulating two micro-batches
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(r["step"], r["tokens"]) for r in records(run_dir)] == [(1, 128), (2, 256), (3, 384), (4, 512)]
    assert ("keeping the run's global batch of 128 tokens per step (saved by 2 process(es)) with gradient "
            "accumulation 2 on 1") in (run_dir / "train.log").read_text()


def test_an_explicit_new_global_batch_replans_the_rest(compose, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").touch()
    common = [*TINY, "train.max_tokens=640", f"run.dir={run_dir}"]
    first = train(compose([*common, "train.global_batch_tokens=128"]))
    assert first.stopped and first.state.stage_tokens == 128
    result = train(compose([*common, "train.global_batch_tokens=64"]))
    assert [(r["step"], r["tokens"]) for r in records(run_dir)] == [(1, 128)] + [(s, 128 + 64 * (s - 1))
                                                                                for s in range(2, 10)]
    assert result.state.stage_tokens == 640  # the run's length in tokens is kept
    assert ("warning: train.global_batch_tokens=64 changes this run's global batch from 128 to 64 tokens per step "
            "at step 1") in (run_dir / "train.log").read_text()
