"""Every train.py checkpoint loads the Lightning way (``<Module>.load_from_checkpoint(path)``) and the
project's way (``tl_lightning.load``), rebuilt from its own record, without constructor arguments."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, FAST
from hydra import compose, initialize_config_dir

import tl_lightning
from tl_lightning.modules import DomainAdaptationModule, MultiTaskModule, TransferModule
from tl_lightning.run.inference import export_checkpoint, predict_to_file
from tl_lightning.run.pipeline import train

SMALL = ["backbone=small_cnn", "backbone.channels=[8,16]", "strategy=full_finetune"]
RUNS = {
    "transfer": (TransferModule, []),
    "multitask": (
        MultiTaskModule,
        [
            "data=mnist5k_fashion",
            "strategy=multitask",
            "~data.tasks.fashion",
            "data.tasks.digit._target_=tl_lightning.data.DigitsDataModule",
            "+data.tasks.scan._target_=tl_lightning.data.DigitsDataModule",
            "+data.tasks.scan._partial_=true",
            "+data.tasks.scan.classes=[0,1,2]",
        ],
    ),
    "dann": (
        DomainAdaptationModule,
        [
            "data=mnist5k_to_digits",
            "strategy=dann",
            "data.source._target_=tl_lightning.data.DigitsDataModule",
        ],
    ),
}


def _train(run_dir: Path, *overrides: str) -> Path:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, *SMALL, f"paths.output_dir={run_dir}", *overrides])
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {kind: _train(root / kind, *overrides) for kind, (_, overrides) in RUNS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RUNS))
def test_load_from_checkpoint_rebuilds_every_module_kind(kind, checkpoints):
    """The classmethod needs no backbone/head/optimizer: the module it returns is the checkpoint's class,
    holds exactly the stored weights (the source head aside) and is in eval mode."""
    module_class, _ = RUNS[kind]
    path = checkpoints[kind]
    stored = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for loader in {module_class, TransferModule}:  # the base class loads a subclass's checkpoint too
        module = loader.load_from_checkpoint(path)
        assert type(module) is module_class and not module.training
        state = module.state_dict()
        assert set(state) == {k for k in stored if not k.startswith("heads.source.")}
        for key, value in state.items():
            assert torch.equal(value, stored[key]), key
    if kind == "multitask":
        assert dict(module.hparams.num_classes) == {"digit": 10, "scan": 3}
        assert module(torch.rand(2, 3, 32, 32), "scan").shape == (2, 3)
    if module_class is not TransferModule:
        return
    with pytest.raises(TypeError, match="holds a TransferModule, not a MultiTaskModule"):
        MultiTaskModule.load_from_checkpoint(path)
    with pytest.raises(TypeError, match=r"load it without \['head'\]"):
        TransferModule.load_from_checkpoint(path, head=torch.nn.Identity())
    images = torch.rand(4, 3, 32, 32)
    model = tl_lightning.load(path)  # the project's way: same weights, same logits
    torch.testing.assert_close(model.module(images), module(images), rtol=0, atol=0)
    assert model.modality == "image" and model.image_size == 32
    with pytest.raises(ValueError, match=r"is an image model: it takes images .*not texts=\[\.\.\.\]"):
        predict_to_file(path, None, path.parent / "p.csv", device="cpu", texts=["a text"])


def test_checkpoint_without_a_record_loads_the_lightning_way(tmp_path):
    """A module saved outside train.py has no tl_lightning record: Lightning's own path, arguments given."""
    from functools import partial

    import lightning.pytorch as pl

    from tl_lightning.backbones.small_cnn import small_cnn
    from tl_lightning.modules import LinearHead

    backbone = small_cnn(channels=[8, 16])
    module = TransferModule(
        backbone, LinearHead(backbone.num_features, 3), 3, partial(torch.optim.SGD, lr=0.1)
    )
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(TypeError, match="backbone"):
        TransferModule.load_from_checkpoint(tmp_path / "plain.ckpt")
    fresh = small_cnn(channels=[8, 16])
    loaded = TransferModule.load_from_checkpoint(
        tmp_path / "plain.ckpt", backbone=fresh, head=LinearHead(fresh.num_features, 3), optimizer=None
    )
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.slow
def test_exported_and_predicted_files_are_readable_by_the_group(checkpoints, tmp_path):
    """safetensors writes a private temporary file and renames it: export gives it the umask's mode."""
    old = os.umask(0o022)
    try:
        exported = export_checkpoint(checkpoints["transfer"], "safetensors", tmp_path / "model.safetensors")
        scans = tmp_path / "scan.png"
        from PIL import Image

        Image.new("L", (8, 8), 128).save(scans)
        predicted = predict_to_file(exported, [scans], tmp_path / "p.csv", top_k=1, device="cpu")
    finally:
        os.umask(old)
    for path in (exported, predicted):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_import_stays_light():
    """``import tl_lightning`` imports none of its rooms; ``tl_lightning.load`` imports them on first use."""
    code = "import sys, tl_lightning; print(sorted(m for m in sys.modules if m.startswith('tl_lightning.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(tl_lightning.load)


@pytest.mark.slow
def test_adapter_checkpoint_loads_with_its_pretrained_base(tmp_path):
    """A strategy=lora checkpoint holds the adapters and the head only: load_from_checkpoint rebuilds the
    base from the packaged weights and gives the logits of the project's (merged) model."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *FAST,
                "strategy=lora",
                "adapter.r=4",
                "data.batch_size=8",
                f"paths.output_dir={tmp_path}",
            ],
        )
    train(cfg)
    path = tmp_path / "checkpoints" / "last.ckpt"
    stored = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert all(".lora_" in k or k.startswith("heads.target.") for k in stored)
    module = TransferModule.load_from_checkpoint(path)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in stored.items())
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(images), tl_lightning.load(path).module(images), rtol=0, atol=1e-5)
