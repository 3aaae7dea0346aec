"""Entry point: `python train.py [overrides]`, or `torchrun --nproc_per_node=N train.py ...`."""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hybrid_train.config import job_config_from_hydra, register_configs
from hybrid_train.overrides import check_command_line
from hybrid_train.data import DataExhausted
from hybrid_train.train.trainer import NonFiniteLossError, train

register_configs()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        job = job_config_from_hydra(cfg, HydraConfig.get().overrides.task)
    except ValueError as err:  # a config error names its fields and values: no traceback needed
        sys.exit(f"error: {err}")
    try:
        train(job)
    except (ValueError, FileNotFoundError, DataExhausted, NonFiniteLossError) as err:
        # Bad input found at run time (a data path, a checkpoint, a record) names its file, field or value
        # (data exhaustion saves the last whole step first). The traceback stays one variable away.
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {err}\n(HYDRA_FULL_ERROR=1 shows the traceback)")


if __name__ == "__main__":
    sys.argv[1:] = check_command_line(sys.argv[1:], Path(__file__).parent / "conf")  # a misspelt key: the closest real one
    main()
