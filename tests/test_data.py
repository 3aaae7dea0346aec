"""Data pipeline: packing against a slow reference, mixing shares, every shard format, bad input, and
the bundled sample through its YAML. Resume and rescale: test_data_resume.py; token files:
test_data_tokens.py; the shipped mixtures: test_data_configs.py."""

from __future__ import annotations

import gzip
import itertools
import json
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from omegaconf import OmegaConf

from hybrid_train.data import (
    ByteTokenizer,
    DataConfig,
    DataExhausted,
    HFTokenizer,
    SourceConfig,
    build_data_loader,
    build_tokenizer,
)
from hybrid_train.data.formats import resolve_paths
from hybrid_train.data.mixture import Mixture
from hybrid_train.data.packing import DocumentFeed, Packer
from hybrid_train.data.positions import Cursor
from hybrid_train.data.sources import SourceStream

REPO = Path(__file__).resolve().parents[1]
FORMATS = ["jsonl", "jsonl.zst", "json.zst", "json.gz", "parquet"]


# ---------------------------------------------------------------------------------------------------
# Fixture helper: tiny shards with known document ids, in every format.


def make_docs(prefix: str, n: int, seed: int = 0, max_words: int = 20) -> list[dict]:
    """n documents `prefix-0000`...; every 7th one is empty (readers must skip it)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "délta", "εψιλον", "zeta", "eta\n", "theta", "iota", "kappa"]
    docs = []
    for i in range(n):
        text = "" if i % 7 == 3 else " ".join(rng.choice(words) for _ in range(rng.randint(1, max_words)))
        docs.append({"id": f"{prefix}-{i:04d}", "text": text, "source": prefix})
    return docs


def write_shards(folder: Path, fmt: str, docs: list[dict], num_shards: int = 3) -> list[Path]:
    """Split docs into `num_shards` contiguous shards part-00000.<fmt>, part-00001.<fmt>, ... in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // num_shards)
    paths = []
    for shard in range(num_shards):
        rows = docs[shard * per : (shard + 1) * per]
        path = folder / f"part-{shard:05d}.{fmt}"
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)  # several groups per file
        elif fmt.endswith(".zst"):
            path.write_bytes(zstandard.ZstdCompressor().compress(lines))
        elif fmt.endswith(".gz"):
            path.write_bytes(gzip.compress(lines, mtime=0))
        else:
            path.write_bytes(lines)
        paths.append(path)
    return paths


def expected(docs: list[dict]) -> dict[str, str]:
    return {d["id"]: d["text"] for d in docs if d["text"]}


def stream(files, slot: int = 0, num_slots: int = 1, *, seed: int = 0, window: int = 4, text_field: str = "text",
           on_error: str = "skip", max_epochs=None) -> SourceStream:
    """One slot's document stream of a source over `files`, byte-tokenized."""
    cfg = SourceConfig(paths=["unused"], text_field=text_field, max_epochs=max_epochs)
    return SourceStream("doc", cfg, [str(f) for f in files], ByteTokenizer(), window=window, seed=seed,
                        on_error=on_error, cursor=Cursor.stripe(slot, num_slots))


def text(doc) -> str:
    return bytes(doc.ids.tolist()).decode()


def one_epoch(source: SourceStream) -> list[tuple[str, str]]:
    """(key, text) of the documents a slot serves in epoch 0, in order."""
    source.cfg.max_epochs = 1  # the helper's own config: stop where epoch 1 would begin
    out = []
    with pytest.raises(DataExhausted):
        while True:
            doc = source.next()
            out.append((doc.key, text(doc)))
    return out


def two_source_config(tmp_path: Path, **overrides) -> DataConfig:
    """web as zstd JSON lines, code as parquet: the two code paths of the reader in one mixture."""
    write_shards(tmp_path / "web", "jsonl.zst", make_docs("web", 40, seed=1, max_words=30))
    write_shards(tmp_path / "code", "parquet", make_docs("code", 30, seed=2, max_words=12), num_shards=2)
    cfg = DataConfig(
        root=str(tmp_path),
        sources={
            "web": SourceConfig(paths=["web/*.jsonl.zst"], weight=0.7),
            "code": SourceConfig(paths=["code/*.parquet"], weight=0.3),
        },
        shuffle_window=5,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


# ---------------------------------------------------------------------------------------------------
# Tokenizers and config


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo wörld ✓ \n\t"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids + [tok.eos_id]) == text
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258)


def _tiny_hf_tokenizer(path: Path, specials: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "the quick brown fox"] * 5, trainer)
    tok.save(str(path))


def test_hf_tokenizer(tmp_path):
    _tiny_hf_tokenizer(tmp_path / "tokenizer.json", ["<s>", "</s>"])
    for spec in (tmp_path / "tokenizer.json", tmp_path):  # the file, or a folder holding it
        tok = build_tokenizer(str(spec))
        assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id) == (0, 1)
        text = "hello </s> world"
        ids = tok.encode(text)
        assert tok.eos_id not in ids, "a literal special-token string in text must stay text"
        assert tok.decode(ids) == text and max(ids) < tok.vocab_size

    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        build_tokenizer(str(tmp_path / "nowhere.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/tokenizer.json"):
        build_tokenizer(str(tmp_path / "empty"))
    _tiny_hf_tokenizer(tmp_path / "no_eos.json", ["<pad>"])
    with pytest.raises(ValueError, match="end-of-text"):
        build_tokenizer(str(tmp_path / "no_eos.json"))


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: c.sources.clear(), "data.sources"),
        (lambda c: setattr(c.sources["web"], "weight", 0.0), "data.sources.web.weight"),
        (lambda c: setattr(c.sources["web"], "weight", float("nan")), "data.sources.web.weight"),
        (lambda c: setattr(c.sources["web"], "paths", []), "data.sources.web.paths"),
        (lambda c: setattr(c.sources["web"], "text_field", ""), "data.sources.web.text_field"),
        (lambda c: setattr(c, "shuffle_window", 0), "data.shuffle_window"),
        (lambda c: setattr(c, "tokenizer", ""), "data.tokenizer"),
    ],
)
def test_config_validate_names_the_field(change, field):
    cfg = DataConfig(sources={"web": SourceConfig(paths=["*.jsonl"])})
    cfg.validate()
    change(cfg)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        cfg.validate()


# ---------------------------------------------------------------------------------------------------
# Packing


def slow_rows(docs: list[list[int]], seq_len: int):
    """Reference: label every stream token with (document, position), then cut rows one by one."""
    stream = [(tok, d, pos) for d, ids in enumerate(docs) for pos, tok in enumerate(ids)]
    width = seq_len + 1
    rows = []
    for r in range(len(stream) // width):
        chunk = stream[r * width : (r + 1) * width]
        seq, current, last_doc = [], -1, None
        for _, d, _ in chunk:
            if d != last_doc:
                current, last_doc = current + 1, d
            seq.append(current)
        rows.append(([t for t, _, _ in chunk], [p for _, _, p in chunk], seq))
    return rows


@pytest.mark.parametrize("add_bos", [False, True])
def test_packing_matches_slow_reference(add_bos):
    rng = random.Random(0)
    seq_len = 16
    packer = Packer(seq_len, eos_id=257, bos_id=256 if add_bos else None)
    # Mostly short documents, some spanning several rows, some exactly filling one.
    raw = [[rng.randrange(256) for _ in range(rng.choice([1, 2, 5, 16, 17, 40]))] for _ in range(120)]
    docs = [packer.frame(ids) for ids in raw]
    assert all(d[-1] == 257 and (d[0] == 256) == add_bos for d in docs)
    reference = slow_rows(docs, seq_len)
    feed = DocumentFeed(iter([("s", d, i) for i, d in enumerate(docs)]).__next__)
    batches = [packer.next_batch(4, feed) for _ in range(len(reference) // 4)]
    rows = reference[: 4 * len(batches)]

    tokens = np.concatenate([b["tokens"] for b in batches])
    stream = list(itertools.chain.from_iterable(docs))
    assert tokens.flatten().tolist() == stream[: tokens.size], "rows must reconstruct the stream"
    for b in batches:
        assert b["tokens"].shape == (4, seq_len + 1) and b["tokens"].dtype == np.int64
        assert b["positions"].dtype == np.int64 and b["seq_idx"].dtype == np.int32
    got = [(t.tolist(), p.tolist(), s.tolist()) for b in batches
           for t, p, s in zip(b["tokens"], b["positions"], b["seq_idx"])]
    assert got == rows
    assert packer.tokens["s"] == 4 * seq_len * len(batches)  # input positions only
    assert packer.started == list(range(len(packer.started))), "documents log in stream order"


def test_packing_state_round_trip():
    rng = random.Random(1)
    docs = [Packer(8, eos_id=9).frame([rng.randrange(9) for _ in range(rng.randint(1, 30))]) for _ in range(200)]

    def run(packer, feed, n):
        return [packer.next_batch(2, feed) for _ in range(n)]

    full = run(Packer(8, eos_id=9), DocumentFeed(iter([("s", d, None) for d in docs]).__next__), 10)
    it = iter([("s", d, None) for d in docs])
    first, feed = Packer(8, eos_id=9), DocumentFeed(it.__next__)
    run(first, feed, 4)
    resumed, resumed_feed = Packer(8, eos_id=9), DocumentFeed(it.__next__)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # plain data only
    resumed_feed.load_state_dict(json.loads(json.dumps(feed.state_dict())))
    for a, b in zip(full[4:], run(resumed, resumed_feed, 6)):
        assert all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------
# Mixture


def test_mixture_token_shares_track_targets():
    weights = {"web": 6.0, "code": 3.0, "math": 1.0}  # normalized: 0.6 / 0.3 / 0.1
    rng = random.Random(0)
    lengths = {"web": (50, 3000), "code": (200, 8000), "math": (10, 500)}
    mix = Mixture(weights)
    assert mix.pick() == "code", "all deficits are 0 at the start: the first name in sorted order"
    assert mix.pick(["web", "math"]) == "math", "only the candidates compete"
    while sum(mix.tokens.values()) < 3_000_000:
        name = mix.pick()
        mix.add(name, rng.randint(*lengths[name]))
    total = sum(mix.tokens.values())
    for name, weight in weights.items():
        assert abs(mix.tokens[name] / total - weight / 10) < 0.005, (name, mix.tokens[name] / total)

    resumed = Mixture(weights)
    resumed.load_state_dict(mix.state_dict())
    for _ in range(100):
        name = mix.pick()
        assert resumed.pick() == name
        n = rng.randint(1, 100)
        mix.add(name, n)
        resumed.add(name, n)


# ---------------------------------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_documents(tmp_path, fmt):
    docs = make_docs("doc", 50)
    write_shards(tmp_path, fmt, docs)
    files = resolve_paths("doc", [f"*.{fmt}"], str(tmp_path))
    assert len(files) == 3
    got = one_epoch(stream(files, window=8))
    assert len(got) == len(expected(docs)) and dict(got) == expected(docs)


def test_window_shuffles_within_blocks_and_epochs_reshuffle(tmp_path):
    docs = make_docs("doc", 200, max_words=3)
    write_shards(tmp_path, "jsonl", docs, num_shards=1)
    files = [tmp_path / "part-00000.jsonl"]
    ordered = [k for k, _ in one_epoch(stream(files, window=1))]
    assert ordered == list(expected(docs)), "window 1 keeps the file order"
    source = stream(files, window=16, seed=1)
    served = [source.next() for _ in range(2 * len(ordered))]
    first = [d.key for d in served if d.epoch == 0]
    second = [d.key for d in served if d.epoch == 1]
    index = {k: i for i, k in enumerate(ordered)}
    assert first != ordered and sorted(first) == sorted(ordered)
    # Position p holds a record of the same block of 16 records (empty ones shift both sides alike).
    assert all(abs(index[k] - p) < 16 for p, k in enumerate(first))
    assert sorted(second) == sorted(first) and second != first, "each epoch is shuffled anew"


@pytest.mark.parametrize("fmt", ["jsonl.zst", "parquet"])
def test_source_resumes_mid_file_and_across_epochs(tmp_path, fmt):
    write_shards(tmp_path, fmt, make_docs("doc", 30))
    files = resolve_paths("doc", [f"*.{fmt}"], str(tmp_path))
    full = stream(files, 1, 2, seed=5)
    reference = [full.next() for _ in range(40)]  # ~3 epochs of this slot's 13 documents
    for k in (0, 5, 13, 27):
        first = stream(files, 1, 2, seed=5)
        head = [first.next() for _ in range(k)]
        resumed = stream(files, 1, 2, seed=5)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # plain data only
        got = head + [resumed.next() for _ in range(40 - k)]
        assert [(d.key, d.epoch, d.ids.tolist()) for d in got] == [(d.key, d.epoch, d.ids.tolist()) for d in reference]
    assert reference[-1].epoch >= 2


def test_max_epochs_stops_with_a_clear_message(tmp_path):
    write_shards(tmp_path, "jsonl", make_docs("doc", 10), num_shards=2)
    source = stream(sorted(tmp_path.glob("*.jsonl")), max_epochs=2)
    keys = []
    with pytest.raises(DataExhausted, match=r"source 'doc' has served its 2 epoch\(s\).*max_epochs"):
        while True:
            keys.append(source.next().key)
    assert sorted(keys) == sorted(list(expected(make_docs("doc", 10))) * 2)


# ---------------------------------------------------------------------------------------------------
# Loader


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_rejects_ids_outside_the_vocab(tmp_path):
    class Wide(ByteTokenizer):
        vocab_size = 200  # the byte ids of "é", "ε" ... are larger

    loader = build_data_loader(two_source_config(tmp_path), Wide(), 32, 2, 0, 1, 0)
    with pytest.raises(ValueError, match="vocab_size 200"):
        take(loader, 20)


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_glob_matching_nothing_names_source_and_pattern(tmp_path):
    cfg = two_source_config(tmp_path)
    cfg.sources["code"].paths = ["code/*.parquet", "missing/*.jsonl"]
    with pytest.raises(ValueError, match=r"source 'code': pattern 'missing/\*\.jsonl' matches no files"):
        build_data_loader(cfg, ByteTokenizer(), 32, 2, 0, 1, 0)


def test_relative_data_root_not_found_names_the_working_directory(tmp_path, monkeypatch):
    """The bundled sample's data.root is relative: run from elsewhere, the error says where it looked."""
    cfg = two_source_config(tmp_path)
    cfg.root = "data/sample"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"from the working directory {re.escape(str(tmp_path))}, which a relative "
                                         r"data.root='data/sample' is taken from"):
        build_data_loader(cfg, ByteTokenizer(), 32, 2, 0, 1, 0)


def test_missing_text_field_names_field_and_file(tmp_path):
    write_shards(tmp_path, "jsonl", make_docs("doc", 10), num_shards=1)
    with pytest.raises(ValueError, match=r"part-00000\.jsonl: line \d+ has no field 'content'"):
        stream([tmp_path / "part-00000.jsonl"], text_field="content").next()
    write_shards(tmp_path, "parquet", make_docs("doc", 10), num_shards=1)
    with pytest.raises(ValueError, match=r"part-00000\.parquet: no column 'content'"):
        stream([tmp_path / "part-00000.parquet"], text_field="content").next()


def test_a_source_of_empty_documents_stops(tmp_path):
    docs = [{"id": f"e{i}", "text": " " * (i % 3)} for i in range(9)]
    write_shards(tmp_path, "jsonl", docs, num_shards=2)
    with pytest.raises(ValueError, match="source 'doc': no document in two whole epochs"):
        stream(sorted(tmp_path.glob("*.jsonl"))).next()


def _corrupt_shard(tmp_path) -> tuple[Path, list[dict]]:
    docs = make_docs("doc", 6)
    lines = [json.dumps(d) for d in docs]
    lines[2] = '{"id": "doc-0002", "text": "cut off'  # a malformed line
    path = tmp_path / "part-00000.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return path, docs


def test_corrupt_line_is_skipped_with_a_warning(tmp_path):
    path, docs = _corrupt_shard(tmp_path)
    source = stream([path])
    with pytest.warns(RuntimeWarning, match=r"part-00000\.jsonl\.zst: line 3: malformed JSON"):
        got = one_epoch(source)
    assert dict(got) == {k: v for k, v in expected(docs).items() if k != "doc-0002"}
    assert source.state_dict()["skipped"] == 1


def test_on_error_raise_names_file_and_line(tmp_path):
    path, _ = _corrupt_shard(tmp_path)
    with pytest.raises(ValueError, match=r"part-00000\.jsonl\.zst: line 3: malformed JSON.*on_error=raise"):
        one_epoch(stream([path], on_error="raise"))


@pytest.mark.parametrize("fmt", ["jsonl.zst", "json.gz"])
def test_truncated_stream_skips_the_rest_of_the_file(tmp_path, fmt):
    docs = make_docs("doc", 20, max_words=4)
    compress = zstandard.ZstdCompressor().compress if fmt.endswith("zst") else gzip.compress
    intact, cut = (compress("".join(json.dumps(d) + "\n" for d in part).encode()) for part in (docs[:10], docs[10:]))
    path = tmp_path / f"part-00000.{fmt}"
    path.write_bytes(intact + cut[: len(cut) // 2])  # a complete frame, then a download cut short
    source = stream([path])
    with pytest.warns(RuntimeWarning, match=r"part-00000\.json.*: line 1\d: damaged compressed stream"):
        got = dict(one_epoch(source))
    # gzip streams out the cut member's complete lines; zstd stops at the last complete block.
    assert expected(docs[:10]).items() <= got.items() <= expected(docs).items()
    assert source.skipped_seen == 1
    with pytest.raises(ValueError, match=r"damaged compressed stream.*on_error=raise"):
        one_epoch(stream([path], on_error="raise"))


def test_loader_counts_skipped_records(tmp_path):
    path, _ = _corrupt_shard(tmp_path)
    cfg = DataConfig(root=str(tmp_path), sources={"doc": SourceConfig(paths=["*.zst"])}, shuffle_window=2)
    loader = build_data_loader(cfg, ByteTokenizer(), 16, 2, 0, 1, 0)
    with pytest.warns(RuntimeWarning, match="malformed JSON"):
        take(loader, 40)  # a few epochs of the 4 good documents
    assert loader.skipped_records["doc"] >= 2 and loader.state_dict()["slots"][0]["sources"]["doc"]["skipped"] >= 2
    assert loader.source_epochs["doc"] >= 2


# ---------------------------------------------------------------------------------------------------
# The bundled sample


def test_bundled_sample_loads_through_its_yaml(monkeypatch):
    monkeypatch.chdir(REPO)  # the YAML's root is relative to the working directory
    schema = OmegaConf.structured(DataConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(REPO / "conf/data/sample.yaml")))
    assert isinstance(cfg, DataConfig) and isinstance(cfg.sources["web"], SourceConfig)
    cfg.validate()
    assert len(cfg.sources) >= 2
    files = sorted((REPO / cfg.root).rglob("part-*.jsonl.zst"))
    assert len(files) >= 4 and sum(f.stat().st_size for f in files) <= 4_000_000

    tok = build_tokenizer(cfg.tokenizer)
    seq_len, batch_size = 1024, 8
    loader = build_data_loader(cfg, tok, seq_len, batch_size, dp_rank=0, dp_size=1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bundled shards must be clean
        batches = take(loader, 60)
    for b in batches:
        ids, pos, seq = b["input_ids"], b["position_ids"], b["seq_idx"]
        assert ids.shape == (batch_size, seq_len) and 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
        assert torch.equal(b["labels"][:, :-1], ids[:, 1:])
        assert (seq[:, 0] == 0).all() and (seq.diff(dim=1) >= 0).all() and (seq.diff(dim=1) <= 1).all()
        new_doc = seq.diff(dim=1) == 1  # a new document starts at position 0, after an EOS
        assert (pos[:, 1:][new_doc] == 0).all() and (ids[:, :-1][new_doc] == tok.eos_id).all()
        assert (pos.diff(dim=1)[~new_doc] == 1).all()
    tokens = loader.source_tokens
    shares = {name: n / sum(tokens.values()) for name, n in tokens.items()}
    weights = {name: s.weight / sum(x.weight for x in cfg.sources.values()) for name, s in cfg.sources.items()}
    assert all(abs(shares[n] - weights[n]) < 0.03 for n in weights), shares
    assert all(n > 0 for n in loader.source_documents.values())
