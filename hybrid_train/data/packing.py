"""Packing documents into fixed-length rows without padding.

The token stream is [BOS] doc EOS [BOS] doc EOS ...; it is cut into consecutive rows of seq_len + 1
tokens, so input_ids = row[:-1] and labels = row[1:] and every token is used once. A document cut at a
row end continues at the start of a later row. Alongside the tokens each row carries:

  position_ids  position inside the document (0 at its first token; a continued document keeps
                counting, so RoPE sees the document's true offsets)
  seq_idx       document index within the row, from 0 at the row start, nondecreasing; the EOS belongs
                to the document it ends. Mamba-2's scan and conv and the attention mask use it so no
                state or attention crosses a document boundary.

What goes next is a feed's decision: `feed.next(row_start)` gives a piece (a document, or the rest of
one cut at a row end), `feed.cut(rest)` takes back what did not fit. `DocumentFeed` continues a cut
document first, in one stream; the mixture's feed (slot.py) may put another source's documents first.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np


class Piece(NamedTuple):
    source: str
    ids: np.ndarray  # framed tokens (int64)
    position: int  # position of ids[0] in its document; 0 for a document's first piece
    log: Any = None  # what `Packer.started` records when the document starts


class Packer:
    def __init__(self, seq_len: int, eos_id: int, bos_id: int | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.eos_id, self.bos_id = seq_len, eos_id, bos_id
        self._ramp = np.arange(seq_len + 1, dtype=np.int64)  # 0, 1, ...: positions of a piece, offset
        self.tokens: dict[str, int] = {}  # tokens placed at input positions, per source
        self.documents: dict[str, int] = {}  # documents whose first token was placed, per source
        self.started: list[Any] = []  # log entries of documents started since the caller last cleared it

    def frame(self, ids: Sequence[int]) -> np.ndarray:
        """A document as it enters the stream: optional BOS, its tokens, EOS."""
        head = 0 if self.bos_id is None else 1
        out = np.empty(head + len(ids) + 1, dtype=np.int64)
        if head:
            out[0] = self.bos_id
        out[head:-1] = ids
        out[-1] = self.eos_id
        return out

    def next_row(self, feed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, positions, seq_idx) of the next row, seq_len + 1 long each."""
        width = self.seq_len + 1
        tokens = np.empty(width, dtype=np.int64)
        positions = np.empty(width, dtype=np.int64)
        seq_idx = np.empty(width, dtype=np.int32)
        filled, doc = 0, 0
        while filled < width:
            piece = feed.next(filled == 0)
            name, ids, start = piece.source, piece.ids, piece.position
            if len(ids) == 0:
                raise ValueError(f"source {name!r} gave an empty token sequence; frame() it first")
            if start == 0:
                self.documents[name] = self.documents.get(name, 0) + 1
                self.started.append(piece.log)
            n = min(width - filled, len(ids))
            tokens[filled : filled + n] = ids[:n]
            np.add(self._ramp[:n], start, out=positions[filled : filled + n])
            seq_idx[filled : filled + n] = doc
            # Count input positions only (the row's last token is a label alone), so per-source
            # counts add up exactly to the tokens trained on.
            self.tokens[name] = self.tokens.get(name, 0) + min(n, max(0, self.seq_len - filled))
            if n < len(ids):
                feed.cut(Piece(name, ids[n:], start + n))
            filled, doc = filled + n, doc + 1
        return tokens, positions, seq_idx

    def next_batch(self, batch_size: int, feed) -> dict[str, np.ndarray]:
        """{tokens, positions (b, seq_len + 1) int64; seq_idx (b, seq_len + 1) int32}."""
        rows = [self.next_row(feed) for _ in range(batch_size)]
        tokens, positions, seq_idx = (np.stack(parts) for parts in zip(*rows))
        return {"tokens": tokens, "positions": positions, "seq_idx": seq_idx}

    def state_dict(self) -> dict:
        return {"tokens": dict(self.tokens), "documents": dict(self.documents)}

    def load_state_dict(self, state: dict) -> None:
        self.tokens, self.documents = dict(state["tokens"]), dict(state["documents"])
        self.started = []


def pieces_state(pieces) -> list[dict]:
    return [{"source": p.source, "tokens": p.ids.tolist(), "position": p.position} for p in pieces]


def pieces_from_state(state: list[dict]) -> list[Piece]:
    return [Piece(p["source"], np.asarray(p["tokens"], dtype=np.int64), int(p["position"])) for p in state]


class DocumentFeed:
    """Documents from `next_document() -> (source, framed ids, log)`, a cut one continuing first."""

    def __init__(self, next_document: Callable[[], tuple[str, Sequence[int], Any]]):
        self.next_document = next_document
        self.carry: deque[Piece] = deque()

    def next(self, row_start: bool) -> Piece:
        if self.carry:
            return self.carry.popleft()
        name, ids, log = self.next_document()
        return Piece(name, np.asarray(ids, dtype=np.int64), 0, log)

    def cut(self, rest: Piece) -> None:
        self.carry.appendleft(rest)

    def state_dict(self) -> dict:
        return {"carry": pieces_state(self.carry)}

    def load_state_dict(self, state: dict) -> None:
        self.carry = deque(pieces_from_state(state["carry"]))
