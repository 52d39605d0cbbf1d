"""One decoding of an image file for training, evaluation and predict.py, whatever the file's mode.

The same picture is written as a palette GIF and PNG, RGBA, LA, CMYK (TIFF), L, 16-bit (``I;16``) and
RGB file. For an ``image_folder`` run, predict's input tensor for every file must be the tensor the
run's own test dataset builds from that file, and predict's probabilities those of the run's model on
it. For a grayscale data module (digits), whose training data are grey levels, every mode of a grey
picture must give the tensor the module's dataset gives those grey levels, and a colour picture its
luma's tensor, in whatever mode it is stored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, FAST
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from tl_lightning.data.grayscale import GrayscaleImages
from tl_lightning.run.inference import load_trained, predict, prepare_images
from tl_lightning.run.pipeline import train

SIDE = 20
# a shuffled palette: a palette image's indices are not its grey levels or colours
GREYS = np.array([0, 37, 90, 128, 201, 255], dtype=np.uint8)
COLOURS = np.array(
    [[200, 30, 30], [20, 160, 60], [30, 40, 220], [250, 250, 20], [10, 10, 10], [240, 240, 240]],
    dtype=np.uint8,
)
ORDER = np.array([4, 0, 5, 2, 1, 3])


def _indices(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(ORDER), size=(SIDE, SIDE))


def _write_modes(folder: Path, rgb: np.ndarray, indices: np.ndarray, palette: np.ndarray) -> dict[str, Path]:
    """The picture ``rgb`` (its pixels are ``palette[indices]``) in every mode a user's files come in."""
    folder.mkdir(parents=True, exist_ok=True)
    alpha = np.random.default_rng(1).integers(0, 256, size=(SIDE, SIDE), dtype=np.uint8)
    paletted = Image.fromarray(np.argsort(ORDER)[indices].astype(np.uint8), mode="P")
    paletted.putpalette(palette[ORDER].ravel().tolist())
    image = Image.fromarray(rgb, mode="RGB")
    files = {
        "P.gif": paletted,
        "P.png": paletted,
        "RGBA.png": Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"),
        "CMYK.tif": image.convert("CMYK"),
        "RGB.png": image,
    }
    if (rgb == rgb[..., :1]).all():  # a grey picture: its grey-level modes too
        grey = rgb[..., 0]
        files |= {
            "L.png": Image.fromarray(grey, mode="L"),
            "LA.png": Image.fromarray(np.dstack([grey, alpha]), mode="LA"),
            "I16.png": Image.fromarray(grey.astype(np.uint16) * 257),  # 16-bit PNG, full range
        }
    paths = {}
    for name, picture in files.items():
        paths[name] = folder / name
        picture.save(paths[name])
        with Image.open(paths[name]) as stored:  # the file really is of that mode
            assert stored.mode.replace(";", "").startswith(name.split(".")[0][:2]), (name, stored.mode)
    return paths


def _train(run_dir: Path, *overrides: str) -> Path:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *FAST,
                "backbone=small_cnn",
                "strategy=full_finetune",
                f"paths.output_dir={run_dir}",
                *overrides,
            ],
        )
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    """An image_folder run whose test split holds one grey and one colour picture in every mode."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for label in ("a", "b"):
            for i in range(count):
                pixels = rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)
                (root / split / label).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    grey = _indices(2)
    colour = _indices(3)
    files = [
        *_write_modes(
            root / "test" / "a",
            np.repeat(GREYS[grey][..., None], 3, axis=-1),
            grey,
            np.repeat(GREYS[:, None], 3, 1),
        ).values(),
        *_write_modes(root / "test" / "b", COLOURS[colour], colour, COLOURS).values(),
    ]
    checkpoint = _train(
        tmp_path_factory.mktemp("run"), "data=image_folder", f"data.root={root}", "data.num_workers=0"
    )
    return checkpoint, root, files


def test_predict_feeds_an_image_folder_run_the_tensors_of_its_own_dataset(folder_run):
    checkpoint, root, files = folder_run
    model = load_trained(checkpoint)
    config = model.metadata["config"]
    data = instantiate(config["data"], data_config=model.metadata["data_config"])
    data.setup("test")
    by_path = {Path(path): data.test_set[i][0] for i, (path, _) in enumerate(data.test_set.samples)}
    gifs = [p for p in files if p.suffix == ".gif"]
    assert gifs and sorted(by_path) == sorted(set(files) - set(gifs))  # image folders leave GIFs out
    by_path |= {gif: by_path[gif.with_suffix(".png")] for gif in gifs}  # predict: the same palette picture
    expected = torch.stack([by_path[p] for p in files])
    torch.testing.assert_close(prepare_images(model, files), expected, rtol=0, atol=0)
    with torch.no_grad():
        probabilities = model.module(expected).softmax(-1)
    rows = predict(model, files, top_k=2, batch_size=4, device="cpu")
    for path, row, probs in zip(files, rows, probabilities, strict=True):
        got = {p["class"]: p["probability"] for p in row["predictions"]}
        want = {model.class_names[i]: probs[i].item() for i in range(2)}
        assert got == pytest.approx(want, abs=1e-6), path.name
    # the modes of one picture are one picture: the same tensor from every file of it
    for folder in ("a", "b"):
        same = [by_path[p] for p in files if p.parent.name == folder]
        assert all(torch.equal(same[0], t) for t in same[1:]), folder


def test_predict_gives_a_grayscale_run_grey_levels_in_every_mode(tmp_path):
    checkpoint = _train(tmp_path / "run", "data=digits")
    model = load_trained(checkpoint)
    grey_idx, colour_idx = _indices(2), _indices(3)
    grey = GREYS[grey_idx]
    colour = COLOURS[colour_idx]
    luma = np.asarray(Image.fromarray(colour).convert("L"))  # ITU-R 601-2, as predict documents
    greys = _write_modes(
        tmp_path / "grey", np.repeat(grey[..., None], 3, axis=-1), grey_idx, np.repeat(GREYS[:, None], 3, 1)
    )
    colours = _write_modes(tmp_path / "colour", colour, colour_idx, COLOURS)
    config = model.data_config
    dataset = GrayscaleImages(
        torch.as_tensor(np.stack([grey, luma])),
        torch.zeros(2, dtype=torch.long),
        full_scale=255,
        size=model.image_size,
        interpolation=config.interpolation,
        mean=config.mean,
        std=config.std,
    )
    for paths, index in ((greys, 0), (colours, 1)):
        inputs = prepare_images(model, list(paths.values()))
        for name, tensor in zip(paths, inputs, strict=True):
            torch.testing.assert_close(tensor, dataset[index][0], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "CMYK", "P", "F"])
def test_unreadable_or_out_of_range_files_are_named(folder_run, tmp_path, mode):
    """A file predict cannot use stops with its name, whatever its mode."""
    checkpoint, _, _ = folder_run
    model = load_trained(checkpoint)
    if mode == "F":  # float pixels outside [0, 1]: refused, as training refuses them
        path = tmp_path / "float.tif"
        Image.fromarray(np.full((SIDE, SIDE), 3.0, dtype=np.float32), mode="F").save(path)
    else:  # a file cut short
        whole = tmp_path / f"whole.{'tif' if mode == 'CMYK' else 'png'}"
        Image.new(mode, (SIDE, SIDE)).save(whole)
        path = tmp_path / f"cut_{mode}{whole.suffix}"
        path.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    with pytest.raises(ValueError, match=path.name):
        predict(model, [path], top_k=1, device="cpu")
