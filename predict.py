"""Classify images with a trained model: ``python predict.py ckpt_path=... inputs=...`` (see README)."""

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from tl_lightning.run.inference import predict_to_file

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    inputs = OmegaConf.to_container(cfg.inputs) if OmegaConf.is_list(cfg.inputs) else cfg.inputs
    output = predict_to_file(cfg.ckpt_path, inputs, cfg.output, cfg.top_k, cfg.batch_size, cfg.device)
    log.info("predictions written to %s", output)


if __name__ == "__main__":
    main()
