"""hybrid_train: pretraining and continued pretraining of hybrid Mamba-2 / attention language models."""

from hybrid_train.config import JobConfig, load_config
from hybrid_train.model import HybridLM, ModelConfig, build_model
from hybrid_train.train.checkpoint import load_model

__all__ = ["HybridLM", "JobConfig", "ModelConfig", "build_model", "load_config", "load_model"]
__version__ = "0.1.0"
