"""Augmentation drawn per (seed, epoch, sample): exact resume with augmentation on, whatever the workers."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from resume_helpers import last_weights

from tl_lightning.backbones import DataConfig
from tl_lightning.data import ImageFolderDataModule
from tl_lightning.data.base import EpochSeededDataset
from tl_lightning.run.pipeline import train

CFG = DataConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(3, 16, 16))


@pytest.fixture
def folder(tmp_path):
    """Two classes of 12 random 24x24 RGB images (random content makes every crop and flip visible)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _data(folder, num_workers=0):
    data = ImageFolderDataModule(
        str(folder), CFG, batch_size=4, augment=True, num_workers=num_workers, shuffle_seed=7
    )
    data.setup("fit")
    return data


def _epoch(data, epoch):
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return torch.cat([x for x, _ in loader])


def test_sample_depends_on_seed_epoch_and_index_only(folder):
    seeded = EpochSeededDataset(_data(folder).train_set, seed=7)
    torch.manual_seed(1)
    first = seeded[(2, 5)][0]
    torch.manual_seed(2)
    torch.rand(1000)  # whatever was drawn before must not matter
    state = torch.get_rng_state()
    assert torch.equal(seeded[(2, 5)][0], first)
    assert torch.equal(torch.get_rng_state(), state), "augmentation must not consume the training RNG"
    assert not torch.equal(seeded[(3, 5)][0], first), "another epoch draws another augmentation"
    assert not torch.equal(EpochSeededDataset(seeded.dataset, seed=8)[(2, 5)][0], first)


def test_batches_do_not_depend_on_workers_or_on_earlier_epochs(folder):
    in_process = _data(folder)
    epoch_1 = _epoch(in_process, 1)
    assert not torch.equal(epoch_1, _epoch(in_process, 0))
    with_workers = _data(folder, num_workers=2)
    assert torch.equal(_epoch(with_workers, 1), epoch_1), "workers drew other augmentations"


def test_resume_with_augmentation_reproduces_uninterrupted_run(make_cfg, folder):
    run = [
        "backbone=small_cnn",
        "backbone.channels=[8,16]",
        "strategy=full_finetune",
        "data=image_folder",
        f"data.root={folder}",
        "data.augment=true",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.image_size=16",
        "trainer.max_epochs=3",
        "++trainer.limit_train_batches=3",
        "++trainer.limit_val_batches=1",
        "++trainer.limit_test_batches=1",
    ]
    straight = make_cfg(*run, run="straight")
    train(straight)
    cut = make_cfg(
        *run,
        "+callbacks.stop._target_=resume_helpers.StopAfterEpoch",
        "+callbacks.stop.epoch=0",
        run="cut",
    )
    train(cut)
    checkpoint = Path(cut.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = make_cfg(*run, f"ckpt_path={checkpoint}", run="resumed")
    train(resumed)
    expected, actual = last_weights(straight), last_weights(resumed)
    assert expected.keys() == actual.keys()
    gaps = {k: (expected[k].float() - actual[k].float()).abs().max().item() for k in expected}
    assert max(gaps.values()) == 0.0, {k: v for k, v in gaps.items() if v > 0}
    assert any(
        not torch.equal(expected[k], last_weights(cut)[k]) for k in expected if k.startswith("backbone.")
    )
