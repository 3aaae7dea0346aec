"""Data position: disjoint ranks, exact resume (with and without workers), and resuming at another
data-parallel size without repeating or skipping a document."""

from __future__ import annotations

import io
import random
from collections import Counter

import pytest
import torch

from hybrid_train.data import (ByteTokenizer, DataConfig, SourceConfig, build_data_loader,
                               merge_rank_states)
from hybrid_train.data.positions import Cursor, redistribute
from test_data import expected, make_docs, take, write_shards


def mixed_config(tmp_path, seed: int) -> tuple[DataConfig, set[str]]:
    """Two sources in four formats and uneven shards; returns the config and every document id."""
    web = make_docs("web", 70, seed=seed, max_words=30)
    code = make_docs("code", 45, seed=seed + 1, max_words=12)
    write_shards(tmp_path / "web", "jsonl.zst", web[:40], num_shards=2)
    write_shards(tmp_path / "web", "json.gz", web[40:], num_shards=1)
    write_shards(tmp_path / "code", "parquet", code[:30], num_shards=3)
    write_shards(tmp_path / "code", "jsonl", code[30:], num_shards=2)
    cfg = DataConfig(
        root=str(tmp_path),
        sources={"web": SourceConfig(paths=["web/*"], weight=0.7), "code": SourceConfig(paths=["code/*"], weight=0.3)},
        shuffle_window=8,
    )
    return cfg, set(expected(web)) | set(expected(code))


def serve_epoch_zero(loader, served: Counter, limit: int = 3000) -> list[dict]:
    """Take batches until every slot of this rank has started an epoch-1 document of every source;
    count the epoch-0 documents started on the way (all of the rank's epoch-0 documents by then)."""
    done, everything = set(), {(loader.dp_rank * loader.slots_per_rank + j, name)
                               for j in range(loader.slots_per_rank) for name in loader.names}
    batches = []
    for _ in range(limit):
        batches.append(next(loader))
        for source, key, epoch in loader.last_documents:
            if epoch == 0:
                served[key] += 1
            else:
                done.add((loader.last_slot, source))
        if done == everything:
            return batches
    raise AssertionError(f"rank {loader.dp_rank} did not finish epoch 0 in {limit} batches")


def exactly_once(served: Counter, everything: set[str]) -> None:
    twice = sorted(k for k, n in served.items() if n > 1)
    assert not twice, f"served more than once: {twice[:5]}"
    missing = sorted(everything - set(served))
    assert not missing, f"never served: {missing[:5]}"
    assert set(served) == everything


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_ranks_serve_an_epoch_exactly_once(tmp_path, dp_size):
    cfg, everything = mixed_config(tmp_path, seed=dp_size)
    served = Counter()
    for rank in range(dp_size):
        serve_epoch_zero(build_data_loader(cfg, ByteTokenizer(), 16, 2, rank, dp_size, seed=dp_size), served)
    exactly_once(served, everything)


def round_trip(state: dict) -> dict:
    """Through torch.save / torch.load (weights_only), as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("dp_rank, dp_size, workers", [(0, 1, 0), (1, 2, 0), (1, 2, 2)])
def test_resume_is_exact(tmp_path, dp_rank, dp_size, workers):
    cfg, _ = mixed_config(tmp_path, seed=11)
    kwargs = dict(seq_len=32, batch_size=3, dp_rank=dp_rank, dp_size=dp_size, seed=7, num_workers=workers)
    full = build_data_loader(cfg, ByteTokenizer(), **kwargs)
    reference = take(full, 30)  # several epochs of both sources
    first = build_data_loader(cfg, ByteTokenizer(), **kwargs)
    take(first, 17)  # with workers, more batches than these are built ahead
    state = round_trip(first.state_dict())
    first.close()
    resumed = build_data_loader(cfg, ByteTokenizer(), **kwargs)
    resumed.load_state_dict(state)
    assert same_batches(reference[17:], take(resumed, 13))
    assert resumed.source_tokens == full.source_tokens and resumed.source_documents == full.source_documents
    assert sum(full.source_tokens.values()) == 30 * 3 * 32  # input positions (seq_len 32)
    if workers == 0:
        # One background worker builds the very batches the trainer process would.
        background = build_data_loader(cfg, ByteTokenizer(), **{**kwargs, "num_workers": 1})
        assert same_batches(reference[:6], take(background, 6))
        background.close()
    full.close()
    resumed.close()


@pytest.mark.parametrize("workers_after", [0, 2])
def test_rescale_two_ranks_to_three(tmp_path, workers_after):
    cfg, everything = mixed_config(tmp_path, seed=3 + workers_after)
    tok, seed, served = ByteTokenizer(), 5, Counter()
    old = [build_data_loader(cfg, tok, 16, 2, rank, 2, seed) for rank in range(2)]
    for loader in old:
        for _ in range(6):  # well inside epoch 0
            next(loader)
            served.update(key for _, key, epoch in loader.last_documents if epoch == 0)
    tokens_before = Counter()
    for loader in old:
        tokens_before.update(loader.source_tokens)
    merged = merge_rank_states([round_trip(loader.state_dict()) for loader in reversed(old)])  # any order
    carries = [c for slot in merged["slots"] for pieces in slot["pending"].values() for c in pieces]

    new = [build_data_loader(cfg, tok, 16, 2, rank, 3, seed, num_workers=workers_after) for rank in range(3)]
    tokens_after = Counter()
    for loader in new:
        loader.load_state_dict(merged)
        tokens_after.update(loader.source_tokens)
    assert tokens_after == tokens_before, "per-source counters carry over the rescale"
    rows = []  # (first 16 tokens, first position) of every row the new ranks serve
    for loader in new:
        batches = serve_epoch_zero(loader, served)
        rows += [(b["input_ids"][r, :16].tolist(), b["position_ids"][r, 0].item())
                 for b in batches for r in range(b["input_ids"].shape[0])]
        loader.close()
    # The rest of each document cut by an old rank starts a row of a new slot, positions counting on.
    assert carries, "the old ranks stopped with cut documents"
    for carry in carries:
        n = min(len(carry["tokens"]), 16)
        assert sum(t[:n] == carry["tokens"][:n] and p == carry["position"] for t, p in rows) == 1
    exactly_once(served, everything)


def test_a_rank_state_refuses_another_split(tmp_path):
    cfg, _ = mixed_config(tmp_path, seed=0)
    tok = ByteTokenizer()
    states = [build_data_loader(cfg, tok, 32, 2, rank, 2, seed=0).state_dict() for rank in range(2)]
    with pytest.raises(ValueError, match="rank 0 of 2 .* merge_rank_states"):
        build_data_loader(cfg, tok, 32, 2, dp_rank=0, dp_size=4, seed=0).load_state_dict(states[0])
    with pytest.raises(ValueError, match=r"one state per rank 0\.\.1, got ranks \[1\]"):
        merge_rank_states(states[1:])
    with pytest.raises(ValueError, match=r"ranks \[0, 0\]"):
        merge_rank_states([states[0], states[0]])
    cfg.sources["web"].weight = 0.5
    with pytest.raises(ValueError, match="different sources, weights"):
        build_data_loader(cfg, tok, 32, 2, dp_rank=0, dp_size=2, seed=0).load_state_dict(merge_rank_states(states))


def test_redistribute_chains_of_rescales_serve_each_position_once():
    """Positions only: slots consume random amounts, then the job is re-split, again and again."""
    rng = random.Random()
    sizes = [2, 3, 5, 1, 4, 7]
    states = [Cursor.stripe(v, sizes[0]).state_dict() for v in range(sizes[0])]
    served = Counter()
    for size in sizes[1:] + [3]:
        for state in states:
            cursor = Cursor.from_state(state)
            for _ in range(rng.randrange(0, 60)):
                served[cursor.advance()] += 1
            state.update(cursor.state_dict())
        states = redistribute(states, size)
        assert len(states) == size
    cursors = [Cursor.from_state(s) for s in states]
    frontier = max(c.next for c in cursors)
    for cursor in cursors:  # drain everything below the frontier
        while cursor.peek() < frontier:
            served[cursor.advance()] += 1
    assert [p for p, n in served.items() if n > 1] == []
    assert sorted(served) == list(range(frontier))


def test_rescaled_load_counts_tensor_parallel_peers_once(tmp_path):
    """What the checkpointer hands over: one state per process, two processes per data-parallel rank."""
    cfg, _ = mixed_config(tmp_path, seed=2)
    tok = ByteTokenizer()
    old = [build_data_loader(cfg, tok, 16, 2, rank, 2, seed=1) for rank in range(2)]
    for loader in old:
        take(loader, 3)
    per_process = [round_trip(loader.state_dict()) for loader in old for _ in range(2)]  # tp_size 2
    reference = build_data_loader(cfg, tok, 16, 2, 1, 2, seed=1)
    reference.load_state_dict(per_process[2])
    same = build_data_loader(cfg, tok, 16, 2, 1, 2, seed=1)
    same.load_rescaled_state_dict(per_process)  # same split: continues exactly
    assert same_batches(take(reference, 4), take(same, 4))
    build_data_loader(cfg, tok, 16, 2, 0, 3, seed=1).load_rescaled_state_dict(per_process)
    take(old[0], 1)
    per_process[1] = round_trip(old[0].state_dict())  # a peer that drifted
    with pytest.raises(ValueError, match="two saved states for data-parallel rank 0 differ"):
        build_data_loader(cfg, tok, 16, 2, 0, 3, seed=1).load_rescaled_state_dict(per_process)

