"""Image folders that used to train silently on wrong data: bit depth, links, truncation, bombs, splits."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from tl_lightning.backbones import DataConfig
from tl_lightning.data import ImageFolderDataModule

# Identity normalisation and no resampling: a 16x16 image comes out as its pixels / 255.
IDENTITY = DataConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=(3, 16, 16))
SPLIT = {"val_fraction": 0.25, "test_fraction": 0.25, "num_workers": 0, "augment": False}


def _write_digits(folder, classes=("cat", "dog"), per_class=8, suffix=".png"):
    digits = load_digits()
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(digits.images[digits.target == label][:per_class]):
            Image.fromarray((image * 15).astype(np.uint8)).resize((16, 16)).save(
                folder / name / f"{i}{suffix}"
            )


def _all_samples(data):
    return [s for split in (data.train_set, data.val_set, data.test_set) for s in split.samples]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_images_are_scaled_to_8_bits_not_clipped(tmp_path, suffix):
    """A 16-bit gradient keeps its gradient (``I;16`` -> RGB used to clip every pixel to 255)."""
    gradient = (np.arange(256, dtype=np.float64).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    for name in ("dark", "light"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray(gradient).save(tmp_path / name / f"{i}{suffix}")
    assert Image.open(tmp_path / "dark" / f"0{suffix}").mode.startswith("I;16")
    data = ImageFolderDataModule(str(tmp_path), IDENTITY, **SPLIT)
    data.setup("fit")
    x, _ = data.test_set[0]
    expected = torch.tensor(np.rint(gradient / 65535 * 255) / 255, dtype=torch.float32)
    assert torch.allclose(x, expected.expand(3, -1, -1), atol=1e-6)


def test_float_images_outside_unit_range_are_named(tmp_path):
    _write_digits(tmp_path)
    Image.fromarray(np.full((16, 16), 300.0, dtype=np.float32)).save(tmp_path / "cat" / "hdr.tif")
    with pytest.raises(ValueError, match=r"hdr\.tif.*\[0, 1\]"):
        ImageFolderDataModule(str(tmp_path), IDENTITY, **SPLIT).setup("fit")


def test_symlink_loop_neither_relabels_nor_duplicates_nor_leaks(tmp_path, caplog):
    """``cat/loop -> ..`` once turned 16 files into hundreds of samples, dogs labelled cat."""
    _write_digits(tmp_path)
    os.symlink("..", tmp_path / "cat" / "loop")
    with caplog.at_level(logging.WARNING):
        data = ImageFolderDataModule(str(tmp_path), IDENTITY, **SPLIT)
        data.setup("fit")
    assert len(data.train_set) + len(data.val_set) + len(data.test_set) == 16
    samples = _all_samples(data)
    assert len({os.path.realpath(p) for p, _ in samples}) == 16, "a file leaked into two splits"
    for path, label in samples:
        assert data.class_names[label] == os.path.basename(os.path.dirname(path))
    assert "loop" in caplog.text


def test_a_file_linked_into_two_classes_is_an_error(tmp_path):
    _write_digits(tmp_path)
    os.symlink(tmp_path / "dog" / "0.png", tmp_path / "cat" / "also_a_dog.png")
    with pytest.raises(ValueError, match=r"also_a_dog\.png.*'dog'"):
        ImageFolderDataModule(str(tmp_path), IDENTITY, **SPLIT).setup("fit")


def test_same_file_in_two_splits_is_an_error_and_copies_are_counted(tmp_path, caplog):
    for split in ("train", "val", "test"):
        _write_digits(tmp_path / split, per_class=3)
    os.symlink(tmp_path / "train" / "cat" / "0.png", tmp_path / "test" / "cat" / "linked.png")
    with pytest.raises(ValueError, match=r"linked\.png.*train.*test"):
        ImageFolderDataModule(str(tmp_path), IDENTITY, **SPLIT).setup("fit")
    os.remove(tmp_path / "test" / "cat" / "linked.png")  # the val/test images are the train ones: copies
    with caplog.at_level(logging.WARNING):
        ImageFolderDataModule(str(tmp_path), IDENTITY, **SPLIT).setup("fit")
    assert "12 images are byte-identical copies" in caplog.text


def test_truncated_jpeg_is_named_before_training_and_skippable(tmp_path):
    """``Image.verify()`` passes a truncated JPEG; decoding it fully does not."""
    _write_digits(tmp_path, per_class=8, suffix=".jpg")
    photo = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "dog" / "cut.jpg", quality=95)
    data = (tmp_path / "dog" / "cut.jpg").read_bytes()
    (tmp_path / "dog" / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "dog" / "cut.jpg") as image:
        image.verify()  # the old check's view: nothing wrong
    with pytest.raises(ValueError, match=r"cut\.jpg.*truncated"):
        ImageFolderDataModule(str(tmp_path), IDENTITY, **SPLIT).setup("fit")
    skipping = ImageFolderDataModule(str(tmp_path), IDENTITY, skip_corrupt=True, **SPLIT)
    skipping.setup("fit")
    assert len(_all_samples(skipping)) == 16


@pytest.mark.parametrize("pixels_over_limit", [1.5, 3.0], ids=["bomb_warning", "bomb_error"])
def test_decompression_bomb_is_named_and_skippable(tmp_path, monkeypatch, pixels_over_limit):
    _write_digits(tmp_path)
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(tmp_path / "cat" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(40 * 40 / pixels_over_limit))
    with pytest.raises(ValueError, match=r"bomb\.png.*decompression bomb"):
        ImageFolderDataModule(str(tmp_path), IDENTITY, **SPLIT).setup("fit")
    skipping = ImageFolderDataModule(str(tmp_path), IDENTITY, skip_corrupt=True, **SPLIT)
    skipping.setup("fit")
    assert len(_all_samples(skipping)) == 16


def test_one_class_folder_says_so(tmp_path):
    _write_digits(tmp_path, classes=("cat",))
    with pytest.raises(ValueError, match=r"at least 2 class folders.*only 'cat'"):
        ImageFolderDataModule(str(tmp_path), IDENTITY, **SPLIT).setup("fit")


def test_class_missing_from_a_split_names_class_and_split(tmp_path):
    _write_digits(tmp_path / "train", classes=("cat", "dog", "emu"), per_class=2)
    _write_digits(tmp_path / "val", classes=("cat", "dog", "emu"), per_class=2)
    _write_digits(tmp_path / "test", classes=("cat", "dog"), per_class=2)
    with pytest.raises(ValueError, match=r"\['emu'\] are missing from the test split"):
        ImageFolderDataModule(str(tmp_path), IDENTITY, **SPLIT).setup("fit")
    (tmp_path / "test" / "emu").mkdir()  # the folder exists but holds no image
    with pytest.raises(ValueError, match=r"test split has no example of class 'emu'"):
        ImageFolderDataModule(str(tmp_path), IDENTITY, **SPLIT).setup("fit")
