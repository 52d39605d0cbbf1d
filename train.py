"""Entry point: ``python train.py strategy=gradual_unfreeze`` (see README)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tl_lightning.run.config_checks import check_config
from tl_lightning.run.hydra_callbacks import remove_unused_run_dir
from tl_lightning.run.pipeline import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        check_config(cfg)  # train() checks again; here a bad config leaves no empty timestamped directory
    except Exception:
        hydra_cfg = HydraConfig.get()
        chosen = any(o.startswith(("hydra.run.dir=", "hydra/run")) for o in hydra_cfg.overrides.hydra)
        if hydra_cfg.mode == RunMode.RUN and not chosen:  # the fresh directory Hydra made for this run only
            remove_unused_run_dir(hydra_cfg.runtime.output_dir, hydra_cfg.job.name)
        raise
    return train(cfg)


if __name__ == "__main__":
    main()
