"""Model configuration: every architectural knob of the hybrid LM, named and validated in one place."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import List, Mapping, Optional

MAMBA, ATTENTION = "M", "A"
MOE_SCORES = ("softmax", "sigmoid")
MOE_IMPLS = ("auto", "grouped", "loop")


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

    # Mixture of experts (replaces the MLP of the blocks it is placed in)
    moe_n_experts: int = 0
    """Routed experts per MoE block (0 = no MoE: every block has the dense MLP)."""
    moe_top_k: int = 2
    """Experts each token is routed to (dropless: every token reaches all of its top_k)."""
    moe_hidden: int = 0
    """SwiGLU intermediate width of each routed expert (0 = mlp_hidden)."""
    moe_shared_hidden: int = 0
    """Width of the shared SwiGLU expert every token also goes through (0 = none; k of width w = one of k*w)."""
    moe_score: str = "softmax"
    """Router score of each expert from its logit: softmax (over experts) or sigmoid."""
    moe_norm_topk: bool = True
    """Rescale the top_k scores of a token to sum to 1 (Mixtral, Granite; Jamba does not)."""
    moe_aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss E * sum_e f_e * P_e (Switch/Mixtral form), mean over MoE blocks."""
    moe_z_loss_coef: float = 0.001
    """Weight of the router z-loss mean(logsumexp(router logits)^2) (ST-MoE), mean over MoE blocks."""
    moe_layer_indices: Optional[List[int]] = None
    """Blocks with an MoE MLP; None = every moe_every-th block from moe_offset."""
    moe_every: int = 1
    """Without moe_layer_indices: MoE in blocks i with i % moe_every == moe_offset (Jamba: 2 and 1)."""
    moe_offset: int = 0
    """See moe_every."""
    moe_impl: str = "auto"
    """Experts as grouped GEMMs (torch._grouped_mm), a loop of matmuls (the reference), or auto (grouped if it runs)."""

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
    attn_rope: bool = True
    """RoPE in attention; false: no positional encoding in attention (NoPE, as Jamba and Granite 4.0-H)."""
    attn_scale: Optional[float] = None
    """Scale of the attention scores; None = head_dim**-0.5 (Granite's attention_multiplier)."""

    # Scalar multipliers (Granite 4.0; 1.0 = none)
    embedding_multiplier: float = 1.0
    """The embedding output is multiplied by this."""
    residual_multiplier: float = 1.0
    """Each mixer's and MLP's output is multiplied by this before it joins the residual stream."""
    logits_scaling: float = 1.0
    """The logits are divided by this."""

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
    def expert_hidden(self) -> int:
        return self.moe_hidden or self.mlp_hidden

    @property
    def moe_layers(self) -> List[int]:
        """Indices of the blocks whose MLP is a mixture of experts."""
        if not self.moe_n_experts:
            return []
        if self.moe_layer_indices is not None:
            return sorted(self.moe_layer_indices)
        return [i for i in range(self.n_layers) if i % self.moe_every == self.moe_offset]

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
        for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            need(getattr(self, key) > 0, f"model.{key} must be positive, got {getattr(self, key)}")
        need(self.attn_scale is None or self.attn_scale > 0, f"model.attn_scale={self.attn_scale} must be positive")
        if ATTENTION in types:
            need(self.n_heads % self.n_kv_heads == 0,
                 f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
            rot = self.head_dim * self.partial_rotary_factor
            need(not self.attn_rope or (0 < self.partial_rotary_factor <= 1 and rot == int(rot) and int(rot) % 2 == 0),
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
        self._validate_moe(need)
        return self

    def _validate_moe(self, need) -> None:
        need(self.moe_n_experts >= 0, f"model.moe_n_experts must be >= 0, got {self.moe_n_experts}")
        if not self.moe_n_experts:
            need(self.moe_layer_indices in (None, []),
                 f"model.moe_layer_indices={self.moe_layer_indices} needs model.moe_n_experts > 0")
            return
        need(1 <= self.moe_top_k <= self.moe_n_experts,
             f"model.moe_top_k={self.moe_top_k} must be in 1..model.moe_n_experts={self.moe_n_experts}")
        need(self.moe_hidden >= 0 and self.moe_shared_hidden >= 0,
             f"model.moe_hidden={self.moe_hidden} and model.moe_shared_hidden={self.moe_shared_hidden} must be >= 0")
        need(self.expert_hidden > 0, "the experts' width is model.moe_hidden, or model.mlp_hidden when it is 0; "
                                     "both are 0")
        need(self.moe_score in MOE_SCORES,
             f"model.moe_score={self.moe_score!r}; expected one of {', '.join(MOE_SCORES)}")
        need(self.moe_impl in MOE_IMPLS, f"model.moe_impl={self.moe_impl!r}; expected one of {', '.join(MOE_IMPLS)}")
        need(self.moe_aux_loss_coef >= 0 and self.moe_z_loss_coef >= 0,
             f"model.moe_aux_loss_coef={self.moe_aux_loss_coef} and model.moe_z_loss_coef={self.moe_z_loss_coef} "
             "must be >= 0")
        need(self.moe_every >= 1 and 0 <= self.moe_offset < self.moe_every,
             f"model.moe_every={self.moe_every} and model.moe_offset={self.moe_offset} must satisfy "
             "moe_every >= 1 and 0 <= moe_offset < moe_every")
        if self.moe_layer_indices is not None:
            for i in self.moe_layer_indices:
                need(0 <= i < self.n_layers,
                     f"model.moe_layer_indices has {i}, outside 0..n_layers-1={self.n_layers - 1}")
            need(len(set(self.moe_layer_indices)) == len(self.moe_layer_indices),
                 f"model.moe_layer_indices={list(self.moe_layer_indices)} repeats an index")
        need(bool(self.moe_layers),
             f"model.moe_n_experts={self.moe_n_experts} but no block is an MoE block (model.moe_layer_indices="
             f"{self.moe_layer_indices}, model.moe_every={self.moe_every}, model.moe_offset={self.moe_offset}, "
             f"model.n_layers={self.n_layers})")

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
