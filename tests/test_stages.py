"""A tiny model walked through pretrain -> extend -> mix_cosine -> anneal, with the counters, LR schedules
and data mixtures checked at every boundary; the README's stage chain run as written; windows relative
to the source; and the refusals at a stage start."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_train import load_model
from hybrid_train.train.checkpoint import read_meta
from hybrid_train.train.trainer import train

REPO = Path(__file__).resolve().parents[1]

TINY = ["model=tiny", "data=sample", "model.d_model=64", "model.mlp_hidden=128", "model.n_layers=3",
        "model.attn_layer_indices=[1]", "model.ssm_d_state=8", "model.ssm_head_dim=16", "model.head_dim=16",
        "model.ssm_chunk_size=16", "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_tokens=0",
        "logging.progress=false", "logging.log_every=1", "schedule.warmup_steps=2"]
STEP = 64  # tokens per optimizer step


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stage(compose, tmp_path, name, start, end, *extra):
    overrides = [f"+stage={name}", *TINY, f"stage.start_tokens={start}", f"stage.end_tokens={end}",
                 f"run.dir={tmp_path / name}", *extra]
    return compose(overrides)


def test_walk_through_the_stages(compose, tmp_path):
    # Pretrain: 0 -> 640 tokens, cosine from 3e-3 to 3e-4.
    result = train(stage(compose, tmp_path, "pretrain", 0, 640, "optim.lr=3e-3"))
    pre = records(tmp_path / "pretrain")
    assert pre[-1]["total_tokens"] == 640 and pre[-1]["step"] == 10
    assert pre[1]["lr"] == pytest.approx(3e-3) and pre[-1]["lr"] == pytest.approx(3e-4)
    assert read_meta(result.checkpoint)["stage"] == "pretrain"

    # Extend: 640 -> 1280 from the pretrain run, constant 2e-5 after its own warmup, only the code source.
    ext_job = stage(compose, tmp_path, "extend", 640, 1280, f"checkpoint.init_from={tmp_path / 'pretrain'}",
                    "~data.sources.web")
    train(ext_job)
    ext = records(tmp_path / "extend")
    assert [r["total_tokens"] for r in ext] == list(range(640 + STEP, 1280 + 1, STEP))
    assert ext[0]["tokens"] == STEP and ext[0]["stage"] == "extend"
    assert ext[0]["lr"] == pytest.approx(1e-5) and all(r["lr"] == pytest.approx(2e-5) for r in ext[1:])
    assert all(set(r["source_tokens"]) == {"code"} and r["source_tokens"]["code"] == r["tokens"] for r in ext)
    assert ext[0]["loss"] < pre[0]["loss"] - 1.0  # the trained weights came along

    # The same command again resumes inside the stage (here: already complete) instead of restarting it.
    again = train(ext_job)
    assert again.state.step == 10 and len(records(tmp_path / "extend")) == len(ext)

    # mix_cosine: 1280 -> 1920 with weights and optimizer from extend, cosine 2e-5 -> 2e-6, both sources.
    train(stage(compose, tmp_path, "mix_cosine", 1280, 1920, f"checkpoint.init_from={tmp_path / 'extend'}",
                "data.sources.web.weight=0.5", "data.sources.code.weight=0.5"))
    mix = records(tmp_path / "mix_cosine")
    assert mix[0]["total_tokens"] == 1280 + STEP and mix[-1]["total_tokens"] == 1920
    assert mix[1]["lr"] == pytest.approx(2e-5) and mix[-1]["lr"] == pytest.approx(2e-6)
    assert set(mix[-1]["source_tokens"]) == {"web", "code"} and sum(mix[-1]["source_tokens"].values()) == 640

    # Anneal: 1920 -> 2240, linear to zero.
    train(stage(compose, tmp_path, "anneal", 1920, 2240, f"checkpoint.init_from={tmp_path / 'mix_cosine'}"))
    ann = records(tmp_path / "anneal")
    assert ann[-1]["total_tokens"] == 2240 and ann[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert ann[2]["lr"] > ann[3]["lr"] > ann[4]["lr"]
    meta = read_meta(tmp_path / "anneal" / "checkpoints" / "step_00000005")
    assert meta["stage"] == "anneal" and meta["tokens"] == 2240 and meta["stage_tokens"] == 320


def test_stage_start_refusals(compose, tmp_path):
    train(stage(compose, tmp_path, "pretrain", 0, 128))
    src = tmp_path / "pretrain"
    with pytest.raises(ValueError, match="has seen 128 tokens but stage.start_tokens=1,000"):
        train(stage(compose, tmp_path, "extend", 1000, 2000, f"checkpoint.init_from={src}"))
    ok = train(stage(compose, tmp_path, "extend", 1000, 1256, f"checkpoint.init_from={src}",
                     "stage.allow_token_mismatch=true", f"run.dir={tmp_path / 'forced'}"))
    forced = records(tmp_path / "forced")
    assert forced[0]["total_tokens"] == 128 + STEP  # the counter continues from the checkpoint
    assert 1256 <= ok.state.total_tokens < 1256 + STEP  # and the stage still ends at end_tokens
    with pytest.raises(FileNotFoundError, match="checkpoint.init_from=/no/such/run"):
        train(stage(compose, tmp_path, "extend", 128, 256, "checkpoint.init_from=/no/such/run",
                    f"run.dir={tmp_path / 'missing'}"))
    with pytest.raises(ValueError, match=r"another architecture[\s\S]*d_model: 64 -> 96[\s\S]*embed.weight: saved"):
        train(stage(compose, tmp_path, "extend", 128, 256, f"checkpoint.init_from={src}", "model.d_model=96",
                    f"run.dir={tmp_path / 'wider'}"))
    with pytest.raises(ValueError, match="belongs to stage 'pretrain' but this job is stage 'extend'"):
        train(stage(compose, tmp_path, "extend", 128, 256, f"checkpoint.init_from={src}", f"run.dir={src}"))
    with pytest.raises(ValueError, match="stage 'extend' continues an earlier stage: set checkpoint.init_from"):
        compose(["+stage=extend", *TINY, f"run.dir={tmp_path / 'none'}"])


def readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```\n<!-- /{marker} -->", text, re.S)
    assert block, f"README.md has no {marker} block"
    return block.group(1)


def run_as_written(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run shell commands as a user types them in a checkout: `python` is this interpreter, and the
    checkout's files are seen from cwd (symlinks), so everything the commands write stays under cwd."""
    for name in ("train.py", "conf", "scripts", "data"):
        (cwd / name).symlink_to(REPO / name)
    bin_dir = cwd / ".bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_readme_stage_chain_runs_as_written(tmp_path):
    """A small chain used to take nine overrides found by trial and error (the llama-3 tokenizer, the 2T
    window, Bamba's batch), and its stages never reached their LR: the README's block works as typed."""
    proc = run_as_written(readme_block("stage-walk-through"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    walk = tmp_path / "outputs" / "walk"
    ends = {"pretrain": (0, 1280), "extend": (1280, 1920), "mix": (1920, 2560), "mix_cosine": (1920, 2560),
            "anneal_mix": (2560, 2880), "anneal_mix_cosine": (2560, 2880)}
    for run, (start, end) in ends.items():
        rows = records(walk / run)
        assert [r["total_tokens"] for r in rows][-1] == end, run
        assert rows[-1]["tokens"] == end - start and rows[-1]["step"] == (end - start) // 64, run
        log = (walk / run / "train.log").read_text()
        assert f"{start:,} -> {end:,} total tokens (stage.tokens={end - start:,}" in log, run
        assert "warming up over" in log and log.rstrip().splitlines()[-1].split(" ", 2)[2].startswith("finished"), run
    extend = [r["lr"] for r in records(walk / "extend")]
    assert max(extend) == pytest.approx(2e-5) and extend[-1] == pytest.approx(2e-5)  # the peak is reached
    assert records(walk / "mix_cosine")[-1]["lr"] == pytest.approx(2e-6)
    assert records(walk / "anneal_mix")[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert load_model(walk / "merged").cfg.name == "tiny"
    assert "extend (tiny-sample): 100%" in proc.stderr  # the progress bar names the stage


def test_windows_relative_to_the_source(compose, tmp_path):
    """stage.tokens counts from init_from's counter (the stage file's 2T window is not used); init_from
    without a stage continues the source's counter; an absolute window is still checked."""
    train(stage(compose, tmp_path, "pretrain", 0, 128))
    src = tmp_path / "pretrain"
    ext = train(compose(["+stage=extend", *TINY, f"checkpoint.init_from={src}", "stage.tokens=192",
                         f"run.dir={tmp_path / 'rel'}"]))
    assert ext.state.total_tokens == 128 + 192 and ext.state.step == 3
    log = (tmp_path / "rel" / "train.log").read_text()
    assert "128 -> 320 total tokens (stage.tokens=192 from checkpoint.init_from's counter); stage.start_tokens=" \
           "2,000,000,000,000" in log
    assert "tokens (stage.tokens=192);" in log and "stage     extend: total tokens 128 -> 320, weights from" in log
    plain = train(compose([*TINY, f"checkpoint.init_from={src}", "train.max_tokens=256", "train.global_batch_tokens=128",
                           f"run.dir={tmp_path / 'plain'}"]))
    assert [r["total_tokens"] for r in records(tmp_path / "plain")] == [256, 384]
    assert plain.state.stage_tokens == 256
    assert ("checkpoint.init_from trained 64 tokens per step; this stage trains 128 (train.global_batch_tokens=64 "
            "keeps the source's)") in (tmp_path / "plain" / "train.log").read_text()
    with pytest.raises(ValueError, match=r"stage.end_tokens=256 must be above stage.start_tokens=2,000,000,000,000; "
                                         r"to give the stage's length .* set stage.tokens=256"):
        compose(["+stage=extend", *TINY, f"checkpoint.init_from={src}", "stage.end_tokens=256"])
    with pytest.raises(ValueError, match=r"has seen 128 tokens but stage.start_tokens=2,000,000,000,000 .* set "
                                         r"stage.tokens=N to run N tokens from the checkpoint's 128"):
        train(compose(["+stage=extend", *TINY, f"checkpoint.init_from={src}", f"run.dir={tmp_path / 'abs'}"]))
