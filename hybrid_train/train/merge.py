"""Merging checkpoints tensor by tensor: MergeKit's `linear` (weighted average) and `slerp`.

    linear:  merged = sum_i w_i * theta_i / sum_i w_i      (normalize, the default)
             merged = sum_i w_i * theta_i                  (normalize: false)
    slerp:   spherical interpolation of two models with t in [0, 1] (t=0 gives the base model),
             falling back to linear interpolation when the two tensors are nearly colinear.

Inputs are native checkpoints or HF Bamba directories, in any mix. A merge is itself a tensor
source (see `hybrid_train.train.export`): each merged tensor is computed when a writer asks for it,
so memory stays at a few tensors whatever the model size. Arithmetic is in float32 (float64 when an
input is float64); the result is cast to `dtype` (default: the first model's stored dtype).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from hybrid_train.model import ModelConfig
from hybrid_train.train.export import DTYPES, open_source

METHODS = ("linear", "slerp")
# Fields that neither shape a tensor nor change the forward pass; merging across them is fine.
_NOT_ARCHITECTURE = {"name", "init_std", "doc_masking", "ssm_chunk_size", "ssm_dt_min", "ssm_dt_max",
                     "ssm_dt_init_floor", "ssm_a_init_range", "attn_layer_indices", "layer_pattern",
                     "moe_aux_loss_coef", "moe_z_loss_coef", "moe_impl", "moe_layer_indices", "moe_every", "moe_offset"}
SLERP_DOT_THRESHOLD = 0.9995  # MergeKit's: above it the tensors are treated as colinear
SLERP_EPS = 1e-8


@dataclasses.dataclass
class MergeSpec:
    models: list[str]
    """Native checkpoints (or run directories) and HF Bamba directories."""
    weights: list[float]
    """linear: one weight per model."""
    method: str = "linear"
    normalize: bool = True
    """linear: divide by the sum of the weights."""
    t: float = 0.5
    """slerp: interpolation factor; 0 gives models[0] (the base model), 1 gives models[1]."""
    dtype: torch.dtype | None = None
    """Output dtype; None keeps the first model's."""

    def validate(self) -> "MergeSpec":
        if self.method not in METHODS:
            raise ValueError(f"merge_method {self.method!r} is not supported; use one of {', '.join(METHODS)}")
        if len(self.models) < 2:
            raise ValueError(f"a merge needs at least two models, got {len(self.models)}")
        if self.method == "slerp":
            if len(self.models) != 2:
                raise ValueError(f"slerp merges exactly two models, got {len(self.models)}")
            if not 0 <= self.t <= 1:
                raise ValueError(f"slerp t={self.t} must be in [0, 1]")
        else:
            if len(self.weights) != len(self.models):
                raise ValueError(f"{len(self.weights)} weights for {len(self.models)} models")
            if not all(math.isfinite(w) for w in self.weights):
                raise ValueError(f"weights must be finite numbers, got {self.weights}")
            if self.normalize and sum(self.weights) == 0:
                raise ValueError(f"weights {self.weights} sum to 0; cannot normalize")
        return self


def _dtype(name):
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} must be one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a single number, got {value!r} (per-layer gradients and per-tensor "
                         "filters are not supported)")
    return float(value)


def load_merge_config(path: str | os.PathLike) -> MergeSpec:
    """A MergeKit-style YAML: `models: [{model: PATH, parameters: {weight: W}}, ...]`,
    `merge_method: linear | slerp`, `base_model:` (slerp), `parameters: {normalize: true, t: 0.5}`,
    `dtype:` / `out_dtype:`. Relative model paths are relative to the YAML file's folder."""
    import yaml

    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    known = {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unsupported key(s) {unknown} (slices/layer ranges are not supported; "
                         f"list whole models under `models:`)")
    if not raw.get("models"):
        raise ValueError(f"{path}: `models:` is missing or empty")
    where = lambda p: str(p if Path(p).is_absolute() else path.parent / p)  # noqa: E731
    method = raw.get("merge_method", "linear")
    params = raw.get("parameters") or {}
    models, weights = [], []
    for i, entry in enumerate(raw["models"]):
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"{path}: models[{i}] must be a mapping with a `model:` path, got {entry!r}")
        models.append(where(entry["model"]))
        weight = (entry.get("parameters") or {}).get("weight")
        if method == "linear":
            if weight is None:
                raise ValueError(f"{path}: models[{i}] ({entry['model']}) has no parameters.weight")
            weights.append(_number(weight, f"models[{i}].parameters.weight"))
    if method == "slerp":
        base = raw.get("base_model")
        if base is not None:
            base = where(base)
            if base not in models:
                models.insert(0, base)
            models.sort(key=lambda m: m != base)  # the base model first: t=0 gives it
    return MergeSpec(models=models, weights=weights, method=method, normalize=bool(params.get("normalize", True)),
                     t=_number(params.get("t", 0.5), "parameters.t"),
                     dtype=_dtype(raw.get("out_dtype") or raw.get("dtype"))).validate()


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i t_i (/ sum_i w_i), in float32 or float64."""
    compute = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    out = torch.zeros(tensors[0].shape, dtype=compute)
    for tensor, weight in zip(tensors, weights):
        out.add_(tensor.to(compute), alpha=weight)
    return out / sum(weights) if normalize else out


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = SLERP_DOT_THRESHOLD,
          eps: float = SLERP_EPS) -> torch.Tensor:
    """MergeKit's slerp of two whole tensors: the angle between them after normalizing to unit norm;
    linear interpolation when |cos| > dot_threshold."""
    compute = torch.float64 if torch.float64 in (v0.dtype, v1.dtype) else torch.float32
    a, b = v0.to(compute), v1.to(compute)
    na, nb = a.norm(), b.norm()
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = float((ua.double() * ub.double()).sum())
    if abs(dot) > dot_threshold:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    s0 = math.sin(theta * (1 - t)) / math.sin(theta)
    s1 = math.sin(theta * t) / math.sin(theta)
    return s0 * a + s1 * b


def architecture_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """'field: a -> b' for every field that shapes a tensor or changes the forward pass."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    out = [f"{k}: {da[k]!r} -> {db[k]!r}" for k in da if k not in _NOT_ARCHITECTURE and da[k] != db[k]]
    if a.layer_types != b.layer_types:
        out.append(f"layer types: {''.join(a.layer_types)} -> {''.join(b.layer_types)}")
    if a.moe_layers != b.moe_layers:
        out.append(f"MoE blocks: {a.moe_layers} -> {b.moe_layers}")
    return out


class MergedSource:
    """The merge of several tensor sources, itself a tensor source: `tensor(name)` reads that tensor
    from every model and merges it. Architectures and every tensor's shape are checked up front."""

    def __init__(self, spec: MergeSpec, sources: list | None = None):
        self.spec = spec.validate()
        self.sources = sources or [open_source(m) for m in spec.models]
        first = self.sources[0]
        self.model_config = first.model_config
        for model, source in zip(spec.models[1:], self.sources[1:]):
            diffs = architecture_differences(first.model_config, source.model_config)
            if diffs:
                raise ValueError(f"cannot merge {spec.models[0]} with {model}: different architectures:\n  "
                                 + "\n  ".join(diffs))
            names_a, names_b = set(first.names()), set(source.names())
            if names_a != names_b:
                only = sorted(names_a ^ names_b)
                raise ValueError(f"cannot merge {spec.models[0]} with {model}: tensor {only[0]} is in only one "
                                 f"of them ({len(only)} such tensor(s))")
            for name in first.names():
                if tuple(first.shape(name)) != tuple(source.shape(name)):
                    raise ValueError(f"cannot merge {spec.models[0]} with {model}: tensor {name} has shape "
                                     f"{tuple(first.shape(name))} vs {tuple(source.shape(name))}")

    def names(self) -> list[str]:
        return self.sources[0].names()

    def shape(self, name: str) -> torch.Size:
        return self.sources[0].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.spec.dtype or self.sources[0].dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        tensors = [source.tensor(name) for source in self.sources]
        if self.spec.method == "slerp":
            merged = slerp(self.spec.t, tensors[0], tensors[1])
        else:
            merged = linear(tensors, self.spec.weights, self.spec.normalize)
        return merged.to(self.dtype(name))

    def describe(self) -> dict:
        """What the merge was, for the output's meta.json."""
        spec = self.spec
        out = {"method": spec.method, "models": [str(Path(m).resolve()) for m in spec.models]}
        out.update({"t": spec.t} if spec.method == "slerp" else {"weights": spec.weights, "normalize": spec.normalize})
        return out


def merge(spec: MergeSpec, out: str | os.PathLike | None = None, out_hf: str | os.PathLike | None = None,
          max_shard_size: int | None = None, tokenizer: str | None = "auto", progress: bool = False) -> dict:
    """Write the merge as a native checkpoint (`out`) and/or a HF Bamba directory (`out_hf`). The
    tokenizer ("auto": the first model's) goes with it."""
    from hybrid_train.train.export import DEFAULT_MAX_SHARD, export_hf, write_native_checkpoint

    if out is None and out_hf is None:
        raise ValueError("give an output: a native checkpoint path, a HF directory, or both")
    merged = MergedSource(spec)
    result = {}
    if out is not None:
        result["checkpoint"] = write_native_checkpoint(out, merged, {"merge": merged.describe()},
                                                       tokenizer=tokenizer, progress=progress)
    if out_hf is not None:
        # From the written checkpoint when there is one, so the merge is computed once.
        source = open_source(result["checkpoint"]) if out is not None else merged
        result["hf"] = export_hf(source, out_hf, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD,
                                 tokenizer="auto" if out is not None else tokenizer, progress=progress).out_dir
    return result
