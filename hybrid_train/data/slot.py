"""One slot of the job: its share of every source → token-share mixture → packer → batches.

A job has dp_size x max(1, num_workers) slots; each is a complete, deterministic pipeline whose whole
position is its state dict (per-source cursors, mixture counters, the rests of cut documents). A
slot runs in the training process or in a background worker (workers.py); it neither knows nor cares.

Mixing is per piece, and a piece never spans more than one row: a document cut at a row end waits as
its source's pending piece and continues at the start of a row, when the mixture next picks that
source at a row start (mid-row, sources with a pending piece are passed over). Rows share no context,
so a long document loses nothing by waiting, while no source can take more than one row at a time:
the realized shares stay within about seq_len tokens of their targets, however long the documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections import deque
from typing import Any

import numpy as np

from .config import DataConfig
from .mixture import Mixture
from .packing import Packer, Piece, pieces_from_state, pieces_state
from .positions import Cursor
from .sources import SourceStream


class MixtureFeed:
    """The packer's feed: pending pieces and new documents, in the mixture's order."""

    def __init__(self, mixture: Mixture, sources: dict[str, SourceStream], packer: Packer):
        self.mixture, self.sources, self.packer = mixture, sources, packer
        self.pending: dict[str, deque[Piece]] = {name: deque() for name in sources}

    def next(self, row_start: bool) -> Piece:
        names = None  # every source
        if not row_start and any(self.pending.values()):
            names = [n for n in self.mixture.names if not self.pending[n]]  # a cut document waits for a row start
        name = self.mixture.pick(names)
        if self.pending[name]:
            piece = self.pending[name].popleft()
        else:
            doc = self.sources[name].next()
            piece = Piece(name, self.packer.frame(doc.ids), 0, (doc.source, doc.key, doc.epoch))
        self.mixture.add(name, len(piece.ids))
        return piece

    def cut(self, rest: Piece) -> None:
        self.mixture.add(rest.source, -len(rest.ids))  # counted when placed, not when picked
        self.pending[rest.source].appendleft(rest)

    def state_dict(self) -> dict:
        return {name: pieces_state(pieces) for name, pieces in self.pending.items()}

    def load_state_dict(self, state: dict) -> None:
        self.pending = {name: deque(pieces_from_state(state.get(name, []))) for name in self.sources}


@dataclass
class SlotSpec:
    """Everything a slot is built from; picklable, so a worker process can build the same slot."""

    cfg: DataConfig
    tokenizer: Any
    files: dict[str, list[str]]
    seq_len: int
    batch_size: int
    seed: int


class Slot:
    def __init__(self, spec: SlotSpec, slot: int, num_slots: int):
        cfg = spec.cfg
        self.spec, self.slot, self.num_slots = spec, slot, num_slots
        self.names = sorted(cfg.sources)
        self.sources = {
            name: SourceStream(name, cfg.sources[name], spec.files[name], spec.tokenizer,
                               window=cfg.shuffle_window, seed=spec.seed, on_error=cfg.on_error,
                               cursor=Cursor.stripe(slot, num_slots), root=cfg.root)
            for name in self.names
        }
        self.mixture = Mixture({name: cfg.sources[name].weight for name in self.names})
        bos = spec.tokenizer.bos_id if cfg.add_bos else None
        self.packer = Packer(spec.seq_len, eos_id=spec.tokenizer.eos_id, bos_id=bos)
        self.feed = MixtureFeed(self.mixture, self.sources, self.packer)
        self.vocab_size = spec.tokenizer.vocab_size

    def next_batch(self) -> tuple[dict[str, np.ndarray], list[tuple[str, str, int]]]:
        """(batch arrays, (source, key, epoch) of every document that starts in the batch)."""
        self.packer.started = []
        batch = self.packer.next_batch(self.spec.batch_size, self.feed)
        # An id outside the embedding table would fail far away, inside a CUDA kernel; catch it here.
        top = int(batch["tokens"].max())
        if top >= self.vocab_size:
            raise ValueError(f"token id {top} >= tokenizer vocab_size {self.vocab_size}")
        return batch, self.packer.started

    def state_dict(self) -> dict:
        return {
            "sources": {name: source.state_dict() for name, source in self.sources.items()},
            "mixture": self.mixture.state_dict(),
            "packer": self.packer.state_dict(),
            "pending": self.feed.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["sources"]) != self.names:
            raise ValueError(f"data state has sources {sorted(state['sources'])}, configured: {self.names}")
        for name, source in self.sources.items():
            source.load_state_dict(state["sources"][name])
            if source.cursor.step != self.num_slots:
                raise ValueError(f"slot state strides by {source.cursor.step}, this job has {self.num_slots} "
                                 "slots; load a merged state (merge_rank_states) to change the split")
        self.mixture.load_state_dict(state["mixture"])
        self.packer.load_state_dict(state["packer"])
        self.feed.load_state_dict(state["pending"])
