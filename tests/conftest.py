"""Shared fixtures: compose the real Hydra config and shrink it for a fast CPU run."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "+trainer.enable_progress_bar=false",
    "callbacks.rich_progress_bar=null",
    "data.image_size=32",
    "data.batch_size=16",
    "allow_short_schedule=true",  # one epoch is too short for most strategies' milestones, on purpose
]


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides, run="name")``: the real config, shrunk, written to ``tmp_path/run``."""

    def _make(*overrides: str, fast: bool = True, run: str = "run") -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(
                "train",
                overrides=[*(FAST if fast else []), f"paths.output_dir={tmp_path / run}", *overrides],
            )

    return _make
