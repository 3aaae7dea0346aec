"""The job configuration: one typed dataclass per section, registered with Hydra, validated once.

`conf/*.yaml` only picks values; every knob is declared (with its default and meaning) in the
section dataclasses, so a misspelt key or a wrong type fails when Hydra composes the config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from hybrid_train.data.config import DataConfig
from hybrid_train.model.config import ModelConfig
from hybrid_train.parallel.config import ParallelConfig
from hybrid_train.train.config import (CheckpointConfig, LoggingConfig, OptimConfig, ScheduleConfig, StageConfig,
                                       TrainConfig)


@dataclass
class RunConfig:
    name: str = "tiny-sample"
    """Run name (wandb name, default run directory)."""
    dir: str = "outputs/${run.name}"
    """One directory shared by every rank: config.yaml, metrics.jsonl, checkpoints/."""


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stage: StageConfig = field(default_factory=StageConfig)

    def validate(self) -> "JobConfig":
        """Cross-field checks before any work starts; each error names the fields and values."""
        self.model.validate()
        self.data.validate()
        for section in (self.optim, self.schedule, self.logging, self.train, self.checkpoint, self.stage):
            section.validate()
        if self.stage.needs_init_from and not self.checkpoint.init_from:
            raise ValueError(f"stage {self.stage.name!r} continues an earlier stage: set checkpoint.init_from "
                             "(a checkpoint or run directory of that stage, or hf:DIR for a Hugging Face model)")
        stage_length = (f"stage.tokens={self.stage.tokens}" if self.stage.relative else
                        f"stage.end_tokens={self.stage.end_tokens}" if self.stage.end_tokens else None)
        if not (stage_length or self.train.max_tokens or self.train.max_steps):
            raise ValueError("no run length: set train.max_tokens, train.max_steps, stage.tokens or stage.end_tokens")
        if stage_length and (self.train.max_tokens or self.train.max_steps):
            raise ValueError(f"{stage_length} sets the run length; leave train.max_tokens "
                             f"({self.train.max_tokens}) and train.max_steps ({self.train.max_steps}) at 0")
        if self.train.loss_impl == "fused" and self.parallel.tp > 1:
            raise ValueError(f"train.loss_impl='fused' needs the whole LM head but parallel.tp={self.parallel.tp} "
                             "shards it over the vocabulary; use train.loss_impl=logits (or auto)")
        return self

    def fused_loss(self) -> bool:
        """train.loss_impl resolved: auto is fused unless tensor parallel."""
        return self.train.loss_impl == "fused" or (self.train.loss_impl == "auto" and self.parallel.tp == 1)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
            "parallel": ParallelConfig, "logging": LoggingConfig, "stage": StageConfig}


def register_configs() -> None:
    """Register the schemas with Hydra: the whole job, and each group's section on its own."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    for group, node in SECTIONS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)


def _reject_unknown_keys(node: DictConfig, path: str) -> None:
    """Hydra's `+key=value` adds keys even to typed nodes; refuse any key a dataclass doesn't declare."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = {f.name for f in dataclasses.fields(schema)}
        unknown = sorted(set(node.keys()) - known)
        if unknown:
            where = path or "the top level"
            raise ValueError(f"unknown config key(s) {', '.join(f'{path}.{k}'.lstrip('.') for k in unknown)} "
                             f"({schema.__name__} at {where} has no such field)")
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _reject_unknown_keys(child, f"{path}.{key}".lstrip("."))


def job_config_from_hydra(cfg: DictConfig) -> JobConfig:
    """Convert Hydra's composed config to the dataclasses (interpolations resolved) and validate."""
    _reject_unknown_keys(cfg, "")
    job = OmegaConf.to_object(cfg)
    if not isinstance(job, JobConfig):
        raise TypeError("the composed config is not a JobConfig; conf/config.yaml must list job_schema first")
    return job.validate()


def to_yaml(job: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(job))
