"""Data pipeline: shard sources → token-share mixture → packing → per-rank loader.

No torch.distributed here: the data-parallel rank and world size are plain ints from the trainer.
"""

from .config import DataConfig, SourceConfig
from .loader import PackedDataLoader, build_data_loader
from .sources import DataExhausted
from .state import merge_rank_states
from .tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "DataConfig",
    "SourceConfig",
    "PackedDataLoader",
    "build_data_loader",
    "merge_rank_states",
    "DataExhausted",
    "ByteTokenizer",
    "HFTokenizer",
    "build_tokenizer",
]
