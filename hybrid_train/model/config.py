"""Model configuration: every architectural knob of the hybrid LM, named and validated in one place."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import List, Mapping, Optional

MAMBA, ATTENTION = "M", "A"


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Label written into checkpoints and metrics."""
    vocab_size: int = 258
    """Rows of the embedding and the LM head; must cover the tokenizer's vocabulary."""
    d_model: int = 128
    """Residual stream width."""
    n_layers: int = 6
    """Number of decoder blocks."""
    attn_layer_indices: Optional[List[int]] = None
    """Blocks whose mixer is attention (the Bamba/HF convention); the rest are Mamba-2."""
    layer_pattern: Optional[str] = None
    """Alternative to attn_layer_indices: one symbol per block, 'M' Mamba-2, 'A' attention."""
    tie_embeddings: bool = False
    """Share the embedding matrix with the LM head."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (all norms, including the Mamba-2 gated norm)."""
    init_std: float = 0.02
    """Std of the normal init of embeddings and projections; residual outputs get std/sqrt(2*n_layers)."""
    doc_masking: bool = True
    """Keep packed documents apart: attention masks across documents, Mamba-2 and conv1d reset states."""
    kernels: str = "auto"
    """SSD scan / conv1d / gated norm / fused loss implementation: auto (Triton on CUDA, PyTorch
    elsewhere) | triton | torch. The env var HYBRID_TRAIN_KERNELS, when set, overrides it process-wide."""

    # MLP
    mlp_hidden: int = 384
    """SwiGLU intermediate width (0 = no MLP in the blocks)."""

    # Attention
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads (GQA); must divide n_heads."""
    head_dim: int = 32
    """Width of each attention head."""
    rope_theta: float = 10000.0
    """RoPE base."""
    partial_rotary_factor: float = 0.5
    """Fraction of each head's dims rotated by RoPE (first dims, non-interleaved halves)."""

    # Mamba-2
    ssm_d_state: int = 16
    """State size N per head."""
    ssm_d_conv: int = 4
    """Causal depthwise conv kernel width."""
    ssm_expand: int = 2
    """d_inner = expand * d_model."""
    ssm_head_dim: int = 32
    """Channels P per Mamba-2 head; d_inner / head_dim heads."""
    ssm_n_groups: int = 1
    """Groups sharing B and C (grouped-value heads); must divide the number of heads."""
    ssm_chunk_size: int = 64
    """Chunk length Q of the SSD algorithm."""
    ssm_conv_bias: bool = True
    """Bias in the conv1d."""
    ssm_proj_bias: bool = False
    """Bias in the in/out projections."""
    ssm_dt_min: float = 1e-3
    """Lower end of the log-uniform dt initialization."""
    ssm_dt_max: float = 1e-1
    """Upper end of the log-uniform dt initialization."""
    ssm_dt_init_floor: float = 1e-4
    """Floor applied to the initial dt."""
    ssm_a_init_range: List[float] = field(default_factory=lambda: [1.0, 16.0])
    """A = -uniform(low, high) at init (stored as A_log)."""
    ssm_dt_limit: List[float] = field(default_factory=lambda: [0.0, math.inf])
    """Clamp of dt after softplus; [0, inf] means no clamp."""

    # ---- derived -------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.ssm_expand * self.d_model

    @property
    def ssm_n_heads(self) -> int:
        return self.d_inner // self.ssm_head_dim

    @property
    def layer_types(self) -> List[str]:
        """'M' or 'A' for each block, from whichever layout field is set."""
        if self.layer_pattern is not None:
            return list(self.layer_pattern)
        attn = set(self.attn_layer_indices or [])
        return [ATTENTION if i in attn else MAMBA for i in range(self.n_layers)]

    def validate(self) -> "ModelConfig":
        """Cross-field checks; raises ValueError naming the fields and values."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"model config '{self.name}': {msg}")

        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "ssm_d_state", "ssm_d_conv", "ssm_expand", "ssm_head_dim", "ssm_n_groups",
                    "ssm_chunk_size"):
            need(getattr(self, key) > 0, f"model.{key} must be positive, got {getattr(self, key)}")
        need(self.mlp_hidden >= 0, f"model.mlp_hidden must be >= 0, got {self.mlp_hidden}")
        need(self.kernels in ("auto", "triton", "torch"),
             f"model.kernels={self.kernels!r}; expected one of auto, triton, torch")
        if self.layer_pattern is not None:
            bad = sorted(set(self.layer_pattern) - {MAMBA, ATTENTION})
            need(not bad, f"model.layer_pattern={self.layer_pattern!r} has symbols {bad}; use 'M' (Mamba-2) and 'A' (attention)")
            need(len(self.layer_pattern) == self.n_layers,
                 f"model.layer_pattern has {len(self.layer_pattern)} symbols but model.n_layers={self.n_layers}")
            if self.attn_layer_indices is not None:
                from_pattern = [i for i, s in enumerate(self.layer_pattern) if s == ATTENTION]
                need(sorted(self.attn_layer_indices) == from_pattern,
                     f"model.layer_pattern={self.layer_pattern!r} puts attention at {from_pattern} but "
                     f"model.attn_layer_indices={list(self.attn_layer_indices)}")
        for i in self.attn_layer_indices or []:
            need(0 <= i < self.n_layers, f"model.attn_layer_indices has {i}, outside 0..n_layers-1={self.n_layers - 1}")
        if self.attn_layer_indices is not None:
            need(len(set(self.attn_layer_indices)) == len(self.attn_layer_indices),
                 f"model.attn_layer_indices={list(self.attn_layer_indices)} repeats an index")
        types = self.layer_types
        if ATTENTION in types:
            need(self.n_heads % self.n_kv_heads == 0,
                 f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
            rot = self.head_dim * self.partial_rotary_factor
            need(0 < self.partial_rotary_factor <= 1 and rot == int(rot) and int(rot) % 2 == 0,
                 f"model.partial_rotary_factor={self.partial_rotary_factor} times model.head_dim={self.head_dim} "
                 "must be an even number of dims")
        if MAMBA in types:
            need(self.d_inner % self.ssm_head_dim == 0,
                 f"d_inner = model.ssm_expand*model.d_model = {self.d_inner} is not divisible by "
                 f"model.ssm_head_dim={self.ssm_head_dim}")
            need(self.ssm_n_heads % self.ssm_n_groups == 0,
                 f"model.ssm_n_groups={self.ssm_n_groups} does not divide the {self.ssm_n_heads} Mamba-2 heads")
            need(len(self.ssm_a_init_range) == 2 and 0 < self.ssm_a_init_range[0] <= self.ssm_a_init_range[1],
                 f"model.ssm_a_init_range={list(self.ssm_a_init_range)} must be [low, high] with 0 < low <= high")
            need(len(self.ssm_dt_limit) == 2 and 0 <= self.ssm_dt_limit[0] < self.ssm_dt_limit[1],
                 f"model.ssm_dt_limit={list(self.ssm_dt_limit)} must be [low, high] with 0 <= low < high")
            need(0 < self.ssm_dt_min <= self.ssm_dt_max,
                 f"model.ssm_dt_min={self.ssm_dt_min} and model.ssm_dt_max={self.ssm_dt_max} must satisfy 0 < min <= max")
        return self


def as_model_config(cfg) -> ModelConfig:
    """A ModelConfig from a ModelConfig, from a job config holding one (hybrid_train.load_config's JobConfig,
    or Hydra's composed DictConfig), or from a mapping of its fields (a DictConfig such as the composed
    config's `model`, or a dict), whose values are converted and type-checked as the YAML files' are."""
    if isinstance(cfg, ModelConfig):
        return cfg
    if isinstance(getattr(cfg, "model", None), ModelConfig):  # a JobConfig
        return cfg.model
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a ModelConfig, a job config or a mapping of ModelConfig fields, got "
                        f"{type(cfg).__name__}")
    if "model" in cfg and isinstance(cfg["model"], Mapping):  # the whole job
        cfg = cfg["model"]
    names = [f.name for f in fields(ModelConfig)]
    for key in cfg:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            raise ValueError(f"unknown model config key {key!r} (ModelConfig, hybrid_train/model/config.py)"
                             + (f"; did you mean {near[0]}?" if near else ""))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg))
