"""Saving and restoring a run: atomic (optionally async) saves, pruning, auto-resume, and stage starts.

A checkpoint directory holds
  - DCP shards of {"model", "optim"}: sharded tensors, loadable under any world size or layout;
  - rank_<rank>.pt per rank (five digits): that rank's data-loader position, RNG states and the LR-scheduler state;
  - meta.json: counters, stage, model config, resolved job config, code version, world size.
It is written under a temporary name and renamed when every part is on disk; `latest` moves after.

Resume (same run: everything, including data position) and init_from (a new stage: weights, and
optionally optimizer; counters continue, schedule and data start fresh) are separate paths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from hybrid_train.model import ModelConfig
from hybrid_train.parallel import Distributed
from hybrid_train.train.checkpoint import (LATEST, META, checkpoint_problem, code_version, model_config_differences,
                                           model_tensor_metadata, read_meta, resolve_checkpoint)
from hybrid_train.train.config import CheckpointConfig

KEEP_FILE = "KEEP"


@dataclasses.dataclass
class TrainState:
    """Counters that carry a model through a run and across stages."""
    step: int = 0
    """Optimizer steps taken in this stage."""
    stage_tokens: int = 0
    """Tokens trained in this stage."""
    total_tokens: int = 0
    """Tokens the model has seen over all stages (continues from init_from)."""
    stage: str = "run"
    """Name of the stage these counters belong to."""
    source_tokens: dict = dataclasses.field(default_factory=dict)
    """Tokens per data source in this stage, all ranks together (at the last save)."""

    @classmethod
    def from_meta(cls, meta: dict) -> "TrainState":
        """The counters a checkpoint's meta.json holds (its other keys ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in fields})


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path, env: Distributed, meta: dict):
        self.cfg = cfg
        self.env = env
        self.root = run_dir / "checkpoints"
        self.meta = meta  # run-constant metadata: model_config, job, stage name; the trainer adds its plan
        self._pending = None  # an async save in flight: (future, tmp dir, final dir, meta)
        self._group = None
        if cfg.async_save and dist.is_initialized():
            # Async saves run collectives from a background thread: give them their own CPU group.
            self._group = dist.new_group(backend="gloo")

    # ---- saving -------------------------------------------------------------------------------
    def due(self, state: TrainState, tokens_per_step: int) -> bool:
        cfg = self.cfg
        by_steps = cfg.interval_steps and state.step % cfg.interval_steps == 0
        by_tokens = cfg.interval_tokens and (state.stage_tokens // cfg.interval_tokens
                                              > (state.stage_tokens - tokens_per_step) // cfg.interval_tokens)
        return bool(by_steps or by_tokens)

    def save(self, state: TrainState, model, optimizer, scheduler, loader, final: bool = False) -> Path:
        """Collective: every rank calls it at the same step."""
        self.wait()
        final_dir = self.root / f"step_{state.step:08d}"
        tmp = self.root / f".tmp_step_{state.step:08d}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        torch.save({"data": loader.state_dict(), "rng": _rng_state(), "scheduler": scheduler.state_dict()},
                   tmp / _rank_file(self.env.rank))
        app_state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        run_complete = bool(self.meta.get("planned_steps")) and state.step >= self.meta["planned_steps"]
        meta = {**self.meta, **dataclasses.asdict(state), "tokens": state.total_tokens, "final": final,
                "run_complete": run_complete,
                "world_size": self.env.world_size, "code_version": code_version(), "saved_at": time.time()}
        if self.cfg.async_save and not final:
            future = dcp.async_save(app_state, checkpoint_id=str(tmp), process_group=self._group)
            self._pending = (future, tmp, final_dir, meta)
        else:
            dcp.save(app_state, checkpoint_id=str(tmp))
            self._finalize(tmp, final_dir, meta)
        return final_dir

    def wait(self) -> None:
        """Finish an async save in flight (before the next save, and at the end of training)."""
        if self._pending is not None:
            future, tmp, final_dir, meta = self._pending
            self._pending = None
            future.result()
            self._finalize(tmp, final_dir, meta)

    def _finalize(self, tmp: Path, final_dir: Path, meta: dict) -> None:
        _barrier()  # every rank's shards and rank file are written
        if self.env.is_main:
            (tmp / META).write_text(json.dumps(meta, indent=2))
            shutil.rmtree(final_dir, ignore_errors=True)
            os.replace(tmp, final_dir)
            latest_tmp = self.root / f".{LATEST}.tmp"
            latest_tmp.write_text(final_dir.name + "\n")
            os.replace(latest_tmp, self.root / LATEST)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        if not self.cfg.keep_last:
            return
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in done[: -self.cfg.keep_last]:
            step = int(old.name.split("_")[1])
            every = self.cfg.permanent_interval_steps
            if (old / KEEP_FILE).exists() or (every and step % every == 0):
                continue
            shutil.rmtree(old, ignore_errors=True)

    # ---- resuming -----------------------------------------------------------------------------
    def find_resume_point(self) -> Path | None:
        """The checkpoint to resume from: resume_from, else the newest complete one in this run."""
        return find_resume_point(self.cfg, self.root)

    def resume(self, ckpt: Path, model, optimizer, scheduler, loader, model_cfg: ModelConfig) -> TrainState:
        meta = read_meta(ckpt)
        diffs = model_config_differences(meta.get("model_config", {}), dataclasses.asdict(model_cfg))
        if diffs:
            raise ValueError(f"refusing to resume {ckpt} into a different model config:\n  " + "\n  ".join(diffs)
                             + "\n(use a new run.dir, or checkpoint.init_from to start a new stage from it)")
        _load_app_state(ckpt, model, optimizer)
        saved = [torch.load(ckpt / _rank_file(r), weights_only=False) for r in range(meta.get("world_size", 1))]
        scheduler.load_state_dict(saved[0]["scheduler"])
        # Every rank's data position goes to the loader, which re-deals it when the data-parallel size
        # or the number of workers changed (and is exact when nothing did).
        loader.load_rescaled_state_dict([s["data"] for s in saved])
        if len(saved) == self.env.world_size:
            _set_rng_state(saved[self.env.rank]["rng"])
        return TrainState.from_meta(meta)

    # ---- starting a stage ---------------------------------------------------------------------
    def init_from(self, spec: str, model, optimizer, model_cfg: ModelConfig, with_optimizer: bool) -> int | None:
        """Load weights (and optimizer state) from a checkpoint or hf:DIR; returns its total-token count
        (None for a Hugging Face directory, which does not record one)."""
        if spec.startswith("hf:"):
            return _init_from_hf(spec[3:], model, model_cfg)
        try:
            ckpt = resolve_checkpoint(spec)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"checkpoint.init_from={spec}: {err}") from None
        problem = checkpoint_problem(ckpt)
        if problem:
            raise ValueError(f"checkpoint.init_from={spec}: {ckpt} is incomplete ({problem})")
        meta = read_meta(ckpt)
        _check_tensors_match(spec, model_tensor_metadata(ckpt), model,
                             model_config_differences(meta.get("model_config", {}), dataclasses.asdict(model_cfg)))
        if with_optimizer and meta.get("weights_only"):
            raise ValueError(f"checkpoint.init_what=model+optimizer but {ckpt} holds weights only")
        _load_app_state(ckpt, model, optimizer if with_optimizer else None)
        return int(meta.get("tokens", 0))


def find_resume_point(cfg: CheckpointConfig, root: Path, warn: bool = True) -> Path | None:
    """The checkpoint a run resumes from: cfg.resume_from, else the newest complete one under root
    (falling back past incomplete ones, with a warning each when warn)."""
    if cfg.resume_from:
        ckpt = resolve_checkpoint(cfg.resume_from)
        problem = checkpoint_problem(ckpt)
        if problem:
            raise ValueError(f"checkpoint.resume_from={cfg.resume_from}: {ckpt} is incomplete ({problem})")
        return ckpt
    if not cfg.resume or not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if warn:
            warnings.warn(f"checkpoint {ckpt} is incomplete ({problem}); looking for an older complete one")
    return None


def _load_app_state(ckpt: Path, model, optimizer) -> None:
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def _check_tensors_match(source: str, saved: dict, model, config_diffs: list[str]) -> None:
    """Error naming the path and every tensor whose presence or shape differs."""
    expected = {name: tuple(t.shape) for name, t in get_model_state_dict(model).items()}
    saved_shapes = {name: tuple(shape) for name, (shape, _) in saved.items()}
    problems = [f"missing {n}" for n in sorted(set(expected) - set(saved_shapes))]
    problems += [f"unexpected {n}" for n in sorted(set(saved_shapes) - set(expected))]
    problems += [f"{n}: saved {saved_shapes[n]} vs model {expected[n]}" for n in sorted(set(expected) & set(saved_shapes))
                 if saved_shapes[n] != expected[n]]
    if problems:
        details = "\n  ".join(config_diffs + problems[:20] + ([f"... {len(problems) - 20} more"] if len(problems) > 20 else []))
        raise ValueError(f"checkpoint.init_from={source} is another architecture than the configured model:\n  {details}")


def _init_from_hf(hf_dir: str, model, model_cfg: ModelConfig) -> None:
    """Weights from a Hugging Face Bamba directory, read and placed one tensor at a time, so no rank ever
    holds more than one full tensor of the model beyond its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from hybrid_train.model.hf import HFCheckpoint

    hf = HFCheckpoint(hf_dir)
    diffs = model_config_differences(dataclasses.asdict(hf.model_config), dataclasses.asdict(model_cfg))
    _check_tensors_match(f"hf:{hf_dir}", {n: (hf.shape(n), hf.dtype(n)) for n in hf.names()}, model, diffs)
    one_at_a_time = StateDictOptions(full_state_dict=True, strict=False)
    for name in hf.names():
        set_model_state_dict(model, {name: hf.tensor(name)}, options=one_at_a_time)
    return None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
