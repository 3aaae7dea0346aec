"""Checkpoints: sharded DCP state plus a small meta.json that says what produced them.

Layout: <run.dir>/checkpoints/step_00000123/{*.distcp, .metadata, meta.json} and a `latest` file
naming the newest complete one. A checkpoint is written under a temporary name and renamed only
when complete, so a crash mid-save never leaves a half checkpoint where a reader would look.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from hybrid_train.model import HybridLM, ModelConfig, build_model

# DCP says so on every single-process save/load; that is the intended use here, not a problem.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

META = "meta.json"
LATEST = "latest"


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        ...  # no git here (an installed copy): fall back to the package version
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hybrid_train")
    except PackageNotFoundError:
        return "unknown"


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint directory can't be loaded (None when it is complete): meta.json, DCP metadata
    and every shard file it references, at its full length."""
    if not (ckpt / META).is_file():
        return f"no {META}"
    try:
        json.loads((ckpt / META).read_text())
    except ValueError as err:
        return f"unreadable {META} ({err})"
    if not (ckpt / ".metadata").is_file():
        return "no DCP .metadata"
    try:
        metadata = dcp.FileSystemReader(str(ckpt)).read_metadata()
    except Exception as err:  # a truncated pickle can raise anything
        return f"unreadable DCP .metadata ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = ckpt / name
        if not path.is_file():
            return f"missing shard {name}"
        if path.stat().st_size < size:
            return f"truncated shard {name} ({path.stat().st_size} of {size} bytes)"
    return None


def model_config_differences(saved: dict, current: dict) -> list[str]:
    """Architecture fields that differ ('field: saved -> current'); init-only knobs and labels are ignored."""
    ignore = {"name", "init_std", "ssm_dt_min", "ssm_dt_max", "ssm_dt_init_floor", "ssm_a_init_range", "kernels"}
    keys = sorted((set(saved) | set(current)) - ignore)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory / checkpoints folder whose `latest` names one."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for root in (path / "checkpoints", path):
        if (root / LATEST).is_file():
            ckpt = root / (root / LATEST).read_text().strip()
            if not (ckpt / META).is_file():
                raise FileNotFoundError(f"{root / LATEST} names {ckpt}, which has no {META}")
            return ckpt
    raise FileNotFoundError(f"{path} is neither a checkpoint (no {META}) nor a run directory with checkpoints/{LATEST}")


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / META).read_text())


def model_config_from_meta(meta: dict, source: Path) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    raw = meta.get("model_config")
    if raw is None:
        raise ValueError(f"{source / META} has no model_config")
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"{source / META}: model_config has fields this version does not know: {unknown}")
    return ModelConfig(**raw)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> HybridLM:
    """The model of a checkpoint (or of a run directory's latest checkpoint), in eval mode."""
    ckpt = resolve_checkpoint(path)
    cfg = model_config_from_meta(read_meta(ckpt), ckpt)
    model = build_model(cfg, device="meta")
    model.to_empty(device=device)
    model.tie_weights()
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict(state["model"])
    return model.to(dtype).eval()


def model_tensor_metadata(ckpt: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (shape, dtype) of every model tensor stored in a checkpoint, read from DCP metadata only."""
    metadata = dcp.FileSystemReader(str(ckpt)).read_metadata()
    out = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(item, "size"):
            out[key[len("model."):]] = (item.size, item.properties.dtype)
    return out


def iter_model_tensors(ckpt: str | os.PathLike, names: list[str] | None = None):
    """Yield (name, full tensor) of a checkpoint's model one at a time: memory stays about one tensor,
    whatever the layout the checkpoint was saved under."""
    ckpt = resolve_checkpoint(ckpt)
    meta = model_tensor_metadata(ckpt)
    for name in names or list(meta):
        if name not in meta:
            raise KeyError(f"{ckpt} has no model tensor {name!r}")
        shape, dtype = meta[name]
        state = {"model": {name: torch.empty(shape, dtype=dtype)}}
        dcp.load(state, checkpoint_id=str(ckpt))
        yield name, state["model"][name]


def weights_only_meta(model_cfg: ModelConfig, meta: dict | None = None) -> dict:
    """meta.json of a checkpoint that holds weights only (an import or a merge): no optimizer or data."""
    return {"step": 0, "tokens": 0, "code_version": code_version(), **(meta or {}),
            "model_config": dataclasses.asdict(model_cfg), "weights_only": True}


def write_model_checkpoint(path: str | os.PathLike, model_state: dict[str, torch.Tensor], model_cfg: ModelConfig,
                           meta: dict | None = None) -> Path:
    """A weights-only checkpoint (no optimizer or data state) in the native layout, e.g. from an import
    or a merge; it can be loaded by load_model and used as checkpoint.init_from."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    tmp = path.with_name(f".tmp_{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dcp.save({"model": model_state}, checkpoint_id=str(tmp))
    (tmp / META).write_text(json.dumps(weights_only_meta(model_cfg, meta), indent=2))
    os.replace(tmp, path)
    return path
