"""Packing documents into fixed-length rows without padding.

The token stream is [BOS] doc EOS [BOS] doc EOS ...; it is cut into consecutive rows of seq_len + 1
tokens, so input_ids = row[:-1] and labels = row[1:] and every token is used once. A document cut at a
row end continues at the start of the next row. Alongside the tokens each row carries:

  position_ids  position inside the document (0 at its first token; a continued document keeps
                counting, so RoPE sees the document's true offsets)
  seq_idx       document index within the row, from 0 at the row start, nondecreasing; the EOS belongs
                to the document it ends. Mamba-2's scan and conv and the attention mask use it so no
                state or attention crosses a document boundary.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

# Returns (source name, framed token ids) of the next document.
DocumentFn = Callable[[], tuple[str, Sequence[int]]]


class Packer:
    def __init__(self, seq_len: int, eos_id: int, bos_id: Optional[int] = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.eos_id, self.bos_id = seq_len, eos_id, bos_id
        # Rest of the document cut at the previous row's end: (source, tokens, position of tokens[0]).
        self._carry: Optional[tuple[str, np.ndarray, int]] = None
        self.tokens: dict[str, int] = {}  # tokens placed at input positions, per source
        self.documents: dict[str, int] = {}  # documents whose first token was placed, per source

    def frame(self, ids: Sequence[int]) -> list[int]:
        """A document as it enters the stream: optional BOS, its tokens, EOS."""
        return ([self.bos_id] if self.bos_id is not None else []) + list(ids) + [self.eos_id]

    def next_row(self, next_document: DocumentFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, positions, seq_idx) of the next row, seq_len + 1 long each."""
        width = self.seq_len + 1
        tokens = np.empty(width, dtype=np.int64)
        positions = np.empty(width, dtype=np.int64)
        seq_idx = np.empty(width, dtype=np.int32)
        filled, doc = 0, 0
        while filled < width:
            if self._carry is None:
                name, ids = next_document()
                if len(ids) == 0:
                    raise ValueError(f"source {name!r} gave an empty token sequence; frame() it first")
                self._carry = (name, np.asarray(ids, dtype=np.int64), 0)
                self.documents[name] = self.documents.get(name, 0) + 1
            name, ids, start = self._carry
            n = min(width - filled, len(ids))
            tokens[filled : filled + n] = ids[:n]
            positions[filled : filled + n] = np.arange(start, start + n)
            seq_idx[filled : filled + n] = doc
            # Count input positions only (the row's last token is a label alone), so per-source
            # counts add up exactly to the tokens trained on.
            self.tokens[name] = self.tokens.get(name, 0) + min(n, max(0, self.seq_len - filled))
            self._carry = (name, ids[n:], start + n) if n < len(ids) else None
            filled, doc = filled + n, doc + 1
        return tokens, positions, seq_idx

    def next_batch(self, batch_size: int, next_document: DocumentFn) -> dict[str, torch.Tensor]:
        rows = [self.next_row(next_document) for _ in range(batch_size)]
        tokens, positions, seq_idx = (torch.from_numpy(np.stack(parts)) for parts in zip(*rows))  # (b, l + 1)
        return {
            "input_ids": tokens[:, :-1].contiguous(),  # (b, l)
            "labels": tokens[:, 1:].contiguous(),  # (b, l): the next token of every input position
            "position_ids": positions[:, :-1].contiguous(),  # (b, l)
            "seq_idx": seq_idx[:, :-1].contiguous(),  # (b, l) int32
        }

    def state_dict(self) -> dict:
        carry = None
        if self._carry is not None:
            name, ids, start = self._carry
            carry = {"source": name, "tokens": ids.tolist(), "position": start}
        return {"carry": carry, "tokens": dict(self.tokens), "documents": dict(self.documents)}

    def load_state_dict(self, state: dict) -> None:
        carry = state["carry"]
        self._carry = None if carry is None else (
            carry["source"], np.asarray(carry["tokens"], dtype=np.int64), carry["position"])
        self.tokens, self.documents = dict(state["tokens"]), dict(state["documents"])
