"""Typed configuration of the data pipeline.

These dataclasses double as Hydra structured-config schemas, so fields use only types OmegaConf
understands (int/float/str/bool, Optional, List, Dict[str, dataclass]) and every field has a default.
`conf/data/*.yaml` only picks values; `validate()` runs once at start.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class SourceConfig:
    """One named document source of the mixture (e.g. a corpus subset such as DCLM or StarCoder)."""

    paths: List[str] = field(default_factory=list)
    """Glob patterns of shard files, relative to DataConfig.root unless absolute."""
    weight: float = 1.0
    """Target share of served tokens; normalized over all sources."""
    text_field: str = "text"
    """Record field (JSON key or parquet column) that holds the document text."""


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
    """Documents per source shuffled together in a bounded buffer; 1 keeps the shard order."""

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot work."""
        if not self.tokenizer:
            raise ValueError("data.tokenizer is empty; use 'byte' or a path to a tokenizer.json")
        if self.shuffle_window < 1:
            raise ValueError(f"data.shuffle_window must be >= 1, got {self.shuffle_window}")
        if not self.sources:
            raise ValueError("data.sources is empty; configure at least one source")
        for name, source in self.sources.items():
            if not name:
                raise ValueError("data.sources has a source with an empty name")
            if not source.paths:
                raise ValueError(f"data.sources.{name}.paths is empty; give at least one glob")
            if any(not p for p in source.paths):
                raise ValueError(f"data.sources.{name}.paths contains an empty pattern: {source.paths}")
            if not (math.isfinite(source.weight) and source.weight > 0):
                raise ValueError(f"data.sources.{name}.weight must be a positive number, got {source.weight}")
            if not source.text_field:
                raise ValueError(f"data.sources.{name}.text_field is empty")
