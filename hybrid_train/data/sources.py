"""Streaming documents out of shard files, one data-parallel rank's share, resumable.

Shards are the corpora's own files: JSON lines (plain, zstd as in Olmo-Mix and Nemotron-CC, gzip as
in Dolma) or parquet (HF datasets). Nothing is pre-tokenized or indexed, so a new corpus is a glob.

Rank assignment stripes *records*: within an epoch every record gets a global index (shards in the
epoch's order, records in file order) and rank r owns the records with index % world_size == r. Every
rank decompresses every shard but parses only its own lines; the whole job reads text a few MB/s, so
this costs little, and it balances ranks with any number of shards (even one).

`DocumentSource` is a sequential reader whose position is a few ints; `ShuffledSource` shuffles it
within bounded windows and stores only the window's start position, re-reading the window on resume.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import os
import random
import warnings
import zlib
from typing import Any, Callable, Iterator, Optional

import zstandard

# Suffix → container. `.json.*` shards hold JSON lines too (olmo-mix-1124 names them so).
FORMATS = {
    ".jsonl": "plain", ".json": "plain",
    ".jsonl.zst": "zstd", ".json.zst": "zstd", ".jsonl.zstd": "zstd", ".json.zstd": "zstd",
    ".jsonl.gz": "gzip", ".json.gz": "gzip",
    ".parquet": "parquet",
}
# What a damaged compressed stream raises; the rest of that file is skipped.
STREAM_ERRORS = (zstandard.ZstdError, gzip.BadGzipFile, EOFError, zlib.error)
_END = object()


def file_format(path: str) -> str:
    for suffix in sorted(FORMATS, key=len, reverse=True):  # longest first: .jsonl.zst before .zst
        if path.endswith(suffix):
            return FORMATS[suffix]
    raise ValueError(f"{path}: unsupported shard type; expected one of {sorted(FORMATS)}")


def resolve_paths(source: str, patterns: list[str], root: str) -> list[str]:
    """Files matched by a source's globs (relative ones under root), sorted and deduplicated."""
    files = set()
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else os.path.join(root, pattern)
        matches = [p for p in glob.glob(full, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise ValueError(f"source {source!r}: pattern {pattern!r} matches no files (searched {full!r})")
        for path in matches:
            file_format(path)  # fail now, not hours into a run
        files.update(matches)
    return sorted(files)


def _zstd_chunks(raw: io.BufferedReader, path: str) -> Iterator[bytes]:
    """Decompressed bytes of every frame in a file; a file cut off mid-frame raises ZstdError
    (zstandard's own stream reader returns a truncated frame's beginning without complaint)."""
    dctx = zstandard.ZstdDecompressor()
    frame, in_frame = dctx.decompressobj(), False
    while data := raw.read(1 << 20):
        while data:
            out = frame.decompress(data)
            in_frame = True
            if out:
                yield out
            if not frame.eof:
                break
            data = frame.unused_data  # next frame, if the chunk holds one
            frame, in_frame = dctx.decompressobj(), False
    if in_frame:
        raise zstandard.ZstdError(f"{path} ends in the middle of a zstd frame (truncated file?)")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    pending: list[bytes] = []  # pieces of a line spanning chunks; joined once, not per chunk
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pending.append(chunk[start:end])
            yield b"".join(pending)
            pending, start = [], end + 1
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        yield b"".join(pending)


def _json_lines(path: str, container: str, start: int) -> Iterator[bytes]:
    """Raw lines from line `start` on; parsing is left to the caller so other ranks' lines are free."""
    with open(path, "rb") as raw:
        if container == "zstd":
            lines = _split_lines(_zstd_chunks(raw, path))
        elif container == "gzip":
            lines = gzip.GzipFile(fileobj=raw)
        else:
            lines = raw
        yield from itertools.islice(lines, start, None)


def _parquet_rows(path: str, start: int, text_field: str, owns: Callable[[int], bool]) -> Iterator[Optional[dict]]:
    """Rows from `start` on, one row group in memory at a time: a dict for rows this rank owns, None
    for the others (they are not converted to Python)."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {names}); set the source's text_field")
    columns = [text_field] + (["id"] if "id" in names and text_field != "id" else [])
    first = 0  # file row index of the group's first row
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        lo = max(start - first, 0)
        if lo < size:
            mine = [i for i in range(lo, size) if owns(first + i)]
            rows = iter(parquet.read_row_group(group, columns=columns).take(mine).to_pylist() if mine else [])
            for i in range(lo, size):
                yield next(rows) if owns(first + i) else None
        first += size


class DocumentSource:
    """Endless stream of `(doc_key, text)` of one rank, epoch after epoch.

    Shards are sorted, then shuffled per epoch with `seed`. `doc_key` is the record's `id` when it has
    one, else "path:record". Empty documents are skipped; malformed JSON lines and damaged compressed
    streams are skipped with a warning and counted in `skipped_records`. Messages number records from
    1 as "line N" (for parquet, the row).
    """

    def __init__(self, name: str, files: list[str], text_field: str = "text",
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if not files:
            raise ValueError(f"source {name!r} has no files")
        if not 0 <= rank < world_size:
            raise ValueError(f"source {name!r}: rank {rank} is outside world size {world_size}")
        self.name, self.text_field = name, text_field
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.files = sorted(files)
        self.formats = [file_format(f) for f in self.files]
        self.epoch = 0  # epoch of the last document returned
        self.file_index = 0  # position in this epoch's shard order
        self.record = 0  # next record (line or row) of the current file
        self.epoch_record = 0  # records of this epoch before the current position, all ranks'
        self.epoch_documents = 0  # documents this rank returned in this epoch
        self.skipped_records = 0
        self._order = self._shard_order(0)
        self._reader: Optional[Iterator[Any]] = None

    def _shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.files)))
        random.Random(f"{self.name}:{self.seed}:{epoch}").shuffle(order)  # same on every rank
        return order

    def _open(self, path: str, container: str) -> Iterator[Any]:
        if container == "parquet":
            file_start = self.epoch_record - self.record  # epoch index of the file's row 0
            owns = lambda row: (file_start + row) % self.world_size == self.rank  # noqa: E731
            return _parquet_rows(path, self.record, self.text_field, owns)
        return _json_lines(path, container, self.record)

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()  # generators close their files
            self._reader = None

    def __iter__(self) -> "DocumentSource":
        return self

    def __next__(self) -> tuple[str, str]:
        while True:
            if self.file_index == len(self.files):
                if self.epoch_documents == 0:
                    raise ValueError(
                        f"source {self.name!r}: a whole epoch over {len(self.files)} files gave rank "
                        f"{self.rank} of {self.world_size} no documents; the source is too small or empty"
                    )
                self.epoch, self.file_index, self.epoch_record, self.epoch_documents = self.epoch + 1, 0, 0, 0
                self._order = self._shard_order(self.epoch)
            index = self._order[self.file_index]
            path = self.files[index]
            if self._reader is None:
                self._reader = self._open(path, self.formats[index])
            try:
                raw = next(self._reader, _END)
            except STREAM_ERRORS as err:
                self._warn(path, self.record, f"damaged compressed stream, rest of file skipped ({err})")
                raw = _END
            if raw is _END:
                self._close()
                self.file_index, self.record = self.file_index + 1, 0
                continue
            record, owned = self.record, self.epoch_record % self.world_size == self.rank
            self.record, self.epoch_record = self.record + 1, self.epoch_record + 1
            if owned and (doc := self._document(raw, path, record)) is not None:
                self.epoch_documents += 1
                return doc

    def _warn(self, path: str, record: int, what: str) -> None:
        self.skipped_records += 1
        warnings.warn(f"source {self.name!r}: {path}: line {record + 1}: {what}", RuntimeWarning, stacklevel=3)

    def _document(self, raw: Any, path: str, record: int) -> Optional[tuple[str, str]]:
        if isinstance(raw, bytes):
            if not raw or raw.isspace():
                return None  # blank line
            try:
                raw = json.loads(raw)
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                self._warn(path, record, f"malformed JSON skipped ({err})")
                return None
            if not isinstance(raw, dict):
                self._warn(path, record, f"JSON line is a {type(raw).__name__}, not an object; skipped")
                return None
        if self.text_field not in raw:
            raise ValueError(
                f"source {self.name!r}: {path}: line {record + 1} has no field {self.text_field!r} "
                f"(fields: {sorted(raw)}); set the source's text_field"
            )
        text = raw[self.text_field]
        if text is None or (isinstance(text, str) and (not text or text.isspace())):
            return None
        if not isinstance(text, str):
            raise ValueError(f"source {self.name!r}: {path}: line {record + 1}: field {self.text_field!r} "
                             f"is a {type(text).__name__}, not a string")
        key = raw.get("id")
        return (str(key) if key is not None else f"{path}:{record}"), text

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "file_index": self.file_index, "record": self.record,
            "epoch_record": self.epoch_record, "epoch_documents": self.epoch_documents,
            "skipped_records": self.skipped_records, "num_files": len(self.files),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_files"] != len(self.files):
            raise ValueError(f"source {self.name!r}: state is for {state['num_files']} files, "
                             f"the globs now match {len(self.files)}")
        self._close()  # reopened lazily, skipping to `record`
        for key in ("epoch", "file_index", "record", "epoch_record", "epoch_documents", "skipped_records"):
            setattr(self, key, state[key])
        self._order = self._shard_order(self.epoch)


class ShuffledSource:
    """Shuffles a source within consecutive windows of `window` documents (bounded memory).

    The state is the inner source's position at the window's start plus how many of the window's
    documents were served; resuming re-reads and re-shuffles that window, so a checkpoint never holds text.
    """

    def __init__(self, source: DocumentSource, window: int, seed: int):
        if window < 1:
            raise ValueError(f"shuffle window must be >= 1, got {window}")
        self.source, self.window, self.seed = source, window, seed
        self._window_index, self._served = 0, 0
        self._window_start = source.state_dict()
        self._buffer: Optional[list[tuple[str, str]]] = None
        self._rewind = False  # after load_state_dict the inner source must go back to the window start

    def __iter__(self) -> "ShuffledSource":
        return self

    def __next__(self) -> tuple[str, str]:
        if self._buffer is None:
            if self._rewind:
                self.source.load_state_dict(self._window_start)
                self._rewind = False
            self._buffer = [next(self.source) for _ in range(self.window)]
            rng = random.Random(f"{self.source.name}:{self.seed}:{self.source.rank}:{self._window_index}")
            rng.shuffle(self._buffer)
        doc = self._buffer[self._served]
        self._served += 1
        if self._served == self.window:
            self._window_index, self._served, self._buffer = self._window_index + 1, 0, None
            self._window_start = self.source.state_dict()
        return doc

    def state_dict(self) -> dict:
        return {"window": self._window_index, "served": self._served, "window_start": dict(self._window_start)}

    def load_state_dict(self, state: dict) -> None:
        self._window_index, self._served = state["window"], state["served"]
        self._window_start = dict(state["window_start"])
        self._buffer, self._rewind = None, True
