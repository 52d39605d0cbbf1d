"""Export a trained model for serving: ``python export.py ckpt_path=... format=safetensors|onnx``."""

import logging

import hydra
from omegaconf import DictConfig

from tl_lightning.run.inference import export_checkpoint

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    log.info("%s model written to %s", cfg.format, export_checkpoint(cfg.ckpt_path, cfg.format, cfg.output))


if __name__ == "__main__":
    main()
