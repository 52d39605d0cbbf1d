"""Classify images or texts with a trained model: ``python predict.py ckpt_path=... inputs=...`` (README)."""

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from tl_lightning.run.inference import predict_to_file

log = logging.getLogger(__name__)


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_list(value) else value


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    output = predict_to_file(
        cfg.ckpt_path,
        _plain(cfg.inputs),
        cfg.output,
        cfg.top_k,
        cfg.batch_size,
        cfg.device,
        texts=_plain(cfg.texts),
        text_column=cfg.text_column,
        generation=OmegaConf.to_container(cfg.generation),
    )
    log.info("predictions written to %s", output)


if __name__ == "__main__":
    main()
