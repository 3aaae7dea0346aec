"""Entry point: `python train.py [overrides]`, or `torchrun --nproc_per_node=N train.py ...`."""

import hydra
from omegaconf import DictConfig

from hybrid_train.config import job_config_from_hydra, register_configs
from hybrid_train.train.trainer import train

register_configs()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    train(job_config_from_hydra(cfg))


if __name__ == "__main__":
    main()
