"""Entry point: ``python train.py strategy=gradual_unfreeze`` (see README)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tl_lightning.run.hydra_callbacks import remove_unused_run_dir
from tl_lightning.run.pipeline import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except Exception:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.RUN:  # a sweep keeps each job's directory (its overrides.yaml)
            remove_unused_run_dir(hydra_cfg.runtime.output_dir, hydra_cfg.job.name)
        raise


if __name__ == "__main__":
    main()
