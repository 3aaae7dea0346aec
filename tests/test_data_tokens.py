"""Token files: scripts/tokenize.py end to end, the loader reading them, and the checks that keep
tokens of another tokenizer (or a broken file) out of training."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hybrid_train.data import ByteTokenizer, DataConfig, SourceConfig, build_data_loader, build_tokenizer
from test_data import _tiny_hf_tokenizer, expected, make_docs, write_shards
from test_data_resume import serve_epoch_zero

REPO = Path(__file__).resolve().parents[1]


def tokenize_script():
    """scripts/tokenize.py as a module (its file name would shadow the stdlib's on sys.path)."""
    if "tokenize_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tokenize_script", REPO / "scripts" / "tokenize.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["tokenize_script"] = module  # its worker processes find tokenize_file by this name
        spec.loader.exec_module(module)
    return sys.modules["tokenize_script"]


def raw_corpus(tmp_path: Path) -> tuple[Path, list[dict]]:
    docs = make_docs("doc", 60, seed=7, max_words=25)
    raw = tmp_path / "raw"
    write_shards(raw, "jsonl.zst", docs[:35], num_shards=2)
    write_shards(raw, "parquet", docs[35:], num_shards=2)
    with open(raw / "part-00000.jsonl.zst", "ab") as f:  # a second zstd frame holding a malformed line
        import zstandard

        f.write(zstandard.ZstdCompressor().compress(b'{"id": "broken", "text": \n'))
    return raw, docs


def token_config(folder: Path, **source) -> DataConfig:
    return DataConfig(root=str(folder), sources={"doc": SourceConfig(paths=["*.npy"], **source)}, shuffle_window=4)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_tokenize_script_round_trip(tmp_path, tokenizer):
    raw, docs = raw_corpus(tmp_path)
    spec = "byte"
    if tokenizer == "bpe":
        _tiny_hf_tokenizer(tmp_path / "tokenizer.json", ["<s>", "</s>"])
        spec = str(tmp_path / "tokenizer.json")
    tok = build_tokenizer(spec)
    out = tmp_path / "tok"
    if tokenizer == "byte":
        with pytest.warns(RuntimeWarning, match=r"part-00000\.jsonl\.zst: line 19: malformed JSON"):
            tokenize_script().main([str(raw / "*"), "--out", str(out), "--tokenizer", spec, "--workers", "1"])
    else:  # a process per shard: their warnings go to their own stderr
        tokenize_script().main([str(raw / "*"), "--out", str(out), "--tokenizer", spec, "--workers", "2"])
    manifest = json.loads((out / "manifest.json").read_text())
    texts = list(expected(docs).values())
    assert manifest["documents"] == len(texts) and len(manifest["files"]) == 4
    assert manifest["vocab_size"] == tok.vocab_size and manifest["dtype"] == "uint16"
    assert manifest["tokenizer_fingerprint"] == tok.fingerprint
    assert sum(e["skipped"] for e in manifest["files"].values()) == 1
    arrays = [np.fromfile(out / name, dtype=np.uint16) for name in sorted(manifest["files"])]
    assert manifest["tokens"] == sum(len(a) for a in arrays)
    flat = np.concatenate(arrays)
    ends = np.flatnonzero(flat == tok.eos_id)
    pieces = np.split(flat, ends + 1)[:-1]
    assert sorted(tok.decode(p[:-1].tolist()) for p in pieces) == sorted(texts)

    # One epoch through the loader serves each tokenized document once (BOS framing on top).
    cfg = token_config(out, max_epochs=None)
    cfg.add_bos = True
    loader = build_data_loader(cfg, tok, 16, 2, 0, 1, seed=1)
    served = Counter()
    serve_epoch_zero(loader, served)
    assert len(served) == len(texts) and set(served.values()) == {1}


def test_tokenize_script_on_error_raise(tmp_path):
    raw, _ = raw_corpus(tmp_path)
    with pytest.raises(ValueError, match=r"part-00000\.jsonl\.zst: line 19: malformed JSON"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenize_script().main([str(raw / "*.zst"), "--out", str(tmp_path / "t"), "--tokenizer", "byte",
                                    "--workers", "1", "--on-error", "raise"])


def _byte_token_files(tmp_path: Path) -> Path:
    out = tmp_path / "tok"
    raw = tmp_path / "raw"
    write_shards(raw, "jsonl", make_docs("doc", 20, seed=3), num_shards=2)
    tokenize_script().main([str(raw / "*"), "--out", str(out), "--tokenizer", "byte", "--workers", "1"])
    return out


def test_token_files_of_another_tokenizer_are_refused(tmp_path):
    out = _byte_token_files(tmp_path)
    _tiny_hf_tokenizer(tmp_path / "tokenizer.json", ["<s>", "</s>"])
    other = build_tokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tok/manifest\.json has vocab_size=258, this run's tokenizer has \d+"):
        build_data_loader(token_config(out), other, 16, 2, 0, 1, 0)

    manifest = json.loads((out / "manifest.json").read_text())
    # Same vocabulary size and EOS, other tokens: only the fingerprint tells them apart.
    (out / "manifest.json").write_text(json.dumps({**manifest, "tokenizer_fingerprint": "0123456789abcdef"}))
    with pytest.raises(ValueError, match=r"tokenizer_fingerprint='0123456789abcdef', this run's tokenizer has 'byte'"):
        build_data_loader(token_config(out), ByteTokenizer(), 16, 2, 0, 1, 0)
    manifest["files"]["part-00000.npy"]["documents"] += 1  # stale manifest
    (out / "manifest.json").write_text(json.dumps(manifest))
    loader = build_data_loader(token_config(out), ByteTokenizer(), 16, 2, 0, 1, 0)
    with pytest.raises(ValueError, match=r"part-00000\.npy: holds \d+ documents, its manifest says"):
        for _ in range(50):
            next(loader)


def test_token_file_checks_without_manifest(tmp_path):
    folder = tmp_path / "olmo"
    folder.mkdir()
    rng = np.random.default_rng()
    ids = rng.integers(0, 256, size=200).astype(np.uint16)
    ids[rng.choice(200, size=12, replace=False)] = ByteTokenizer.eos_id
    ids[-1] = ByteTokenizer.eos_id
    ids.tofile(folder / "part-0.npy")
    with pytest.raises(ValueError, match=r"source 'doc': .*part-0\.npy has no manifest\.json .*token_dtype"):
        build_data_loader(token_config(folder), ByteTokenizer(), 16, 2, 0, 1, 0)
    loader = build_data_loader(token_config(folder, token_dtype="uint16"), ByteTokenizer(), 16, 2, 0, 1, 0)
    batch = next(loader)
    assert int(batch["input_ids"].max()) <= ByteTokenizer.eos_id

    ids[5] = 300  # an id past the byte tokenizer's vocabulary
    ids.tofile(folder / "part-0.npy")
    loader = build_data_loader(token_config(folder, token_dtype="uint16"), ByteTokenizer(), 16, 2, 0, 1, 0)
    with pytest.raises(ValueError, match=r"olmo/part-0\.npy: document \d+ holds token id 300 >= .* vocab_size 258"):
        for _ in range(20):
            next(loader)
