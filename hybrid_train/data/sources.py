"""One slot's stream of tokenized documents from one source, epoch after epoch, resumable.

Epoch e visits the source's files in an order shuffled with (seed, source, e), records in file order.
Its positions come in blocks of `shuffle_window`: position b*w + i holds record b*w + perm(i), perm a
permutation of range(w) seeded with (seed, source, e, b); positions whose record would lie past the
last one are empty. So the shuffle is a fixed function of the position, the same in every slot, and a
position needs no buffer to be resumed. Which positions this slot serves is its `Cursor`
(positions.py); the state is that cursor plus the per-file record counts learnt so far.

Reading ahead is per block: the slot's positions in the next block are fetched in record order
(sequential for JSON lines), parsed, tokenized in one batch, and queued with the cursor as it will be
once each document has been taken. Empty documents are skipped; a malformed JSON line or a damaged
compressed stream is skipped with a warning and counted (or raises, with on_error="raise"); a record
without the text field raises, naming the field and the file.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import warnings
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np

from .config import SourceConfig
from .formats import (END, LineReader, MalformedRecord, MissingField, ParquetReader, TokenReader, file_format,
                      parse_record, read_manifest)
from .positions import Cursor

OPEN_FILES = 4  # readers kept open per source (a sequential reader per file being read)


class DataExhausted(RuntimeError):
    """A source with max_epochs has served all of its epochs."""


class Document(NamedTuple):
    source: str
    key: str  # the record's "id", else "path:record"
    epoch: int
    ids: np.ndarray  # token ids, without BOS/EOS


def _seed(*parts: Any) -> int:
    """A stable integer seed from any parts (Python's hash() of a str changes per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class SourceStream:
    def __init__(self, name: str, cfg: SourceConfig, files: list[str], tokenizer, *, window: int,
                 seed: int, on_error: str, cursor: Cursor, root: str = "."):
        if not files:
            raise ValueError(f"source {name!r} has no files")
        self.name, self.cfg, self.tokenizer = name, cfg, tokenizer
        self.window, self.seed, self.on_error, self.root = window, seed, on_error, root
        self.files = list(files)
        self.formats = [file_format(f) for f in self.files]
        self._names = [os.path.relpath(f, root) for f in self.files]  # for document keys, made once
        self._token_specs = self._check_token_files()
        self.file_records = [-1] * len(self.files)  # record count per file, -1 until learnt
        self.records: Optional[int] = None  # records per epoch, once every file is counted
        self.skipped = 0  # skipped records before the cursor (part of the state)
        self.cursor = cursor  # what the consumer has taken
        self._ahead = cursor.copy()  # what has been read ahead
        self.skipped_seen = 0  # skipped records read so far, read-ahead included
        self._ready: deque = deque()  # (Document, cursor index, cursor next, skipped)
        self._readers: OrderedDict[int, Any] = OrderedDict()
        self._starts: dict[int, list[int]] = {}  # epoch → known start record of each file in its order
        self._orders: dict[int, list[int]] = {}
        self._reported: set[int] = set()  # files whose damage was reported by this stream
        self._last_document = cursor.peek()  # position near the last document read: stops a source of nothing

    # --- positions and records ---------------------------------------------------------------------

    @property
    def period(self) -> Optional[int]:
        """Positions per epoch: records rounded up to whole shuffle windows."""
        return None if self.records is None else -(-self.records // self.window) * self.window

    def _locate(self, position: int) -> tuple[int, int]:
        """(epoch, position within it); epoch 0 until the record count is known."""
        return (0, position) if self.period is None else divmod(position, self.period)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
                self._starts.pop(min(self._starts), None)
            rng = np.random.default_rng(_seed("files", self.name, self.seed, epoch))
            self._orders[epoch] = [int(i) for i in rng.permutation(len(self.files))]
        return self._orders[epoch]

    def _reader(self, index: int):
        if index in self._readers:
            self._readers.move_to_end(index)
            return self._readers[index]
        path, fmt = self.files[index], self.formats[index]
        known = self.file_records[index]
        if fmt == "parquet":
            reader = ParquetReader(path, self.cfg.text_field)
        elif fmt == "tokens":
            dtype, documents = self._token_specs[index]
            reader = TokenReader(path, dtype, self.tokenizer.eos_id, self.tokenizer.vocab_size, documents)
        else:
            reader = LineReader(path, fmt)
            if known >= 0:
                reader.count = known  # learnt before (maybe by another slot): no reading past it
        self._readers[index] = reader
        if len(self._readers) > OPEN_FILES:
            self._readers.popitem(last=False)[1].close()
        return reader

    def _record(self, epoch: int, record: int) -> Any:
        """(file index, line, payload) of record `record` of `epoch`, or END past the last record."""
        order = self._order(epoch)
        starts = self._starts.setdefault(epoch, [0])  # start record of the files in order, as learnt
        k = min(bisect.bisect_right(starts, record) - 1, len(order))
        while True:
            if k == len(order):
                self._learn_total(starts[k])
                return END
            index = order[k]
            count = self.file_records[index]
            if count < 0 and self.formats[index] in ("parquet", "tokens"):
                count = self.file_records[index] = self._reader(index).records()  # cheap: metadata or index
            if count >= 0:
                if len(starts) == k + 1:
                    starts.append(starts[k] + count)
                if record >= starts[k + 1]:
                    k += 1
                    continue
            reader = self._reader(index)
            payload = reader.get(record - starts[k])
            if payload is END:  # a JSON-lines file ended before `record`: its count is known now
                self.file_records[index] = reader.records()
                self._report_damage(index, reader)
                continue
            return index, record - starts[k], payload

    def _learn_total(self, total: int) -> None:
        if total == 0:
            raise ValueError(f"source {self.name!r}: its {len(self.files)} file(s) hold no records")
        if self.records is not None and self.records != total:
            raise ValueError(f"source {self.name!r}: files now hold {total} records, earlier {self.records}; "
                             "the shards changed during the run")
        self.records = total

    def _report_damage(self, index: int, reader) -> None:
        if reader.damage is None or index in self._reported:
            return
        self._reported.add(index)
        if self.on_error == "raise":
            raise ValueError(f"source {self.name!r}: {reader.damage} (data.on_error=raise)")
        self.skipped_seen += 1
        warnings.warn(f"source {self.name!r}: {reader.damage}; rest of the file skipped", RuntimeWarning, stacklevel=2)

    # --- documents ---------------------------------------------------------------------------------

    def next(self) -> Document:
        """The next document; the cursor moves past it."""
        while not self._ready:
            self._read_block()
        document, index, nxt, skipped = self._ready.popleft()
        self.cursor.index, self.cursor.next, self.skipped = index, nxt, skipped
        return document

    def _read_block(self) -> None:
        w = self.window
        while True:
            epoch, offset = self._locate(self._ahead.peek())
            if self.cfg.max_epochs is not None and epoch >= self.cfg.max_epochs:
                raise DataExhausted(
                    f"source {self.name!r} has served its {self.cfg.max_epochs} epoch(s) "
                    f"(data.sources.{self.name}.max_epochs); raise it or set it to null to repeat the source")
            block = offset // w
            # With the record count unknown, a block must start before the last record to be in epoch 0.
            if self.period is None and self._record(0, block * w) is END:
                continue  # the count is known now: locate again
            break
        group = []  # (position, record, cursor index and next after it)
        perm = np.random.default_rng(_seed("block", self.name, self.seed, epoch, block)).permutation(w)
        while True:
            e, o = self._locate(self._ahead.peek())
            if (e, o // w) != (epoch, block):
                break
            self._ahead.advance()
            group.append((block * w + int(perm[o % w]), self._ahead.index, self._ahead.next))
        payloads = {}
        for record in sorted(r for r, _, _ in group):
            payloads[record] = self._record(epoch, record)
        texts, pending = [], []
        for record, index, nxt in group:
            payload = payloads[record]
            parsed = None if payload is END else self._parse(*payload, epoch)
            if parsed is not None:
                self._last_document = self._ahead.peek()
                pending.append((parsed, index, nxt, self.skipped_seen))
                if isinstance(parsed[1], str):
                    texts.append(parsed[1])
        if self.period is not None and self._ahead.peek() - self._last_document > 2 * self.period:
            raise ValueError(f"source {self.name!r}: no document in two whole epochs; every record is empty")
        encoded = iter(self.tokenizer.encode_batch(texts) if texts else [])
        for (key, content), index, nxt, skipped in pending:
            ids = next(encoded) if isinstance(content, str) else content
            self._ready.append((Document(self.name, key, epoch, ids), index, nxt, skipped))

    def _parse(self, index: int, line: int, payload: Any, epoch: int) -> Optional[tuple[str, Any]]:
        """(key, text or token ids) of a record, or None for an empty or skipped one."""
        path = self.files[index]
        if isinstance(payload, np.ndarray):
            return (f"{self._names[index]}:{line}", payload) if len(payload) else None
        try:
            parsed = parse_record(payload, self.cfg.text_field)
        except MalformedRecord as err:
            return self._skip(path, line, str(err))
        except MissingField as err:
            raise ValueError(f"source {self.name!r}: {path}: line {line + 1} {err}; "
                             f"set data.sources.{self.name}.text_field") from None
        if parsed is None:
            return None
        key, text = parsed
        return (key if key is not None else f"{self._names[index]}:{line}"), text

    def _skip(self, path: str, line: int, what: str) -> None:
        if self.on_error == "raise":
            raise ValueError(f"source {self.name!r}: {path}: line {line + 1}: {what} (data.on_error=raise)")
        self.skipped_seen += 1
        warnings.warn(f"source {self.name!r}: {path}: line {line + 1}: {what}; skipped", RuntimeWarning, stacklevel=3)
        return None

    # --- token files -------------------------------------------------------------------------------

    def _check_token_files(self) -> dict[int, tuple[str, Optional[int]]]:
        """dtype and document count of every token file, checked against this run's tokenizer now
        (tokens from another tokenizer would train on garbage without any error)."""
        specs, manifests = {}, {}
        for index, path in enumerate(self.files):
            if self.formats[index] != "tokens":
                continue
            folder = Path(path).parent
            if folder not in manifests:
                manifests[folder] = read_manifest(folder)
            manifest = manifests[folder]
            if manifest is None:
                if self.cfg.token_dtype is None:
                    raise ValueError(f"source {self.name!r}: {path} has no manifest.json beside it; write one with "
                                     f"scripts/tokenize.py or set data.sources.{self.name}.token_dtype")
                specs[index] = (self.cfg.token_dtype, None)
                continue
            tok = self.tokenizer
            mine = {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "tokenizer_fingerprint": tok.fingerprint}
            for key, value in mine.items():
                if manifest.get(key) != value:
                    raise ValueError(f"source {self.name!r}: {folder / 'manifest.json'} has {key}="
                                     f"{manifest.get(key)!r}, this run's tokenizer has {value!r}; "
                                     "re-tokenize the shards with data.tokenizer")
            entry = manifest["files"].get(Path(path).name)
            if entry is None:
                raise ValueError(f"source {self.name!r}: {path} is not listed in {folder / 'manifest.json'}")
            specs[index] = (manifest["dtype"], int(entry["documents"]))
        return specs

    # --- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"cursor": self.cursor.state_dict(), "records": self.records,
                "file_records": list(self.file_records), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if len(state["file_records"]) != len(self.files):
            raise ValueError(f"source {self.name!r}: state is for {len(state['file_records'])} files, "
                             f"the globs now match {len(self.files)}")
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._starts.clear()
        self.file_records = [int(c) for c in state["file_records"]]
        self.records = state["records"]
        self.skipped = self.skipped_seen = int(state["skipped"])
        self.cursor = Cursor.from_state(state["cursor"])
        self._ahead = self.cursor.copy()
        self._ready.clear()
        self._last_document = self.cursor.peek()
