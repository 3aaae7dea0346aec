"""Mapping between this model and Hugging Face transformers' Bamba (dense MLPs) or GraniteMoeHybrid
(MoE MLPs, hf_granite.py): config fields both ways, tensor names both ways, and a lazy reader of a
HF directory (safetensors) in this model's names.

transformers packs the Mamba-2 in_proj as [z | x | B | C | dt] and the conv channels as [x | B | C];
here they are separate tensors, so every native tensor is a row range of one HF tensor and is read
with a safetensors slice: an import never holds more than the tensor being read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator, Mapping

import torch

from hybrid_train.model.config import ATTENTION, ModelConfig
from hybrid_train.model.hf_granite import (granite_empty_tensors, granite_mlp_layout, hf_granite_config, legacy_name,
                                           model_config_from_granite)

# transformers' BambaConfig defaults: what transformers assumes when a config.json leaves a field
# out. They are not Bamba-9B's (d_state 256, vocab 128000, ...), so an export writes every field.
HF_BAMBA_DEFAULTS = {
    "vocab_size": 128000, "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "initializer_range": 0.02, "rms_norm_eps": 1e-5, "attn_layer_indices": None, "mamba_n_heads": 128,
    "mamba_d_head": "auto", "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_conv": 4, "mamba_expand": 2,
    "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_proj_bias": False, "time_step_limit": [0.0, math.inf],
    "attention_bias": False, "mlp_bias": False, "rope_theta": 10000.0,
}
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

_IN_PROJ = ("z", "x", "B", "C", "dt")
_CONV = ("x", "B", "C")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def hf_bamba_config(cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None,
                    pad_token_id: int | None = None) -> dict:
    """Every BambaConfig field written out (its defaults are not Bamba-9B's). Raises ValueError naming
    what transformers' Bamba cannot express."""
    problems = []
    if cfg.moe_n_experts:
        problems.append(f"moe_n_experts={cfg.moe_n_experts} (transformers' Bamba has no MoE; GraniteMoeHybrid does)")
    for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if getattr(cfg, key) != 1.0:
            problems.append(f"{key}={getattr(cfg, key)} (transformers' Bamba has no such multiplier)")
    if ATTENTION in cfg.layer_types:  # without attention layers these fields shape no tensor
        if cfg.n_heads * cfg.head_dim != cfg.d_model:
            problems.append(f"head_dim={cfg.head_dim} x n_heads={cfg.n_heads} != d_model={cfg.d_model} "
                            "(transformers derives head_dim from d_model)")
        if cfg.partial_rotary_factor != 0.5:
            problems.append(f"partial_rotary_factor={cfg.partial_rotary_factor} (transformers' Bamba fixes 0.5)")
        if not cfg.attn_rope:
            problems.append("attn_rope=false (transformers' Bamba always rotates)")
        if cfg.attn_scale is not None and not math.isclose(cfg.attn_scale, cfg.head_dim ** -0.5, rel_tol=1e-9):
            problems.append(f"attn_scale={cfg.attn_scale} (transformers' Bamba scales by head_dim**-0.5)")
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
        # transformers 4.x reads rope_theta at the top level, 5.x reads rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 0.5},
    }


def hf_config(cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None) -> dict:
    """The config.json of the transformers model that expresses `cfg`: GraniteMoeHybrid for an MoE model,
    else Bamba. Raises ValueError naming what that model cannot express."""
    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return hf_granite_config(cfg, **ids) if cfg.moe_n_experts else hf_bamba_config(cfg, **ids)


def _float(value) -> float:
    """A JSON float, including transformers 5's {"__float__": "Infinity"} spelling."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def model_config_from_hf(hf: Mapping, name: str = "imported") -> ModelConfig:
    """The ModelConfig of a HF Bamba config.json (as a dict); missing fields take transformers' defaults,
    exactly as transformers would. Raises ValueError naming what this model cannot express."""
    if hf.get("model_type") == "granitemoehybrid":
        return model_config_from_granite(hf, name, _float)
    get = lambda key: hf[key] if hf.get(key) is not None else HF_BAMBA_DEFAULTS[key]  # noqa: E731
    problems = []
    if hf.get("model_type", "bamba") != "bamba":
        problems.append(f"model_type={hf.get('model_type')!r} (only 'bamba' and 'granitemoehybrid' are supported)")
    if get("hidden_act") != "silu":
        problems.append(f"hidden_act={get('hidden_act')!r} (the MLP is SwiGLU with silu)")
    for key in ("attention_bias", "mlp_bias"):
        if get(key):
            problems.append(f"{key}=true (attention and MLP have no biases here)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope_type={rope.get('rope_type', rope.get('type'))!r} (only default RoPE)")
    if problems:
        raise ValueError(f"HF Bamba config of '{name}' is not supported: " + "; ".join(problems))
    d_model, n_heads = get("hidden_size"), get("num_attention_heads")
    expand, mamba_heads = get("mamba_expand"), get("mamba_n_heads")
    d_head = get("mamba_d_head")
    limit = hf.get("time_step_limit")
    return ModelConfig(
        name=name,
        vocab_size=get("vocab_size"),
        d_model=d_model,
        n_layers=get("num_hidden_layers"),
        attn_layer_indices=sorted(get("attn_layer_indices") or []),
        tie_embeddings=bool(get("tie_word_embeddings")),
        norm_eps=float(get("rms_norm_eps")),
        init_std=float(get("initializer_range")),
        mlp_hidden=get("intermediate_size"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", HF_BAMBA_DEFAULTS["rope_theta"]))),
        partial_rotary_factor=0.5,  # transformers' Bamba fixes it, whatever the file says
        ssm_d_state=get("mamba_d_state"),
        ssm_d_conv=get("mamba_d_conv"),
        ssm_expand=expand,
        ssm_head_dim=expand * d_model // mamba_heads if d_head == "auto" else d_head,
        ssm_n_groups=get("mamba_n_groups"),
        ssm_chunk_size=get("mamba_chunk_size"),
        ssm_conv_bias=bool(get("mamba_conv_bias")),
        ssm_proj_bias=bool(get("mamba_proj_bias")),
        ssm_dt_limit=[0.0, math.inf] if limit is None else [_float(v) for v in limit],
    ).validate()


def hf_token_ids(hf: Mapping) -> dict:
    """bos/eos/pad token ids of a HF config (None where it has none)."""
    return {key: hf.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def hf_layout(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """(HF name, native names concatenated along dim 0 to make it), in HF order. A tied model has no
    HF lm_head.weight; its native lm_head.weight is the embedding. MoE models: GraniteMoeHybrid's names."""
    granite = bool(cfg.moe_n_experts)
    out = [("model.embed_tokens.weight", ["embed.weight"])]
    for i, kind in enumerate(cfg.layer_types):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out.append((dst + "input_layernorm.weight", [src + "mixer_norm.weight"]))
        if granite:
            out.append((dst + "post_attention_layernorm.weight", [src + "mlp_norm.weight"]))
            out += granite_mlp_layout(cfg, src, dst)
        else:
            out.append((dst + "pre_ff_layernorm.weight", [src + "mlp_norm.weight"]))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out.append((dst + f"feed_forward.{proj}.weight", [src + f"mlp.{proj}.weight"]))
        if kind == ATTENTION:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out.append((dst + f"self_attn.{proj}.weight", [src + f"mixer.{proj}.weight"]))
            continue
        mixer, mamba = src + "mixer.", dst + "mamba."
        out.append((mamba + "in_proj.weight", [mixer + f"in_proj.{c}.weight" for c in _IN_PROJ]))
        if cfg.ssm_proj_bias:
            out.append((mamba + "in_proj.bias", [mixer + f"in_proj.{c}.bias" for c in _IN_PROJ]))
            out.append((mamba + "out_proj.bias", [mixer + "out_proj.bias"]))
        out.append((mamba + "conv1d.weight", [mixer + f"conv1d.{c}.weight" for c in _CONV]))
        if cfg.ssm_conv_bias:
            out.append((mamba + "conv1d.bias", [mixer + f"conv1d.{c}.bias" for c in _CONV]))
        for name in ("dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"):
            out.append((mamba + name, [mixer + name]))
    out.append(("model.norm.weight" if granite else "model.final_layernorm.weight", ["norm.weight"]))
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ["lm_head.weight"]))
    return out


def hf_empty_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensors (name -> shape) with no elements and no native counterpart, written as they are."""
    return granite_empty_tensors(cfg) if cfg.moe_n_experts else {}


def native_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of HybridLM.state_dict() (built on meta: no memory)."""
    from hybrid_train.model import build_model

    return {name: t.shape for name, t in build_model(cfg, device="meta").state_dict().items()}


def native_slices(cfg: ModelConfig, shapes: Mapping[str, torch.Size] | None = None) -> dict[str, tuple[str, int, int]]:
    """Native name -> (HF name, first row, end row): where each native tensor lives in a HF checkpoint.
    Keys and their order are those of HybridLM.state_dict() (`shapes`: native_shapes(cfg))."""
    shapes = shapes or native_shapes(cfg)
    where = {}
    for hf_name, parts in hf_layout(cfg):
        row = 0
        for part in parts:
            where[part] = (hf_name, row, row + shapes[part][0])
            row += shapes[part][0]
    if cfg.tie_embeddings:
        where["lm_head.weight"] = where["embed.weight"]
    return {name: where[name] for name in shapes}


def to_hf_tensors(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) one at a time from this model's tensors by native name. `state` may be
    any mapping, e.g. one that reads each tensor from disk when asked."""
    for hf_name, parts in hf_layout(cfg):
        yield hf_name, state[parts[0]] if len(parts) == 1 else torch.cat([state[p] for p in parts])


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    return json.loads(path.read_text())


def is_hf_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and ((path / SAFE_INDEX).is_file() or (path / SAFE_SINGLE).is_file())


class HFCheckpoint:
    """A HF Bamba directory (config.json + safetensors, sharded or not) read lazily in native names.

    `tensor(name)` reads only the rows of the HF tensor that make that native tensor. Shapes are checked
    against the config before anything is read; extra or missing HF tensors are an error naming them.
    """

    def __init__(self, hf_dir: str | os.PathLike, name: str | None = None):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        self.hf_config = read_hf_config(self.dir)
        self.model_config = model_config_from_hf(self.hf_config, name or self.dir.resolve().name)
        self.token_ids = hf_token_ids(self.hf_config)
        if (self.dir / SAFE_INDEX).is_file():
            weight_map = json.loads((self.dir / SAFE_INDEX).read_text())["weight_map"]
        elif (self.dir / SAFE_SINGLE).is_file():
            weight_map = None
        else:
            found = sorted(p.name for p in self.dir.iterdir())
            raise FileNotFoundError(f"{self.dir} has neither {SAFE_INDEX} nor {SAFE_SINGLE} (found {found}); "
                                    "only safetensors checkpoints are supported")
        files = sorted(set(weight_map.values())) if weight_map else [SAFE_SINGLE]
        self._files = {f: safe_open(str(self.dir / f), framework="pt") for f in files}
        # transformers 5 saves MoE tensors under its module names; read them under the released ones.
        self._where = {legacy_name(key): (f, key) for f, handle in self._files.items() for key in handle.keys()}
        shapes = native_shapes(self.model_config)
        self._slices = native_slices(self.model_config, shapes)
        self._check(shapes)

    def _check(self, shapes: Mapping[str, torch.Size]) -> None:
        cfg = self.model_config
        expected = {hf: (sum(shapes[p][0] for p in parts), *shapes[parts[0]][1:]) for hf, parts in hf_layout(cfg)}
        present = set(self._where)
        empty = hf_empty_tensors(cfg)  # read for no tensor; checked when stored
        empty_problems = [f"{n}: stored {tuple(self._slice(n).get_shape())} vs config {shape}"
                          for n, shape in empty.items() if n in present and tuple(self._slice(n).get_shape()) != shape]
        present -= set(empty)
        if cfg.tie_embeddings:
            present.discard("lm_head.weight")  # some tied exports still store the head; it is the embedding
        problems = empty_problems + [f"missing {n}" for n in sorted(set(expected) - present)]
        problems += [f"unexpected {n}" for n in sorted(present - set(expected))]
        for name in sorted(set(expected) & present):
            shape = tuple(self._slice(name).get_shape())
            if shape != tuple(expected[name]):
                problems.append(f"{name}: stored {shape} vs config {tuple(expected[name])}")
        if problems:
            raise ValueError(f"{self.dir}: tensors do not match its config.json:\n  " + "\n  ".join(problems[:20]))

    def _slice(self, hf_name: str):
        file, stored = self._where[hf_name]
        return self._files[file].get_slice(stored)

    def names(self) -> list[str]:
        """Native tensor names, in HybridLM.state_dict() order."""
        return list(self._slices)

    def shape(self, name: str) -> torch.Size:
        hf_name, start, stop = self._slices[name]
        return torch.Size([stop - start, *self._slice(hf_name).get_shape()[1:]])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._slice(self._slices[name][0]).get_dtype()]

    def tensor(self, name: str) -> torch.Tensor:
        """The native tensor `name`, read from its row range of the HF tensor."""
        if name not in self._slices:
            raise KeyError(f"{self.dir} has no tensor {name!r} for this model")
        hf_name, start, stop = self._slices[name]
        return self._slice(hf_name)[start:stop].contiguous()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._slices:
            yield name, self.tensor(name)


def load_hf_checkpoint(hf_dir: str | os.PathLike, dtype: torch.dtype | None = None
                       ) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """(ModelConfig, iterator of (native name, full tensor)) of a HF Bamba directory.

    The iterator yields every key of HybridLM.state_dict() once, in that order (a tied model's
    lm_head.weight equals embed.weight), one tensor read at a time, in the stored dtype or `dtype`.
    Config and tensor shapes are checked before this returns.
    """
    ckpt = HFCheckpoint(hf_dir)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in ckpt:
            yield name, tensor if dtype is None else tensor.to(dtype)

    return ckpt.model_config, tensors()
