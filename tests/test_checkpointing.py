"""Checkpoints describe their run (``checkpoint["tl_lightning"]``) and are written atomically."""

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tl_lightning.run.checkpointing import AtomicCheckpointIO, load_checkpoint, remove_partial_checkpoints
from tl_lightning.run.pipeline import train


def test_every_checkpoint_describes_its_run(make_cfg):
    cfg = make_cfg("strategy=linear_probe", "feature_cache=off")
    train(cfg)
    expected_config = OmegaConf.to_container(cfg, resolve=True)
    expected_config["monitor_mode"] = expected_config["callbacks"]["model_checkpoint"]["mode"] = "max"
    assert expected_config.pop("logger")  # the tracker settings stay out: a tracking URI may carry a token
    checkpoints = sorted((Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in checkpoints} == {"epoch00.ckpt", "last.ckpt"}
    for path in checkpoints:
        meta = torch.load(path, map_location="cpu", weights_only=True)["tl_lightning"]
        assert meta["strategy"] == "linear_probe"
        assert meta["class_names"] == [str(d) for d in range(10)]
        expected = {
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "input_size": [3, 224, 224],
            "interpolation": "bicubic",
        }
        assert {k: meta["data_config"][k] for k in expected} == expected
        assert meta["config"] == expected_config
        json.dumps(meta)  # plain data only


def test_atomic_save_keeps_previous_checkpoint_when_the_write_fails(tmp_path):
    io = AtomicCheckpointIO()
    destination = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, destination)

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="no space left on the file system mounted at .* while writing"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, destination)
    assert torch.load(destination, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no partial file left behind"


def test_partial_files_are_removed_and_truncated_checkpoint_names_its_path(tmp_path):
    destination = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, destination)
    partial = tmp_path / f".last.ckpt.{os.getpid()}.tmp-partial"
    partial.write_bytes(destination.read_bytes()[:50])
    assert remove_partial_checkpoints(tmp_path) == [partial]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(destination.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.ckpt.*truncated or corrupt"):
        load_checkpoint(truncated)
