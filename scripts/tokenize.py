"""Tokenize raw text shards into token files the loader memory-maps (Dolma/OLMo style).

Every input shard (`*.jsonl`, `*.jsonl.zst`, `*.json.zst`, `*.json.gz`, `*.parquet`, ...) becomes one
flat array `part-NNNNN.npy` of uint16 (vocab <= 65536) or uint32 token ids, each document followed by
EOS, no header. `manifest.json` beside them records the tokenizer (path, fingerprint, vocab size, EOS,
BOS), the dtype and, per file, its source shard, documents and tokens; the loader checks it against the
run's tokenizer. Shards are tokenized in parallel, one process per shard at a time.

    python scripts/tokenize.py --tokenizer path/to/tokenizer.json --out data/tok/web 'data/raw/web/*.jsonl.zst'

Then point a source at the token files: `paths: ["tok/web/*.npy"]`.
"""

from __future__ import annotations

import os
import sys

if __name__ == "tokenize":
    # This file's name is the standard library's `tokenize`: when any script in scripts/ runs, this
    # folder is first on sys.path and `import tokenize` (by linecache, inspect, warnings) lands here.
    # Put the real module in our place, and define nothing else (the imports below stay lazy).
    import importlib.util
    import sysconfig

    _spec = importlib.util.spec_from_file_location(
        "tokenize", os.path.join(sysconfig.get_paths()["stdlib"], "tokenize.py"))
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["tokenize"] = _real  # what the import statement returns once this file has run
    _spec.loader.exec_module(_real)
elif sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])  # run as a script: the repository root instead

BATCH_DOCS = 256  # documents per encode_batch call


def token_dtype(vocab_size: int) -> str:
    """uint16 while every id fits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenize_file(src: str, dst: str, tokenizer_spec: str, text_field: str, on_error: str) -> dict:
    """Tokenize one shard into `dst`; returns its manifest entry."""
    import warnings

    import numpy as np

    from hybrid_train.data.formats import END, LineReader, MalformedRecord, ParquetReader, file_format, parse_record
    from hybrid_train.data.tokenizer import build_tokenizer

    tok = build_tokenizer(tokenizer_spec)
    dtype = np.dtype(token_dtype(tok.vocab_size))
    fmt = file_format(src)
    if fmt == "tokens":
        raise ValueError(f"{src} is a token file already")
    reader = ParquetReader(src, text_field) if fmt == "parquet" else LineReader(src, fmt)
    stats = {"source": src, "documents": 0, "tokens": 0, "skipped": 0}
    tmp = dst + ".tmp"
    with open(tmp, "wb") as out:
        def flush(texts: list[str]) -> None:
            for ids in tok.encode_batch(texts):
                framed = np.append(ids.astype(dtype), np.array([tok.eos_id], dtype=dtype))
                out.write(framed.tobytes())
                stats["documents"] += 1
                stats["tokens"] += len(framed)

        texts, line = [], 0
        while (payload := reader.get(line)) is not END:
            try:
                parsed = parse_record(payload, text_field)
            except MalformedRecord as err:
                if on_error == "raise":
                    raise ValueError(f"{src}: line {line + 1}: {err}") from None
                warnings.warn(f"{src}: line {line + 1}: {err}; skipped", RuntimeWarning, stacklevel=1)
                stats["skipped"] += 1
                parsed = None
            except ValueError as err:  # the text field is missing: the wrong field for this corpus
                raise ValueError(f"{src}: line {line + 1} {err}; pass --text-field") from None
            if parsed is not None:
                texts.append(parsed[1])
                if len(texts) == BATCH_DOCS:
                    flush(texts)
                    texts = []
            line += 1
        flush(texts)
    if reader.damage is not None:
        if on_error == "raise":
            os.unlink(tmp)
            raise ValueError(str(reader.damage))
        warnings.warn(f"{reader.damage}; rest of the file skipped", RuntimeWarning, stacklevel=1)
        stats["skipped"] += 1
    os.replace(tmp, dst)
    return stats


def main(argv: list[str] | None = None) -> None:
    import argparse
    import glob
    import json
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from pathlib import Path

    from tqdm import tqdm

    from hybrid_train.data.formats import MANIFEST, MANIFEST_FORMAT
    from hybrid_train.data.tokenizer import build_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="shard files or glob patterns (quote them)")
    parser.add_argument("--out", required=True, help="output folder (token files and manifest.json)")
    parser.add_argument("--tokenizer", required=True, help='"byte", a tokenizer.json, or a folder holding one')
    parser.add_argument("--text-field", default="text", help="JSON key / parquet column of the text")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                        help="malformed JSON line or damaged stream: skip with a warning, or stop")
    args = parser.parse_args(argv)

    files = sorted({p for pattern in args.inputs for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)})
    if not files:
        raise SystemExit(f"no input files match {args.inputs}")
    tok = build_tokenizer(args.tokenizer)  # fail before starting workers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"part-{i:05d}.npy" for i in range(len(files))]
    jobs = [(src, str(out / name), args.tokenizer, args.text_field, args.on_error) for src, name in zip(files, names)]
    bar = tqdm(total=len(jobs), unit="file", desc="tokenize")
    entries, total = {}, 0
    workers = max(1, min(args.workers, len(files)))
    if workers == 1:
        results = ((name, tokenize_file(*job)) for name, job in zip(names, jobs))  # no pool to start
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        futures = {pool.submit(tokenize_file, *job): name for name, job in zip(names, jobs)}
        results = ((futures[f], f.result()) for f in as_completed(futures))
    for name, entry in results:
        entries[name] = entry
        total += entry["tokens"]
        bar.update()
        bar.set_postfix(tokens=f"{total:,}")
    bar.close()
    if workers > 1:
        pool.shutdown()
    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": args.tokenizer,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "dtype": token_dtype(tok.vocab_size),
        "text_field": args.text_field,
        "documents": sum(e["documents"] for e in entries.values()),
        "tokens": sum(e["tokens"] for e in entries.values()),
        "files": {name: entries[name] for name in names},
    }
    (out / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(out / (MANIFEST + ".tmp"), out / MANIFEST)
    print(f"{manifest['documents']:,} documents, {manifest['tokens']:,} tokens ({manifest['dtype']}) "
          f"in {len(files)} file(s) -> {out}")


if __name__ == "__main__":
    main()
