import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from tl_lightning.backbones import DataConfig
from tl_lightning.data import DigitsDataModule, ImageFolderDataModule

CFG = DataConfig(mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7), input_size=(3, 224, 224), interpolation="bicubic")


def test_digits_split_is_stratified_disjoint_and_normalised_with_backbone_stats():
    data = DigitsDataModule(CFG, image_size=16)
    data.setup("fit")
    sizes = [len(data.train_set), len(data.val_set), len(data.test_set)]
    assert sum(sizes) == 1797
    assert sizes[1] == pytest.approx(360, abs=2) and sizes[2] == pytest.approx(360, abs=2)
    x, _ = data.train_set[0]
    assert x.shape == (3, 16, 16)
    background = x[:, 0, 0]  # the scans' border pixels are 0 before normalisation
    expected = (0 - torch.tensor(CFG.mean)) / torch.tensor(CFG.std)
    assert torch.allclose(background, expected, atol=1e-5)
    train_x = torch.stack([x for x, _ in data.train_set]).flatten(1)
    test_x = torch.stack([x for x, _ in data.test_set]).flatten(1)
    assert not (torch.cdist(test_x[:50], train_x) == 0).any(), "a test image leaked into train"


def test_train_per_class_and_class_subsets():
    data = DigitsDataModule(CFG, image_size=8, train_per_class=5, classes=[5, 6, 7, 8, 9])
    data.setup("fit")
    labels = torch.stack([y for _, y in data.train_set])
    assert data.num_classes == 5 and torch.bincount(labels).tolist() == [5] * 5
    with pytest.raises(ValueError, match="train_per_class=500"):
        DigitsDataModule(CFG, image_size=8, train_per_class=500).setup("fit")
    with pytest.raises(ValueError, match="data.classes"):
        DigitsDataModule(CFG, classes=[3, 11])


def _write_folder(root, per_class=6):
    digits = load_digits()
    for cls in (0, 1):
        (root / str(cls)).mkdir(parents=True)
        images = digits.images[digits.target == cls][:per_class]
        for i, img in enumerate(images):
            Image.fromarray((img * 16).astype(np.uint8)).save(root / str(cls) / f"{i}.png")


def test_image_folder_reads_real_images_and_names_corrupt_files(tmp_path):
    _write_folder(tmp_path)
    data = ImageFolderDataModule(
        str(tmp_path), CFG, image_size=32, val_fraction=0.34, test_fraction=0.33, num_workers=0
    )
    data.setup("fit")
    x, y = data.train_set[0]
    assert x.shape == (3, 32, 32) and data.num_classes == 2
    (tmp_path / "1" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolderDataModule(str(tmp_path), CFG, num_workers=0, val_fraction=0.34, test_fraction=0.33).setup(
            "fit"
        )
    skipping = ImageFolderDataModule(
        str(tmp_path), CFG, num_workers=0, skip_corrupt=True, val_fraction=0.34, test_fraction=0.33
    )
    skipping.setup("fit")
    assert len(skipping.train_set) + len(skipping.val_set) + len(skipping.test_set) == 12


def test_image_folder_errors_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        ImageFolderDataModule(str(tmp_path / "missing"), CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        ImageFolderDataModule(str(tmp_path / "empty"), CFG, num_workers=0).setup("fit")
