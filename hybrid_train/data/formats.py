"""Shard files: finding them, and reading record i of one file.

A record is one line of a JSON-lines shard (plain; zstd as Olmo-Mix and Nemotron-CC ship them; gzip
as Dolma does), one row of a parquet shard (HF datasets), or one document of a token file (a flat
uint16/uint32 array with EOS after every document, Dolma/OLMo style, `*.npy` without a header; its
dtype, tokenizer and document counts come from the `manifest.json` that `scripts/tokenize.py`
writes beside it). Blank and malformed lines are records too, so record indices never depend on
content; they just hold no document.

Readers are addressed by record index, in any order, and are fast for ascending indices: JSON lines
are read sequentially (a backward jump reopens the file), parquet by row group, token files at random.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import zstandard

# Suffix → container. `.json.*` shards hold JSON lines too (olmo-mix-1124 names them so).
FORMATS = {
    ".jsonl": "plain", ".json": "plain",
    ".jsonl.zst": "zstd", ".json.zst": "zstd", ".jsonl.zstd": "zstd", ".json.zstd": "zstd",
    ".jsonl.gz": "gzip", ".json.gz": "gzip",
    ".parquet": "parquet",
    ".npy": "tokens",
}
# What a damaged compressed stream raises.
STREAM_ERRORS = (zstandard.ZstdError, gzip.BadGzipFile, EOFError, zlib.error)
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "hybrid_train.tokens/1"
END = object()  # get(i) past the last record of a file


class StreamDamaged(Exception):
    """A compressed stream broke off at `line` (0-based record index); the records before it are good."""

    def __init__(self, path: str, line: int, cause: BaseException):
        super().__init__(f"{path}: line {line + 1}: damaged compressed stream ({cause})")
        self.path, self.line = path, line


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
            where = ("" if os.path.isabs(full) else
                     f" from the working directory {os.getcwd()}, which a relative data.root={root!r} is taken from")
            raise ValueError(f"source {source!r}: pattern {pattern!r} matches no files (searched {full!r}{where})")
        for path in matches:
            file_format(path)  # fail now, not hours into a run
        files.update(matches)
    return sorted(files)


def training_files(name: str, source, root: str) -> list[str]:
    """The shards a source trains on: its paths' matches less its held-out eval_paths' matches."""
    files = resolve_paths(name, source.paths, root)
    if not source.eval_paths:
        return files
    held_out = set(resolve_paths(name, source.eval_paths, root))
    left = [f for f in files if f not in held_out]
    if not left:
        raise ValueError(f"source {name!r}: every shard of paths {source.paths} is held out by eval_paths "
                         f"{source.eval_paths}; nothing is left to train on")
    return left


# ---------------------------------------------------------------------------------------------------
# JSON lines


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


def _lines(path: str, container: str) -> Iterator[bytes]:
    with open(path, "rb") as raw:
        if container == "zstd":
            yield from _split_lines(_zstd_chunks(raw, path))
        elif container == "gzip":
            yield from gzip.GzipFile(fileobj=raw)
        else:
            yield from raw


class LineReader:
    """Lines of one JSON-lines shard as raw bytes (parsing is the caller's: other slots' lines stay
    unparsed). The line count is learnt on reaching the end; a damaged stream ends the file there."""

    def __init__(self, path: str, container: str):
        self.path, self.container = path, container
        self.count: Optional[int] = None
        self.damage: Optional[StreamDamaged] = None  # set once the end of a damaged file is reached
        self._it: Optional[Iterator[bytes]] = None
        self._line = 0  # index of the line self._it yields next
        self._last: Optional[bytes] = None  # line self._line - 1

    def get(self, i: int) -> Any:
        """Line i, or END when the file has no line i."""
        if self.count is not None and i >= self.count:
            return END
        if i == self._line - 1 and self._last is not None:
            return self._last  # asked twice in a row (a block's first record): no reopening
        if self._it is None or i < self._line:
            self.close()
            self._it, self._line = _lines(self.path, self.container), 0
        try:
            for _ in range(i - self._line):
                next(self._it)
                self._line += 1
            line = next(self._it)
        except StopIteration:
            return self._ended(None)
        except STREAM_ERRORS as err:
            return self._ended(err)
        self._line += 1
        self._last = line
        return line

    def _ended(self, err: Optional[BaseException]) -> Any:
        self.count = self._line
        if err is not None:
            self.damage = StreamDamaged(self.path, self._line, err)
        self.close()
        return END

    def records(self) -> int:
        if self.count is None:
            self.get(1 << 62)  # reads to the end
        return self.count

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # closes the file
            self._it, self._last = None, None


# ---------------------------------------------------------------------------------------------------
# Parquet


class ParquetReader:
    """Rows of one parquet shard as {text_field: ..., "id": ...} dicts, one row group in memory."""

    def __init__(self, path: str, text_field: str):
        import pyarrow.parquet as pq

        self.path = path
        self._file = pq.ParquetFile(path)
        names = self._file.schema_arrow.names
        if text_field not in names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {names}); set the source's text_field")
        self._columns = [text_field] + (["id"] if "id" in names and text_field != "id" else [])
        meta = self._file.metadata
        self._starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self.count = int(self._starts[-1])
        self.damage = None
        self._group, self._table = -1, None

    def get(self, i: int) -> Any:
        if i >= self.count:
            return END
        group = int(np.searchsorted(self._starts, i, side="right")) - 1
        if group != self._group:
            self._group, self._table = group, self._file.read_row_group(group, columns=self._columns)
        row = i - int(self._starts[group])
        return {name: self._table.column(name)[row].as_py() for name in self._columns}

    def records(self) -> int:
        return self.count

    def close(self) -> None:
        self._table, self._group = None, -1


# ---------------------------------------------------------------------------------------------------
# Token files


def read_manifest(folder: Path) -> Optional[dict]:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


class TokenReader:
    """Documents of one token file as integer arrays (without their EOS), memory-mapped."""

    def __init__(self, path: str, dtype: str, eos_id: int, vocab_size: int, documents: Optional[int] = None):
        self.path, self.vocab_size = path, vocab_size
        # A plain ndarray view of the map: slicing an np.memmap makes a memmap object per document.
        self._tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r").view(np.ndarray)
        # Document i spans [_ends[i - 1] + 1, _ends[i]); a trailing run without EOS is a document too.
        step = 1 << 26  # scan in pieces: a whole-file comparison would allocate a byte per token
        ends = np.concatenate([np.flatnonzero(self._tokens[s : s + step] == eos_id) + s
                               for s in range(0, len(self._tokens), step)] or [np.zeros(0, np.int64)])
        if len(ends) == 0 or ends[-1] != len(self._tokens) - 1:
            ends = np.append(ends, len(self._tokens)) if len(self._tokens) else ends
        self._ends = ends
        self.count = len(ends)
        self.damage = None
        if documents is not None and documents != self.count:
            raise ValueError(f"{path}: holds {self.count} documents, its manifest says {documents}; "
                             "the file or the manifest is stale")

    def get(self, i: int) -> Any:
        if i >= self.count:
            return END
        start = int(self._ends[i - 1]) + 1 if i else 0
        ids = self._tokens[start : int(self._ends[i])]  # a view: framing copies it anyway
        if len(ids) and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"{self.path}: document {i} holds token id {int(ids.max())} >= the tokenizer's "
                             f"vocab_size {self.vocab_size}; the file was written with another tokenizer")
        return ids

    def records(self) -> int:
        return self.count

    def close(self) -> None:
        """Nothing to release: the token file is memory-mapped and closes with its last reference."""


# ---------------------------------------------------------------------------------------------------
# Records


class MalformedRecord(ValueError):
    """A JSON line that does not parse to an object (skipped or raised, per data.on_error)."""


class MissingField(ValueError):
    """A record without the text field (always an error: the config names the wrong field)."""


def parse_record(payload: Any, text_field: str) -> Optional[tuple[Optional[str], str]]:
    """(id or None, text) of a JSON line (bytes) or parquet row (dict); None for an empty document."""
    if isinstance(payload, bytes):
        if not payload or payload.isspace():
            return None  # blank line
        try:
            payload = json.loads(payload)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            raise MalformedRecord(f"malformed JSON ({err})") from None
        if not isinstance(payload, dict):
            raise MalformedRecord(f"JSON line is a {type(payload).__name__}, not an object")
    if text_field not in payload:
        raise MissingField(f"has no field {text_field!r} (fields: {sorted(payload)})")
    text = payload[text_field]
    if text is None or (isinstance(text, str) and (not text or text.isspace())):
        return None
    if not isinstance(text, str):
        raise MissingField(f"field {text_field!r} is a {type(text).__name__}, not a string")
    key = payload.get("id")
    return (None if key is None else str(key)), text

