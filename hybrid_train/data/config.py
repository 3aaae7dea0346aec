"""Typed configuration of the data pipeline.

These dataclasses double as Hydra structured-config schemas, so fields use only types OmegaConf
understands (int/float/str/bool, Optional, List, Dict[str, dataclass]) and every field has a default.
`conf/data/*.yaml` only picks values; `validate()` runs once at start.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ON_ERROR = ("skip", "raise")
TOKEN_DTYPES = ("uint16", "uint32")


@dataclass
class SourceConfig:
    """One named document source of the mixture (e.g. a corpus subset such as DCLM or StarCoder)."""

    paths: List[str] = field(default_factory=list)
    """Glob patterns of shard files (raw text shards or token files), relative to DataConfig.root unless absolute."""
    eval_paths: List[str] = field(default_factory=list)
    """Held-out shards (globs, like paths): never trained on, even where paths match them too; what
    scripts/eval.py scores. Empty: the source has no held-out split."""
    weight: float = 1.0
    """Target share of served tokens; normalized over all sources."""
    text_field: str = "text"
    """Record field (JSON key or parquet column) that holds the document text."""
    max_epochs: Optional[int] = None
    """Passes over the source before the loader stops with an error; null repeats it forever (reshuffled)."""
    token_dtype: Optional[str] = None
    """dtype of token files that have no manifest.json beside them ("uint16" or "uint32")."""


@dataclass
class DataConfig:
    """Where the documents come from, how they are tokenized, and how they are mixed."""

    root: str = "data/sample"
    """Folder that relative source globs are resolved against (relative to the working directory)."""
    tokenizer: str = "byte"
    """Either "byte" (built-in byte-level tokenizer) or a HF tokenizer.json or a folder holding one."""
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    """Named sources of the mixture; names order ties and name the per-source token counters."""
    add_bos: bool = False
    """Put the tokenizer's BOS token before every document (an EOS always follows each one)."""
    shuffle_window: int = 1024
    """Records per source shuffled together (a block of consecutive records); 1 keeps the shard order."""
    on_error: str = "skip"
    """Malformed JSON line or damaged compressed stream: "skip" (warn and count) or "raise"."""
    num_workers: int = 0
    """Background processes per rank, each building every num_workers-th batch; 0 builds in the trainer."""
    prefetch: int = 2
    """Batches each background process keeps ready."""

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot work."""
        if not self.tokenizer:
            raise ValueError("data.tokenizer is empty; use 'byte' or a path to a tokenizer.json")
        if self.shuffle_window < 1:
            raise ValueError(f"data.shuffle_window must be >= 1, got {self.shuffle_window}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"data.on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch < 1:
            raise ValueError(f"data.prefetch must be >= 1, got {self.prefetch}")
        if not self.sources:
            raise ValueError("data.sources is empty; configure at least one source")
        for name, source in self.sources.items():
            where = f"data.sources.{name}"
            if not name:
                raise ValueError("data.sources has a source with an empty name")
            if not source.paths:
                raise ValueError(f"{where}.paths is empty; give at least one glob")
            if any(not p for p in source.paths):
                raise ValueError(f"{where}.paths contains an empty pattern: {source.paths}")
            if any(not p for p in source.eval_paths):
                raise ValueError(f"{where}.eval_paths contains an empty pattern: {source.eval_paths}")
            if not (math.isfinite(source.weight) and source.weight > 0):
                raise ValueError(f"{where}.weight must be a positive number, got {source.weight}")
            if not source.text_field:
                raise ValueError(f"{where}.text_field is empty")
            if source.max_epochs is not None and source.max_epochs < 1:
                raise ValueError(f"{where}.max_epochs must be >= 1 or null (repeat forever), got {source.max_epochs}")
            if source.token_dtype is not None and source.token_dtype not in TOKEN_DTYPES:
                raise ValueError(f"{where}.token_dtype must be one of {TOKEN_DTYPES} or null, "
                                 f"got {source.token_dtype!r}")
