"""Mapping between this model's MoE hybrids and transformers' GraniteMoeHybrid (IBM Granite 4.0 hybrid):
config fields both ways and the MLP tensor names (mixers and norms are Bamba's, see hf.py).

GraniteMoeHybrid has the same MLP in every block: `num_local_experts` routed SwiGLU experts (top-k of
a softmax, renormalized: the softmax of the top-k logits) plus a shared SwiGLU expert of width
`shared_intermediate_size` (0 gives none: zero-size tensors). Tensors are written under the names of
the released checkpoints, which transformers 4.x reads as they are and 5.x renames on load:

    block_sparse_moe.router.layer.weight   (E, d)         = mlp.router.weight
    block_sparse_moe.input_linear.weight   (E, 2h, d)     = mlp.experts.gate_up_proj   (gate rows first)
    block_sparse_moe.output_linear.weight  (E, d, h)      = mlp.experts.down_proj
    shared_mlp.input_linear.weight         (2s, d)        = [mlp.shared_expert.gate_proj | up_proj]
    shared_mlp.output_linear.weight        (d, s)         = mlp.shared_expert.down_proj
"""

from __future__ import annotations

import math
from typing import Mapping

from hybrid_train.model.config import ATTENTION, ModelConfig

# GraniteMoeHybridConfig's defaults (what transformers assumes for a missing field).
HF_GRANITE_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "embedding_multiplier": 1.0,
    "logits_scaling": 1.0, "residual_multiplier": 1.0, "attention_multiplier": 1.0, "num_local_experts": 8,
    "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001, "shared_intermediate_size": 1024,
    "position_embedding_type": None, "layer_types": None, "mamba_n_heads": 128, "mamba_n_groups": 1,
    "mamba_d_state": 256, "mamba_d_head": "auto", "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256,
    "mamba_conv_bias": True, "mamba_proj_bias": False, "time_step_limit": [0.0, math.inf],
}
# Names of the released checkpoints <- names of transformers 5's modules (either is read).
LEGACY_NAMES = {"block_sparse_moe.experts.gate_up_proj": "block_sparse_moe.input_linear.weight",
                "block_sparse_moe.experts.down_proj": "block_sparse_moe.output_linear.weight",
                "block_sparse_moe.router.weight": "block_sparse_moe.router.layer.weight"}
_ATTENTION_TYPES = {"attention", "full_attention"}
_MAMBA_TYPES = {"mamba", "linear_attention"}


def granite_problems(cfg: ModelConfig) -> list[str]:
    """What transformers' GraniteMoeHybrid cannot express of `cfg` (empty: it can)."""
    problems = []
    dense = [i for i in range(cfg.n_layers) if i not in set(cfg.moe_layers)]
    if dense:
        problems.append(f"dense MLP in blocks {dense} (model.moe_layer_indices / moe_every={cfg.moe_every}, "
                        f"moe_offset={cfg.moe_offset}): GraniteMoeHybrid has an MoE MLP in every block")
    if cfg.moe_score != "softmax":
        problems.append(f"moe_score={cfg.moe_score!r} (GraniteMoeHybrid routes on a softmax)")
    if not cfg.moe_norm_topk:
        problems.append("moe_norm_topk=false (GraniteMoeHybrid renormalizes the top-k weights)")
    if ATTENTION in cfg.layer_types:
        if cfg.n_heads * cfg.head_dim != cfg.d_model:
            problems.append(f"head_dim={cfg.head_dim} x n_heads={cfg.n_heads} != d_model={cfg.d_model} "
                            "(transformers derives head_dim from d_model)")
        if cfg.attn_rope and cfg.partial_rotary_factor != 1.0:
            problems.append(f"partial_rotary_factor={cfg.partial_rotary_factor} (GraniteMoeHybrid rotates whole heads)")
    return problems


def hf_granite_config(cfg: ModelConfig, bos_token_id=None, eos_token_id=None, pad_token_id=None) -> dict:
    """Every GraniteMoeHybridConfig field written out. Raises ValueError naming what it cannot express."""
    problems = granite_problems(cfg)
    if problems:
        raise ValueError(f"model '{cfg.name}' cannot be expressed as a transformers GraniteMoeHybrid model: "
                         + "; ".join(problems))
    return {
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "model_type": "granitemoehybrid",
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.expert_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "use_cache": True,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "max_position_embeddings": 262144,
        "attention_dropout": 0.0,
        "attention_bias": False,
        "embedding_multiplier": cfg.embedding_multiplier,
        "logits_scaling": cfg.logits_scaling,
        "residual_multiplier": cfg.residual_multiplier,
        "attention_multiplier": cfg.head_dim ** -0.5 if cfg.attn_scale is None else cfg.attn_scale,
        "num_local_experts": cfg.moe_n_experts,
        "num_experts_per_tok": cfg.moe_top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": cfg.moe_aux_loss_coef,
        "shared_intermediate_size": cfg.moe_shared_hidden,
        "position_embedding_type": "rope" if cfg.attn_rope else "nope",
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads it here
        "layer_types": ["attention" if kind == ATTENTION else "mamba" for kind in cfg.layer_types],
        "mamba_n_heads": cfg.ssm_n_heads,
        "mamba_n_groups": cfg.ssm_n_groups,
        "mamba_d_state": cfg.ssm_d_state,
        "mamba_d_head": cfg.ssm_head_dim,
        "mamba_d_conv": cfg.ssm_d_conv,
        "mamba_expand": cfg.ssm_expand,
        "mamba_chunk_size": cfg.ssm_chunk_size,
        "mamba_conv_bias": cfg.ssm_conv_bias,
        "mamba_proj_bias": cfg.ssm_proj_bias,
        "time_step_limit": [float(v) for v in cfg.ssm_dt_limit],
    }


def model_config_from_granite(hf: Mapping, name: str, as_float) -> ModelConfig:
    """The ModelConfig of a GraniteMoeHybrid config.json (missing fields: transformers' defaults). Raises
    ValueError naming what this model cannot express."""
    get = lambda key: hf[key] if hf.get(key) is not None else HF_GRANITE_DEFAULTS[key]  # noqa: E731
    d_model, n_heads = get("hidden_size"), get("num_attention_heads")
    head_dim = d_model // n_heads
    problems = []
    if get("hidden_act") != "silu":
        problems.append(f"hidden_act={get('hidden_act')!r} (the experts are SwiGLU with silu)")
    if get("attention_bias"):
        problems.append("attention_bias=true (attention has no biases here)")
    if get("position_embedding_type") not in ("rope", "nope", None):
        problems.append(f"position_embedding_type={get('position_embedding_type')!r} (rope or none)")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r} (only default RoPE)")
    if not get("num_local_experts"):
        problems.append("num_local_experts=0 (a dense GraniteMoeHybrid; export dense models as Bamba)")
    types = get("layer_types") or ["mamba"] * get("num_hidden_layers")
    unknown = sorted(set(types) - _ATTENTION_TYPES - _MAMBA_TYPES)
    if unknown:
        problems.append(f"layer_types {unknown} (mamba and attention only)")
    if problems:
        raise ValueError(f"HF GraniteMoeHybrid config of '{name}' is not supported: " + "; ".join(problems))
    expand, mamba_heads, d_head = get("mamba_expand"), get("mamba_n_heads"), get("mamba_d_head")
    scale = float(get("attention_multiplier"))
    limit = hf.get("time_step_limit")
    return ModelConfig(
        name=name,
        vocab_size=get("vocab_size"),
        d_model=d_model,
        n_layers=get("num_hidden_layers"),
        attn_layer_indices=[i for i, t in enumerate(types) if t in _ATTENTION_TYPES],
        tie_embeddings=bool(get("tie_word_embeddings")),
        norm_eps=float(get("rms_norm_eps")),
        init_std=float(get("initializer_range")),
        mlp_hidden=0,
        n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        partial_rotary_factor=1.0,
        attn_rope=get("position_embedding_type") == "rope",
        attn_scale=None if math.isclose(scale, head_dim ** -0.5, rel_tol=1e-9) else scale,
        embedding_multiplier=float(get("embedding_multiplier")),
        residual_multiplier=float(get("residual_multiplier")),
        logits_scaling=float(get("logits_scaling")),
        ssm_d_state=get("mamba_d_state"),
        ssm_d_conv=get("mamba_d_conv"),
        ssm_expand=expand,
        ssm_head_dim=expand * d_model // mamba_heads if d_head == "auto" else d_head,
        ssm_n_groups=get("mamba_n_groups"),
        ssm_chunk_size=get("mamba_chunk_size"),
        ssm_conv_bias=bool(get("mamba_conv_bias")),
        ssm_proj_bias=bool(get("mamba_proj_bias")),
        ssm_dt_limit=[0.0, math.inf] if limit is None else [as_float(v) for v in limit],
        moe_n_experts=get("num_local_experts"),
        moe_top_k=get("num_experts_per_tok"),
        moe_hidden=get("intermediate_size"),
        moe_shared_hidden=get("shared_intermediate_size"),
        moe_score="softmax",
        moe_norm_topk=True,
        moe_aux_loss_coef=float(get("router_aux_loss_coef")),
        moe_every=1,
        moe_offset=0,
    ).validate()


def granite_mlp_layout(cfg: ModelConfig, src: str, dst: str) -> list[tuple[str, list[str]]]:
    """(HF name, native parts) of one block's MoE MLP; src/dst: the block's native / HF prefixes."""
    moe, shared = src + "mlp.", src + "mlp.shared_expert."
    out = [(dst + "block_sparse_moe.router.layer.weight", [moe + "router.weight"]),
           (dst + "block_sparse_moe.input_linear.weight", [moe + "experts.gate_up_proj"]),
           (dst + "block_sparse_moe.output_linear.weight", [moe + "experts.down_proj"])]
    if cfg.moe_shared_hidden:
        out += [(dst + "shared_mlp.input_linear.weight", [shared + "gate_proj.weight", shared + "up_proj.weight"]),
                (dst + "shared_mlp.output_linear.weight", [shared + "down_proj.weight"])]
    return out


def granite_empty_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensors with no native counterpart: the zero-width shared expert when there is none."""
    if cfg.moe_shared_hidden:
        return {}
    out = {}
    for i in range(cfg.n_layers):
        out[f"model.layers.{i}.shared_mlp.input_linear.weight"] = (0, cfg.d_model)
        out[f"model.layers.{i}.shared_mlp.output_linear.weight"] = (cfg.d_model, 0)
    return out


def legacy_name(hf_name: str) -> str:
    """A transformers 5 module name as the released checkpoints spell it (others unchanged)."""
    for new, old in LEGACY_NAMES.items():
        if hf_name.endswith(new):
            return hf_name[: -len(new)] + old
    return hf_name
