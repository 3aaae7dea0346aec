"""The training data loader: sources → shuffle → mixture → tokenize → pack, for one data-parallel rank.

Everything runs in the training process (tokenizing a rank's share of a batch takes milliseconds) so
the whole position is one small state dict: per source a shuffle window and a shard position, the
mixture's counters and the packer's carry-over. The state records the rank, the world size and a
fingerprint of everything that defines the document stream; loading a state that disagrees is an error
rather than a silent change of data order.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .config import DataConfig
from .mixture import Mixture
from .packing import Packer
from .sources import DocumentSource, ShuffledSource, resolve_paths

STATE_VERSION = 1


class PackedDataLoader:
    """Iterator of batches {input_ids, labels, position_ids (b, seq_len) int64; seq_idx int32}."""

    def __init__(self, cfg: DataConfig, tokenizer, seq_len: int, batch_size: int,
                 dp_rank: int, dp_size: int, seed: int):
        cfg.validate()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside dp_size {dp_size}")
        if cfg.add_bos and tokenizer.bos_id is None:
            raise ValueError("data.add_bos is set but the tokenizer has no BOS token")
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.names = sorted(cfg.sources)
        files = {name: resolve_paths(name, cfg.sources[name].paths, cfg.root) for name in self.names}
        self.sources = {
            name: ShuffledSource(
                DocumentSource(name, files[name], cfg.sources[name].text_field, dp_rank, dp_size, seed),
                cfg.shuffle_window, seed,
            )
            for name in self.names
        }
        self.mixture = Mixture({name: cfg.sources[name].weight for name in self.names})
        self.packer = Packer(seq_len, eos_id=tokenizer.eos_id, bos_id=tokenizer.bos_id if cfg.add_bos else None)
        self.fingerprint = _fingerprint(cfg, files, tokenizer, seed)

    def _next_document(self) -> tuple[str, list[int]]:
        name = self.mixture.pick()
        _, text = next(self.sources[name])
        ids = self.packer.frame(self.tokenizer.encode(text))
        self.mixture.add(name, len(ids))
        return name, ids

    def __iter__(self) -> "PackedDataLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.packer.next_batch(self.batch_size, self._next_document)
        # An id outside the embedding table would fail far away, inside a CUDA kernel; catch it here.
        # labels[:, -1] is the only token not also in input_ids.
        top = max(int(batch["input_ids"].max()), int(batch["labels"][:, -1].max()))
        if top >= self.tokenizer.vocab_size:
            raise ValueError(f"token id {top} >= tokenizer vocab_size {self.tokenizer.vocab_size}")
        return batch

    @property
    def source_tokens(self) -> dict[str, int]:
        """Tokens of each source placed into this rank's batches so far."""
        return {name: self.packer.tokens.get(name, 0) for name in self.names}

    @property
    def source_documents(self) -> dict[str, int]:
        """Documents of each source started in this rank's batches so far."""
        return {name: self.packer.documents.get(name, 0) for name in self.names}

    @property
    def skipped_records(self) -> dict[str, int]:
        """Malformed records skipped per source (read-ahead of the shuffle windows included)."""
        return {name: self.sources[name].source.skipped_records for name in self.names}

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "sources": {name: source.state_dict() for name, source in self.sources.items()},
            "mixture": self.mixture.state_dict(),
            "packer": self.packer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')}, this loader reads {STATE_VERSION}")
        if (state["dp_rank"], state["dp_size"]) != (self.dp_rank, self.dp_size):
            raise ValueError(
                f"data state is for rank {state['dp_rank']} of {state['dp_size']}, this loader is rank "
                f"{self.dp_rank} of {self.dp_size}; the document split depends on both"
            )
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "data state was saved with different sources, weights, files, tokenizer, add_bos, "
                "shuffle_window or seed; start a new stage from the weights instead of resuming"
            )
        for name, source in self.sources.items():
            source.load_state_dict(state["sources"][name])
        self.mixture.load_state_dict(state["mixture"])
        self.packer.load_state_dict(state["packer"])


def _fingerprint(cfg: DataConfig, files: dict[str, list[str]], tokenizer, seed: int) -> str:
    """Hash of what decides the document stream (not seq_len or batch size: rows are cut from the
    stream, so those may change across a resume)."""
    spec = {
        "sources": {
            name: {
                "files": [os.path.relpath(f, cfg.root) for f in files[name]],  # movable data root
                "weight": cfg.sources[name].weight,
                "text_field": cfg.sources[name].text_field,
            }
            for name in sorted(files)
        },
        "tokenizer": [type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id],
        "add_bos": cfg.add_bos,
        "shuffle_window": cfg.shuffle_window,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_data_loader(cfg: DataConfig, tokenizer, seq_len: int, batch_size: int,
                      dp_rank: int, dp_size: int, seed: int) -> PackedDataLoader:
    """The loader of rank `dp_rank` of `dp_size`: batch_size rows of seq_len tokens per `next()`."""
    return PackedDataLoader(cfg, tokenizer, seq_len, batch_size, dp_rank, dp_size, seed)
