"""The training data loader of one data-parallel rank: its slots' batches, round-robin.

Design (sources.py, positions.py and state.py have the details):

* Slots. A job of dp_size ranks with data.num_workers = J has dp_size * max(1, J) slots; slot
  v = dp_rank * max(1, J) + j builds every max(1, J)-th batch of its rank, in the trainer process
  (J = 0) or in background worker j. Each slot is a complete pipeline (sources → mixture → packing)
  whose position is a small state dict, so J = 1 gives the same batches as J = 0, only prefetched.
* Disjoint ranks. Every source has one global position sequence per epoch; slot v serves positions
  v, v + V, v + 2V, ... (V slots). Within an epoch, no document is served twice and none is skipped.
* Exact resume. `state_dict()` is this rank's slots' states after the last batch handed out (with
  workers, the state travels with each batch, so prefetched batches are not in it). Loading it
  rebuilds the same batches, token for token.
* Rescale. `merge_rank_states([state of rank 0, ..., rank N-1])` is the global state; any rank of
  any new dp_size / num_workers loads it with `load_state_dict`. Same number of slots: each slot
  continues exactly. Another number: the unserved positions, the rests of cut documents and the
  counters are re-split (state.py), so no document repeats or is skipped.
  `load_rescaled_state_dict(every saved rank's state)` does both steps, for the trainer's resume.

Per-source tokens, documents and skipped records are in the state and exposed as properties; the
documents started in the last batch are in `last_documents` (source, id, epoch), and the slot that
built it in `last_slot`, for data audits.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch

from .config import DataConfig
from .formats import training_files
from .slot import Slot, SlotSpec
from .state import STATE_VERSION, merge_rank_states, slot_states
from .workers import WorkerPool


class PackedDataLoader:
    """Iterator of batches {input_ids, labels, position_ids (b, seq_len) int64; seq_idx int32}."""

    def __init__(self, cfg: DataConfig, tokenizer, seq_len: int, batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, num_workers: Optional[int] = None):
        cfg.validate()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside dp_size {dp_size}")
        if cfg.add_bos and tokenizer.bos_id is None:
            raise ValueError("data.add_bos is set but the tokenizer has no BOS token")
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers = cfg.num_workers if num_workers is None else num_workers
        self.slots_per_rank = max(1, self.num_workers)
        self.num_slots = dp_size * self.slots_per_rank
        self.names = sorted(cfg.sources)
        files = {name: training_files(name, cfg.sources[name], cfg.root) for name in self.names}
        self.spec = SlotSpec(cfg, tokenizer, files, seq_len, batch_size, seed)
        self.fingerprint = _fingerprint(cfg, files, tokenizer, seed)
        first = dp_rank * self.slots_per_rank
        # Built here even with workers: bad configs and token files fail now, in the trainer.
        self._slots = [Slot(self.spec, first + j, self.num_slots) for j in range(self.slots_per_rank)]
        self._states = [slot.state_dict() for slot in self._slots]
        self._next = 0
        self._pool: Optional[WorkerPool] = None
        self._failed = False
        self.last_documents: list[tuple[str, str, int]] = []  # (source, id, epoch) started in the last batch
        self.last_slot = -1  # the slot that built the last batch

    # --- iteration ---------------------------------------------------------------------------------

    def __iter__(self) -> "PackedDataLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._failed:
            raise RuntimeError("the data loader failed earlier; rebuild it and load a saved state")
        j = self._next
        try:
            if self.num_workers == 0:
                arrays, started = self._slots[j].next_batch()
            else:
                if self._pool is None:
                    first = self.dp_rank * self.slots_per_rank
                    self._pool = WorkerPool(self.spec, [first + i for i in range(self.slots_per_rank)],
                                            self.num_slots, self._states, self.spec.cfg.prefetch)
                arrays, started, self._states[j] = self._pool.get(j)
        except BaseException:
            self._failed = True  # a slot stopped mid-batch: its position is no longer a batch boundary
            self.close()
            raise
        self._next = (j + 1) % self.slots_per_rank
        self.last_documents = started
        self.last_slot = self.dp_rank * self.slots_per_rank + j
        tokens = torch.from_numpy(arrays["tokens"])  # (b, l + 1)
        return {
            "input_ids": tokens[:, :-1].contiguous(),  # (b, l)
            "labels": tokens[:, 1:].contiguous(),  # (b, l): the next token of every input position
            "position_ids": torch.from_numpy(arrays["positions"][:, :-1].copy()),  # (b, l)
            "seq_idx": torch.from_numpy(arrays["seq_idx"][:, :-1].copy()),  # (b, l) int32
        }

    def close(self) -> None:
        """Stop the background workers (they restart, from the current state, on the next batch)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self):
        if getattr(self, "_pool", None) is not None:  # __init__ may have failed before setting it
            self.close()

    # --- counters ----------------------------------------------------------------------------------

    def _slot_states(self) -> list[dict]:
        return [slot.state_dict() for slot in self._slots] if self.num_workers == 0 else self._states

    def _sum(self, part: str, counter: str) -> dict[str, int]:
        states = self._slot_states()
        return {name: sum(s[part][counter].get(name, 0) for s in states) for name in self.names}

    @property
    def source_tokens(self) -> dict[str, int]:
        """Tokens of each source placed into this rank's batches so far (input positions)."""
        return self._sum("packer", "tokens")

    @property
    def source_documents(self) -> dict[str, int]:
        """Documents of each source started in this rank's batches so far."""
        return self._sum("packer", "documents")

    @property
    def skipped_records(self) -> dict[str, int]:
        """Malformed records and damaged streams skipped per source, by this rank."""
        states = self._slot_states()
        return {name: sum(s["sources"][name]["skipped"] for s in states) for name in self.names}

    @property
    def source_epochs(self) -> dict[str, int]:
        """The epoch each source is in on this rank (the furthest of its slots; 0 until one is complete)."""
        window, epochs = self.spec.cfg.shuffle_window, {}
        for name in self.names:
            epochs[name] = 0
            for state in self._slot_states():
                source = state["sources"][name]
                if source["records"]:
                    cursor = source["cursor"]
                    position = cursor["holes"][0] if cursor["holes"] else cursor["next"]
                    period = -(-source["records"] // window) * window
                    epochs[name] = max(epochs[name], position // period)
        return epochs

    # --- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's position; give every rank's to `merge_rank_states` to resume at another size."""
        if self._failed:
            raise RuntimeError("the data loader failed mid-batch; its state is the last one saved")
        return {
            "version": STATE_VERSION,
            "kind": "rank",
            "fingerprint": self.fingerprint,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "slots_per_rank": self.slots_per_rank,
            "next_slot": self._next,
            "slots": [dict(s) for s in self._slot_states()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Load this rank's own state (same rank, dp_size and workers) or a `merge_rank_states` result."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')}, this loader reads {STATE_VERSION}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "data state was saved with different sources, weights, files, tokenizer, add_bos, "
                "shuffle_window or seed; start a new stage from the weights instead of resuming"
            )
        mine = (self.dp_rank, self.dp_size, self.slots_per_rank)
        if state["kind"] == "rank" and (state["dp_rank"], state["dp_size"], state["slots_per_rank"]) == mine:
            states, self._next = state["slots"], state["next_slot"]
        else:
            if state["kind"] == "rank":
                if state["dp_size"] > 1:
                    raise ValueError(
                        f"data state is rank {state['dp_rank']} of {state['dp_size']} with {state['slots_per_rank']} "
                        f"slot(s) per rank; this loader is rank {mine[0]} of {mine[1]} with {mine[2]}: pass "
                        "merge_rank_states(every rank's state)")
                state = merge_rank_states([state])  # a one-rank job's state is the global one
            states, self._next = slot_states(state, self.dp_rank, self.dp_size, self.slots_per_rank)
        self.close()
        for slot, slot_state in zip(self._slots, states):
            slot.load_state_dict(slot_state)  # validates it even when workers will run it
        self._states = [slot.state_dict() for slot in self._slots]
        self._failed = False


    def load_rescaled_state_dict(self, rank_states: list[dict]) -> None:
        """Load from the states of every rank of the saved job, whatever its size; ranks that share a
        data-parallel rank (tensor/pipeline-parallel peers) must hold the same state and count once."""
        by_rank: dict[int, dict] = {}
        for state in rank_states:
            seen = by_rank.setdefault(state["dp_rank"], state)
            if seen is not state and seen != state:
                raise ValueError(f"two saved states for data-parallel rank {state['dp_rank']} differ; "
                                 "peers in a tensor-parallel group must read the same data")
        self.load_state_dict(merge_rank_states(list(by_rank.values())))


def _fingerprint(cfg: DataConfig, files: dict[str, list[str]], tokenizer, seed: int) -> str:
    """Hash of what decides the document stream (not seq_len, batch size, workers or max_epochs:
    those may change across a resume)."""
    spec = {
        "sources": {
            name: {
                "files": [os.path.relpath(f, cfg.root) for f in files[name]],  # movable data root
                "weight": cfg.sources[name].weight,
                "text_field": cfg.sources[name].text_field,
            }
            for name in sorted(files)
        },
        "tokenizer": [tokenizer.fingerprint, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id],
        "add_bos": cfg.add_bos,
        "shuffle_window": cfg.shuffle_window,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_data_loader(cfg: DataConfig, tokenizer, seq_len: int, batch_size: int,
                      dp_rank: int, dp_size: int, seed: int, num_workers: Optional[int] = None) -> PackedDataLoader:
    """The loader of rank `dp_rank` of `dp_size`: batch_size rows of seq_len tokens per `next()`.
    `num_workers` overrides data.num_workers."""
    return PackedDataLoader(cfg, tokenizer, seq_len, batch_size, dp_rank, dp_size, seed, num_workers)
