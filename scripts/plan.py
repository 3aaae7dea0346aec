"""Plan a run on a cluster: memory per GPU, step time, tokens per day, days for the run.

    python scripts/plan.py model=bamba_9b cluster=a100_192 train.seq_len=4096 train.micro_batch_size=2
    python scripts/plan.py +stage=extend cluster=h100_64 parallel=hsdp plan.out=plan.json
    python scripts/plan.py model=bamba_9b cluster=h200_8 plan.memory_table=true

The same config tree and overrides as train.py, plus `cluster=` (conf/cluster/) and `plan.*`
(PlanConfig). Exits non-zero, naming the cause, for a layout that does not fit in memory or is invalid.
"""

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hybrid_train.config import job_config_from_hydra, register_configs  # noqa: E402
from hybrid_train.overrides import check_command_line  # noqa: E402
from hybrid_train.parallel.plan import (PlanError, format_memory_table, format_plan, make_plan,  # noqa: E402
                                        memory_table)

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    job = job_config_from_hydra(cfg, HydraConfig.get().overrides.task, require_init_from=False)
    try:
        if job.plan.memory_table:
            rows = memory_table(job, list(job.plan.table_world_sizes))
            text, result = format_memory_table(rows, job), rows
        else:
            plan = make_plan(job)
            text, result = format_plan(plan), plan.to_dict()
    except PlanError as e:
        sys.exit(f"refused: {e}")
    print(text)
    if job.plan.out:
        Path(job.plan.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.argv[1:] = check_command_line(sys.argv[1:], Path(__file__).resolve().parents[1] / "conf")  # as train.py
    main()
