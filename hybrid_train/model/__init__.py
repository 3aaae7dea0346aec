"""The hybrid LM: configuration, modules, builders and FLOP accounting."""

from __future__ import annotations

import torch

from hybrid_train.model.config import ATTENTION, MAMBA, ModelConfig, as_model_config
from hybrid_train.model.hybrid import HybridLM

__all__ = ["ModelConfig", "HybridLM", "as_model_config", "build_model", "count_params", "active_params",
           "flops_per_token"]


def build_model(cfg, device: str | torch.device = "cpu", init: bool = True) -> HybridLM:
    """Build and (unless on meta or init=False) initialize a model. `cfg`: a ModelConfig, a job config
    (`hybrid_train.load_config(...)`, or Hydra's composed config) or a mapping of ModelConfig fields;
    it is validated first."""
    cfg = as_model_config(cfg).validate()
    with torch.device(device):
        model = HybridLM(cfg)
    if init and torch.device(device).type != "meta":
        model.init_weights()
    return model


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, embedding) parameter counts; a tied matrix is counted once, as the head."""
    total = sum(p.numel() for p in model.parameters())
    embedding = 0 if model.cfg.tie_embeddings else model.embed.weight.numel()
    return total, embedding


def active_params(cfg: ModelConfig, n_params: int) -> int:
    """Parameters a token uses: all but the routed experts it is not sent to (E - top_k per MoE block)."""
    idle = cfg.moe_n_experts - cfg.moe_top_k if cfg.moe_n_experts else 0
    return n_params - len(cfg.moe_layers) * idle * 3 * cfg.d_model * cfg.expert_hidden


def flops_per_token(cfg: ModelConfig, n_params: int, n_embedding: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): matmuls of the active parameters (routed experts
    count top_k of E), attention scores, SSD scan."""
    types = cfg.layer_types
    n_attn, n_mamba = types.count(ATTENTION), types.count(MAMBA)
    dense = 6 * (active_params(cfg, n_params) - n_embedding)
    attn = 12 * n_attn * cfg.n_heads * cfg.head_dim * seq_len
    heads, p, q, n, g = cfg.ssm_n_heads, cfg.ssm_head_dim, cfg.ssm_chunk_size, cfg.ssm_d_state, cfg.ssm_n_groups
    ssd = 3 * n_mamba * (2 * heads * p * (q + 2 * n) + 2 * g * q * n)
    return float(dense + attn + ssd)
