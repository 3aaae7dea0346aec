"""The job configuration: one typed dataclass per section, registered with Hydra, validated once.

`conf/*.yaml` only picks values; every knob is declared (with its default and meaning) in the
section dataclasses, so a misspelt key (named with the closest real one) or a wrong type fails when
the config is composed. `load_config(overrides)` composes it in Python exactly as train.py does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from hybrid_train.data.config import DataConfig
from hybrid_train.model.config import ModelConfig
from hybrid_train.overrides import (UnknownKeyError, check_keys, command_line_wins, config_groups, whole_numbers,
                                    unknown_key_message)
from hybrid_train.parallel.config import ClusterConfig, ParallelConfig, PlanConfig
from hybrid_train.train.config import (CheckpointConfig, LoggingConfig, OptimConfig, ScheduleConfig, StageConfig,
                                       TrainConfig, default_lr)


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
    cluster: Optional[ClusterConfig] = None
    """The cluster scripts/plan.py plans for (`cluster=a100_192`); training does not read it."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """Inputs of scripts/plan.py; training does not read them."""

    def validate(self, require_init_from: bool = True) -> "JobConfig":
        """Cross-field checks before any work starts; each error names the fields and values.

        require_init_from=False: a plan of a stage needs no checkpoint to start from."""
        self.model.validate()
        self.data.validate()
        if self.optim.lr is None:  # recorded resolved, in config.yaml and checkpoints
            self.optim.lr = default_lr(self.model.d_model)
        for section in (self.optim, self.schedule, self.logging, self.train, self.checkpoint, self.stage):
            section.validate()
        self.plan.validate()
        if self.cluster is not None:
            self.cluster.validate()
        if require_init_from and self.stage.needs_init_from and not self.checkpoint.init_from:
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
            "parallel": ParallelConfig, "logging": LoggingConfig, "stage": StageConfig,
            "cluster": ClusterConfig}


def register_configs() -> None:
    """Register the schemas with Hydra: the whole job, and each group's section on its own; and the
    resolver `--help` lists the config groups with (conf/config.yaml's hydra.help.template)."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    for group, node in SECTIONS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)
    if not OmegaConf.has_resolver("config_group_options"):
        OmegaConf.register_new_resolver("config_group_options", config_group_options)


def config_group_options(config_dir: str | None = None) -> str:
    """'group: option, option, ...' a line per config group of conf/ (the YAML files a user picks from;
    the schemas registered above are Hydra's business, not choices)."""
    try:
        root = find_config_dir(config_dir)
    except FileNotFoundError as err:
        return f"({err})"
    lines = [f"{group}: {', '.join(sorted(f.stem for f in (root / group).glob('*.yaml')))}"
             for group in sorted(config_groups(root))]
    return "\n".join(lines) if lines else f"(no config groups under {root})"


register_configs()  # on import: `hydra.compose` on conf/ works once hybrid_train is imported


def _reject_unknown_keys(node: DictConfig, path: str) -> None:
    """Hydra's `+key=value` adds keys even to typed nodes; refuse any key a dataclass doesn't declare."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = {f.name for f in dataclasses.fields(schema)}
        unknown = sorted(set(node.keys()) - known)
        if unknown:
            raise UnknownKeyError("\n".join(unknown_key_message(f"{path}.{k}".lstrip("."), JobConfig)
                                             for k in unknown))
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _reject_unknown_keys(child, f"{path}.{key}".lstrip("."))


def job_config_from_hydra(cfg: DictConfig, overrides: Sequence[str] = (), require_init_from: bool = True) -> JobConfig:
    """Convert Hydra's composed config to the dataclasses (interpolations resolved) and validate.

    `overrides` are the command line's: a run length (or warmup) it gives replaces the one the config
    files set (hybrid_train.overrides.EXCLUSIVE); two given together are still refused.
    require_init_from=False: a plan of a stage needs no checkpoint to start from."""
    _reject_unknown_keys(cfg, "")
    command_line_wins(cfg, list(overrides))
    job = OmegaConf.to_object(cfg)
    if not isinstance(job, JobConfig):
        raise TypeError("the composed config is not a JobConfig; conf/config.yaml must list job_schema first")
    return job.validate(require_init_from)


def find_config_dir(config_dir: str | Path | None = None) -> Path:
    """The folder holding config.yaml: `config_dir`, else the checkout's conf/ (next to train.py), else
    ./conf."""
    if config_dir is not None:
        path = Path(config_dir).expanduser().resolve()
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"config_dir={str(config_dir)!r}: no config.yaml in {path}")
        return path
    candidates = [Path(__file__).resolve().parents[1] / "conf", Path.cwd() / "conf"]
    for path in candidates:
        if (path / "config.yaml").is_file():
            return path
    raise FileNotFoundError(f"no conf/config.yaml in {' or '.join(str(p.parent) for p in candidates)}: conf/ ships "
                            "next to train.py in a hybrid_train checkout; pass config_dir=PATH/TO/conf")


def load_config(overrides: Sequence[str] = (), config_dir: str | Path | None = None,
                require_init_from: bool = True) -> JobConfig:
    """The validated job `python train.py OVERRIDES...` runs: conf/config.yaml composed with the same
    Hydra overrides (`["model=bamba_9b", "train.max_steps=10"]`) and converted to the dataclasses.
    require_init_from=False: a stage that starts from a checkpoint may leave checkpoint.init_from unset."""
    overrides = list(overrides)
    conf = find_config_dir(config_dir)
    register_configs()
    check_keys(overrides, JobConfig, config_groups(conf))
    overrides = whole_numbers(overrides, JobConfig)
    outer = GlobalHydra.instance().hydra  # an enclosing Hydra app's state, put back after
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    finally:  # (the context leaves a copy of the singleton behind: set it on the current one)
        GlobalHydra.instance().hydra = outer
    return job_config_from_hydra(cfg, overrides, require_init_from)


def to_yaml(job: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(job))
