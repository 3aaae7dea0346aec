"""A tiny model walked through pretrain -> extend -> mix_cosine -> anneal, with the counters, LR schedules
and data mixtures checked at every boundary; and the refusals at a stage start."""

import json
from pathlib import Path

import pytest

from hybrid_train.train.checkpoint import read_meta
from hybrid_train.train.trainer import train

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
