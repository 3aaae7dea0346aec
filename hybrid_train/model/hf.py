"""Mapping between this model and Hugging Face transformers' Bamba (config fields and tensor names)."""

from __future__ import annotations

from typing import Iterator

import torch

from hybrid_train.model.config import ATTENTION, ModelConfig


def hf_bamba_config(cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None,
                    pad_token_id: int | None = None) -> dict:
    """Every BambaConfig field written out (its defaults are not Bamba-9B's)."""
    problems = []
    if cfg.n_heads * cfg.head_dim != cfg.d_model:
        problems.append(f"head_dim={cfg.head_dim} x n_heads={cfg.n_heads} != d_model={cfg.d_model} "
                        "(transformers derives head_dim from d_model)")
    if cfg.partial_rotary_factor != 0.5:
        problems.append(f"partial_rotary_factor={cfg.partial_rotary_factor} (transformers' Bamba fixes 0.5)")
    if cfg.mlp_hidden == 0:
        problems.append("mlp_hidden=0 (transformers' Bamba has an MLP in every block)")
    if problems:
        raise ValueError(f"model '{cfg.name}' cannot be expressed as a transformers Bamba model: " + "; ".join(problems))
    attn = [i for i, kind in enumerate(cfg.layer_types) if kind == ATTENTION]
    return {
        "architectures": ["BambaForCausalLM"],
        "model_type": "bamba",
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "use_cache": True,
        "num_logits_to_keep": 1,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "max_position_embeddings": 262144,
        "attention_dropout": 0.0,
        "attention_bias": False,
        "mlp_bias": False,
        "attn_layer_indices": attn,
        "mamba_n_heads": cfg.ssm_n_heads,
        "mamba_d_head": cfg.ssm_head_dim,
        "mamba_n_groups": cfg.ssm_n_groups,
        "mamba_d_state": cfg.ssm_d_state,
        "mamba_d_conv": cfg.ssm_d_conv,
        "mamba_expand": cfg.ssm_expand,
        "mamba_chunk_size": cfg.ssm_chunk_size,
        "mamba_conv_bias": cfg.ssm_conv_bias,
        "mamba_proj_bias": cfg.ssm_proj_bias,
        "time_step_limit": [float(v) for v in cfg.ssm_dt_limit],
        "z_loss_coefficient": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 0.5},
    }


def to_hf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) one at a time from this model's state dict (names as in HybridLM)."""
    yield "model.embed_tokens.weight", state["embed.weight"]
    for i, kind in enumerate(cfg.layer_types):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        yield dst + "input_layernorm.weight", state[src + "mixer_norm.weight"]
        yield dst + "pre_ff_layernorm.weight", state[src + "mlp_norm.weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield dst + f"feed_forward.{proj}.weight", state[src + f"mlp.{proj}.weight"]
        if kind == ATTENTION:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield dst + f"self_attn.{proj}.weight", state[src + f"mixer.{proj}.weight"]
            continue
        mixer, mamba = src + "mixer.", dst + "mamba."
        # HF packs in_proj as [z | x | B | C | dt] and the conv channels as [x | B | C].
        yield mamba + "in_proj.weight", torch.cat(
            [state[mixer + f"in_proj.{c}.weight"] for c in ("z", "x", "B", "C", "dt")])
        if cfg.ssm_proj_bias:
            yield mamba + "in_proj.bias", torch.cat([state[mixer + f"in_proj.{c}.bias"] for c in ("z", "x", "B", "C", "dt")])
            yield mamba + "out_proj.bias", state[mixer + "out_proj.bias"]
        yield mamba + "conv1d.weight", torch.cat([state[mixer + f"conv1d.{c}.weight"] for c in ("x", "B", "C")])
        if cfg.ssm_conv_bias:
            yield mamba + "conv1d.bias", torch.cat([state[mixer + f"conv1d.{c}.bias"] for c in ("x", "B", "C")])
        for name in ("dt_bias", "A_log", "D"):
            yield mamba + name, state[mixer + name]
        yield mamba + "norm.weight", state[mixer + "norm.weight"]
        yield mamba + "out_proj.weight", state[mixer + "out_proj.weight"]
    yield "model.final_layernorm.weight", state["norm.weight"]
    if not cfg.tie_embeddings:
        yield "lm_head.weight", state["lm_head.weight"]
