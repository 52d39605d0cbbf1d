"""Entry point: ``python train.py strategy=gradual_unfreeze`` (see README)."""

import hydra
from omegaconf import DictConfig

from tl_lightning.run.pipeline import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
