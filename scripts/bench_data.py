"""Data loader throughput and memory, one process: raw zstd JSON lines with a real BPE, and token files.

1. Trains a byte-level BPE (Llama-3 style: byte-level pre-tokenizer, <|begin_of_text|> and
   <|end_of_text|>) on the bundled sample with `tokenizers`, at --vocab (default Llama-3's 128256; a
   small corpus can run out of merges first: the size reached is printed), or takes --tokenizer.
2. Raw path: the sample mixture (web + code, *.jsonl.zst) through the loader at Bamba's row shape
   (seq_len 4096, micro-batch 2): decompress, parse, tokenize, mix, pack.
3. Pre-tokenized path: the same shards through scripts/tokenize.py, then the loader on the token files.

Reports tokens/s of the trainer process (steady state, after a warm-up) and its resident memory.

    python scripts/bench_data.py [--vocab 128256] [--seconds 20] [--workers 0]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402
import copy  # noqa: E402
import glob  # noqa: E402
import importlib.util  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from hybrid_train.data import DataConfig, SourceConfig, build_data_loader, build_tokenizer  # noqa: E402
from hybrid_train.data.formats import END, LineReader, file_format, parse_record  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sample_texts(root: Path):
    for path in sorted(glob.glob(str(root / "*" / "*.jsonl.zst"))):
        reader, i = LineReader(path, file_format(path)), 0
        while (payload := reader.get(i)) is not END:
            parsed = parse_record(payload, "text")
            if parsed:
                yield parsed[1]
            i += 1


def train_bpe(root: Path, vocab: int, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample_texts(root), trainer)
    path = out / "tokenizer.json"
    tok.save(str(path))
    return path


def join_documents(src: Path, dst: Path, eos_id: int, k: int) -> None:
    """Copy a token-file folder keeping only every k-th EOS (k documents become one)."""
    import json

    import numpy as np

    dst.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((src / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        tokens = np.fromfile(src / name, dtype=manifest["dtype"])
        ends = np.flatnonzero(tokens == eos_id)
        keep = np.ones(len(tokens), dtype=bool)
        keep[ends[(np.arange(len(ends)) + 1) % k != 0][:-1] if len(ends) else []] = False
        if len(ends):
            keep[ends[-1]] = True  # every file still ends with an EOS
        joined = tokens[keep]
        joined.tofile(dst / name)
        entry.update(documents=int((joined == eos_id).sum()), tokens=len(joined))
    (dst / "manifest.json").write_text(json.dumps(manifest))


def measure(cfg: DataConfig, tokenizer, seconds: float, workers: int) -> dict:
    before = rss_mb()
    loader = build_data_loader(cfg, tokenizer, 4096, 2, 0, 1, seed=0, num_workers=workers)
    for _ in range(5):  # warm-up: first files opened, worker processes started
        next(loader)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(loader)
        tokens += batch["input_ids"].numel()
    elapsed = time.perf_counter() - start
    docs = sum(loader.source_documents.values())
    result = {"tokens_per_s": tokens / elapsed, "tokens": tokens, "rss_mb": rss_mb(),
              "rss_growth_mb": rss_mb() - before,
              "tokens_per_document": sum(loader.source_tokens.values()) / max(docs, 1)}
    loader.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256, help="BPE vocabulary size to train")
    parser.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per path")
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers for both paths")
    args = parser.parse_args()

    sample = REPO / "data" / "sample"
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    if args.tokenizer:
        tok_path = Path(args.tokenizer)
    else:
        start = time.perf_counter()
        tok_path = train_bpe(sample, args.vocab, work)
        print(f"trained BPE in {time.perf_counter() - start:.0f}s")
    tokenizer = build_tokenizer(str(tok_path))
    print(f"tokenizer {tok_path}: vocab {tokenizer.vocab_size}")

    raw_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig),
                                                  OmegaConf.load(REPO / "conf/data/sample.yaml")))
    raw_cfg.root, raw_cfg.tokenizer = str(sample), str(tok_path)
    raw = measure(raw_cfg, tokenizer, args.seconds, args.workers)
    print(f"raw jsonl.zst + BPE: {raw['tokens_per_s']:,.0f} tokens/s, RSS {raw['rss_mb']:.0f} MB "
          f"(+{raw['rss_growth_mb']:.0f} MB), {raw['tokens_per_document']:.0f} tokens/document")

    spec = importlib.util.spec_from_file_location("tokenize_script", REPO / "scripts" / "tokenize.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules["tokenize_script"] = script
    spec.loader.exec_module(script)
    tok_cfg = copy.deepcopy(raw_cfg)
    tok_cfg.root = str(work / "tokens")
    for name in raw_cfg.sources:
        start = time.perf_counter()
        script.main([str(sample / name / "*.jsonl.zst"), "--out", str(work / "tokens" / name),
                     "--tokenizer", str(tok_path), "--workers", "2"])
        print(f"tokenize.py {name}: {time.perf_counter() - start:.1f}s")
        tok_cfg.sources[name] = SourceConfig(paths=[f"{name}/*.npy"], weight=raw_cfg.sources[name].weight)
    pre = measure(tok_cfg, tokenizer, args.seconds, args.workers)
    print(f"token files: {pre['tokens_per_s']:,.0f} tokens/s, RSS {pre['rss_mb']:.0f} MB "
          f"(+{pre['rss_growth_mb']:.0f} MB), {pre['tokens_per_document']:.0f} tokens/document")

    # The sample's documents are short (~120 tokens); web corpora average ~1,000. The same tokens with
    # every 8 consecutive documents joined into one show the per-token cost at such lengths.
    joined_cfg = copy.deepcopy(tok_cfg)
    joined_cfg.root = str(work / "joined")
    for name in raw_cfg.sources:
        join_documents(work / "tokens" / name, work / "joined" / name, tokenizer.eos_id, 8)
    joined = measure(joined_cfg, tokenizer, args.seconds, args.workers)
    print(f"token files, 8 documents joined: {joined['tokens_per_s']:,.0f} tokens/s, RSS {joined['rss_mb']:.0f} MB, "
          f"{joined['tokens_per_document']:.0f} tokens/document")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"workdir {work}")


if __name__ == "__main__":
    main()
