"""The shipped mixtures compose, validate and run against a tree of matching files; realized token
shares track the weights."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import CONF, REPO, compose_job
from hybrid_train.data import DataConfig, SourceConfig, build_data_loader, build_tokenizer
from test_data import make_docs, write_shards

MIXES = ["olmo_mix", "nemotron_cc_mix", "anneal_mix"]
FORMAT_OF = {".jsonl.zstd": "jsonl.zst", ".json.zst": "json.zst", ".parquet": "parquet", ".json*": "jsonl"}


def fake_shard(root: Path, pattern: str, name: str, seed: int) -> None:
    """One small shard whose path matches `pattern`, in the format its suffix names."""
    suffix = next(s for s in FORMAT_OF if pattern.endswith(s))
    folder = root / pattern.replace("/**/", "/sub/").rsplit("/", 1)[0]
    fmt = FORMAT_OF[suffix]
    (path,) = write_shards(folder, fmt, make_docs(name, 12, seed=seed), num_shards=1)
    if suffix == ".jsonl.zstd":  # Nemotron-CC's spelling of zstd
        path.rename(folder / "part-00000.jsonl.zstd")


@pytest.mark.parametrize("mix", MIXES)
def test_shipped_mix_composes_validates_and_runs(tmp_path, monkeypatch, mix):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    job = compose_job([f"data={mix}"])
    data = job.data
    assert data.root == "/data" and data.tokenizer == "/data/tokenizers/llama-3"
    assert abs(sum(s.weight for s in data.sources.values()) - 100) < 1e-9, "shares are percentages"
    assert all(isinstance(s, SourceConfig) for s in data.sources.values())

    with pytest.raises(ValueError, match=r"source '\w+': pattern .* matches no files"):
        build_data_loader(data, build_tokenizer("byte"), 64, 2, 0, 1, 0)

    for i, (name, source) in enumerate(sorted(data.sources.items())):
        for pattern in source.paths:
            fake_shard(tmp_path, pattern, name, seed=i)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    job = compose_job([f"data={mix}", "data.tokenizer=byte"])
    assert job.data.root == str(tmp_path)
    loader = build_data_loader(job.data, build_tokenizer("byte"), 64, 4, 0, 1, job.train.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(40):
            next(loader)
    tokens = loader.source_tokens
    top = max(data.sources, key=lambda n: data.sources[n].weight)
    assert max(tokens, key=tokens.get) == top and sum(tokens.values()) == 40 * 4 * 64


def test_every_data_yaml_is_tested():
    shipped = {p.stem for p in (CONF / "data").glob("*.yaml")}
    assert shipped == set(MIXES) | {"sample"}


def test_sample_shares_within_half_a_percent_after_a_million_tokens(monkeypatch):
    monkeypatch.chdir(REPO)
    job = compose_job([])  # the default run: data=sample
    loader = build_data_loader(job.data, build_tokenizer(job.data.tokenizer), 1024, 8, 0, 1, job.train.seed)
    total_weight = sum(s.weight for s in job.data.sources.values())
    target = {n: s.weight / total_weight for n, s in job.data.sources.items()}
    worst, served = 0.0, 0
    while served < 2_000_000:
        next(loader)
        tokens = loader.source_tokens
        served = sum(tokens.values())
        if served >= 1_000_000:
            worst = max(worst, max(abs(tokens[n] / served - target[n]) for n in target))
    assert worst < 0.005, f"realized share {worst:.4%} off target after 1M tokens"


def test_shares_hold_with_long_documents(tmp_path):
    """Heavy-tailed lengths (papers up to 60k tokens, 15 rows): a document longer than a row waits
    for row starts instead of taking its source far past its share. Bamba's row: 4096 tokens."""
    rng = np.random.default_rng(random.randrange(1 << 30))
    weights = {"web": 90.5, "code": 4.5, "papers": 5.0}
    median = {"web": 800, "code": 1500, "papers": 6000}
    for name in weights:
        lengths = np.minimum(rng.lognormal(np.log(median[name]), 1.0, 300), 60_000).astype(int) + 1
        letters = rng.integers(97, 123, size=len(lengths))
        docs = [{"id": f"{name}-{i}", "text": chr(c) * n} for i, (c, n) in enumerate(zip(letters, lengths))]
        write_shards(tmp_path / name, "jsonl", docs, num_shards=2)
    cfg = DataConfig(root=str(tmp_path), shuffle_window=64,
                     sources={n: SourceConfig(paths=[f"{n}/*"], weight=w) for n, w in weights.items()})
    loader = build_data_loader(cfg, build_tokenizer("byte"), 4096, 2, 0, 1, seed=0)
    worst_1m = worst_5m = 0.0
    served = 0
    while served < 6_000_000:
        next(loader)
        tokens = loader.source_tokens
        served = sum(tokens.values())
        deviation = max(abs(tokens[n] / served - w / 100) for n, w in weights.items())
        worst_1m = max(worst_1m, deviation) if served >= 1_000_000 else 0.0
        worst_5m = max(worst_5m, deviation) if served >= 5_000_000 else 0.0
    assert worst_1m < 0.005 and worst_5m < 0.001, (worst_1m, worst_5m)
