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
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from hybrid_train.model import HybridLM, ModelConfig, build_model

META = "meta.json"
LATEST = "latest"


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hybrid_train")
    except PackageNotFoundError:
        return "unknown"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra_state: dict, meta: dict, is_main: bool) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        **extra_state,
    }
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if is_main:
        (tmp / META).write_text(json.dumps({"step": step, "code_version": code_version(), **meta}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / LATEST)
    _barrier()
    return final


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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
