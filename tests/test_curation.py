"""``data.label_noise`` and ``data.exclude`` / ``data.exclude_top`` (tl_lightning.data.curation) in every
family of data module: in-memory grayscale sets, image folders, text files.

No cleanlab needed: the ``label_issues.csv`` files here are written by the same writer the scan uses,
with rows flagged by hand.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tl_lightning.analysis.label_quality import LabelIssues, write_label_issues
from tl_lightning.backbones import hf_encoder
from tl_lightning.data import DigitsDataModule, ImageFolderDataModule, TextFilesDataModule
from tl_lightning.data.curation import TrainingCuration, flip_labels

DATA_CONFIG = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}


def _digits(**kwargs) -> DigitsDataModule:
    data = DigitsDataModule(DATA_CONFIG, image_size=16, train_per_class=20, **kwargs)
    data.setup()
    return data


def _csv(data, path: Path, flagged: list[int], scores: np.ndarray | None = None) -> Path:
    """A label_issues.csv of ``data``'s training split with ``flagged`` rows and the given scores."""
    curated = data.curated
    n = len(curated.labels)
    mask = np.zeros(n, dtype=bool)
    mask[flagged] = True
    scores = np.linspace(0, 1, n)[::-1].copy() if scores is None else scores
    joint = np.zeros((len(data.class_names),) * 2)
    issues = LabelIssues(curated.labels, curated.labels, scores, mask, joint, data.class_names)
    return write_label_issues(path, issues, curated.rows)


@pytest.mark.parametrize("kind", ["symmetric", "pairs"])
@pytest.mark.parametrize("rate", [0.1, 0.2, 0.4])
def test_noise_flips_exactly_the_rate_of_every_class_seeded(kind, rate):
    labels = np.repeat(np.arange(10), [50, 51, 52, 53, 54, 55, 56, 57, 58, 59])
    noisy = flip_labels(labels, 10, rate, kind, seed=3)
    for cls in range(10):
        members = labels == cls
        assert (noisy[members] != cls).sum() == round(rate * members.sum())
    flipped = noisy != labels
    if kind == "pairs":
        assert np.array_equal(noisy[flipped], (labels[flipped] + 1) % 10)
    else:  # uniformly to another class: every other class is reached
        assert {int(t) for t in noisy[flipped & (labels == 0)]} <= set(range(1, 10))
        assert len(set(zip(labels[flipped].tolist(), noisy[flipped].tolist(), strict=True))) > 20
    assert np.array_equal(noisy, flip_labels(labels, 10, rate, kind, seed=3))
    assert not np.array_equal(noisy, flip_labels(labels, 10, rate, kind, seed=4))
    assert np.array_equal(flip_labels(labels, 10, 0.0, kind, seed=3), labels)


def test_bad_noise_and_exclude_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"data.label_noise.kind must be one of \['symmetric', 'pairs'\]"):
        TrainingCuration(label_noise={"rate": 0.1, "kind": "flip"})
    with pytest.raises(ValueError, match=r"data.label_noise.rate must be a number in \[0, 1\)"):
        TrainingCuration(label_noise={"rate": 1.0})
    with pytest.raises(ValueError, match=r"data.label_noise has unknown keys \['ratio'\]"):
        TrainingCuration(label_noise={"ratio": 0.1})
    with pytest.raises(ValueError, match="set data.exclude=<it> too"):
        TrainingCuration(exclude_top=5)
    with pytest.raises(FileNotFoundError, match="data.exclude='missing.csv' is not a file"):
        DigitsDataModule(DATA_CONFIG, exclude="missing.csv").setup()


def test_noise_touches_training_labels_only_and_keeps_the_truth():
    clean, noisy = _digits(), _digits(label_noise={"rate": 0.4, "kind": "pairs", "seed": 1})
    assert noisy.curated.summary["label_noise"] == {"rate": 0.4, "kind": "pairs", "seed": 1, "flipped": 80}
    assert np.array_equal(noisy.curated.true_labels, clean.curated.labels)
    train_labels = noisy.train_set.labels.numpy()
    assert np.array_equal(train_labels, noisy.curated.labels)
    assert (train_labels != clean.train_set.labels.numpy()).sum() == 80
    assert torch.equal(noisy.train_set.images, clean.train_set.images)  # the same inputs, in order
    for split in ("val_set", "test_set"):
        assert torch.equal(getattr(noisy, split).labels, getattr(clean, split).labels)


def test_exclude_drops_exactly_the_flagged_rows_or_the_top_scored(tmp_path):
    clean = _digits(label_noise={"rate": 0.2, "seed": 0})
    flagged = [0, 5, 17, 150, 199]
    path = _csv(clean, tmp_path / "label_issues.csv", flagged)
    cleaned = _digits(exclude=str(path), label_noise={"rate": 0.2, "seed": 0})
    keep = [i for i in range(200) if i not in flagged]
    assert torch.equal(cleaned.train_set.images, clean.train_set.images[keep])
    assert torch.equal(cleaned.train_set.labels, clean.train_set.labels[keep])  # the noisy labels, kept rows
    assert cleaned.curated.summary["excluded"] == 5 and cleaned.curated.summary["exclude_file"] == str(path)

    scores = np.zeros(200)
    scores[[3, 9, 40]] = [0.9, 0.8, 0.7]  # the three highest, none of them flagged
    path = _csv(clean, tmp_path / "scored.csv", flagged, scores)
    top = _digits(exclude=str(path), exclude_top=2, label_noise={"rate": 0.2, "seed": 0})
    assert torch.equal(
        top.train_set.images, clean.train_set.images[[i for i in range(200) if i not in (3, 9)]]
    )


def test_exclude_refuses_a_file_of_other_data(tmp_path):
    path = _csv(_digits(), tmp_path / "label_issues.csv", [1])
    with pytest.raises(
        ValueError,
        match=r"label_issues.csv.*does not match the training split of DigitsDataModule: "
        r"the file has 200 rows, the training split 300 examples",
    ):
        DigitsDataModule(DATA_CONFIG, image_size=16, train_per_class=30, exclude=str(path)).setup()
    with pytest.raises(ValueError, match="at index 0 the file has item '.+', the data '.+'"):  # another draw
        DigitsDataModule(
            DATA_CONFIG, image_size=16, train_per_class=20, subset_seed=7, exclude=str(path)
        ).setup()
    with pytest.raises(ValueError, match="the file has given label"):  # scored without the noise
        _digits(exclude=str(path), label_noise={"rate": 0.4, "seed": 0})


def _rewrite(path: Path, out: Path, encoding: str = "utf-8", **cells) -> Path:
    """``path`` with the first rows' cells replaced (``flagged=["1", "x"]``), saved as ``out``."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for column, values in cells.items():
        for row, value in zip(rows, values, strict=False):
            row[column] = value
    with open(out, "w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_hand_edited_flags_count_or_are_refused(tmp_path):
    """A person marks rows with true/1 (any case, blanks around) or gets an error naming file and row."""
    data = _digits()
    path = _csv(data, tmp_path / "label_issues.csv", [])
    marked = _rewrite(path, tmp_path / "marked.csv", flagged=["TRUE", " 1 ", "True", "0", "FALSE"])
    order = [int(line.split(",")[0]) for line in marked.read_text().splitlines()[1:4]]
    assert sorted(set(range(200)) - set(_digits(exclude=str(marked)).curated.keep.tolist())) == sorted(order)
    for mark in ("yes", "x", ""):
        bad = _rewrite(path, tmp_path / "bad.csv", flagged=["true", mark])
        index = bad.read_text().splitlines()[2].split(",")[0]
        with pytest.raises(
            ValueError, match=rf"bad\.csv.*row index {index} has flagged='{mark}'.*'true', '1'"
        ):
            _digits(exclude=str(bad))
    excel = _rewrite(path, tmp_path / "excel.csv", "utf-8-sig", flagged=["true"])  # a byte-order mark
    assert excel.read_bytes().startswith(b"\xef\xbb\xbf")
    assert _digits(exclude=str(excel)).curated.summary["excluded"] == 1


def test_exclude_top_ranks_by_the_full_score_and_then_file_order(tmp_path):
    data = _digits()
    scores = np.linspace(0, 0.5, 200)
    scores[[3, 9]] = [0.9999996, 0.9999999]  # the same at 6 decimals: 9 is the top row
    top = _digits(exclude=str(_csv(data, tmp_path / "s.csv", [], scores)), exclude_top=1)
    assert sorted(set(range(200)) - set(top.curated.keep.tolist())) == [9]
    scores[[3, 9, 40]] = 1.0  # a true tie: the file lists 3, 9, 40 in that order (stable sort)
    top = _digits(exclude=str(_csv(data, tmp_path / "t.csv", [], scores)), exclude_top=2)
    assert sorted(set(range(200)) - set(top.curated.keep.tolist())) == [3, 9]


def test_an_exclusion_that_empties_a_class_names_the_key_and_file(tmp_path):
    data = _digits()
    zeros = np.flatnonzero(data.curated.labels == 0)
    path = _csv(data, tmp_path / "all_zeros.csv", zeros.tolist())
    with pytest.raises(
        ValueError, match=r"data.exclude='.*all_zeros.csv' drops all 20 training examples of class '0'"
    ):
        _digits(exclude=str(path))
    scores = np.zeros(200)
    scores[zeros] = 1.0
    path = _csv(data, tmp_path / "top.csv", [], scores)
    with pytest.raises(ValueError, match=r"data.exclude_top=25 of '.*top.csv' drops all 20 .* class '0'"):
        _digits(exclude=str(path), exclude_top=25)
    summary = _digits(exclude=str(path), exclude_top=19).curated.summary
    assert summary["exclude_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def _image_folder(root: Path, **kwargs) -> ImageFolderDataModule:
    data = ImageFolderDataModule(str(root), DATA_CONFIG, augment=False, num_workers=0, **kwargs)
    data.setup()
    return data


def test_image_folders_match_by_path(tmp_path, monkeypatch):
    for name, shade in (("dark", 30), ("light", 220)):
        (tmp_path / "a" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (8, 8), shade + i).save(tmp_path / "a" / name / f"{i}.png")
    data = _image_folder(tmp_path / "a")
    path = _csv(data, tmp_path / "a.csv", [0, 2])
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    root = str(tmp_path / "a")
    assert {row["path"] for row in rows} == {p[len(root) + 1 :] for p, _ in data.train_set.samples}
    assert rows[0]["path"].split("/")[0] in ("dark", "light") and not rows[0]["item"]  # relative to root
    keep = [s for i, s in enumerate(data.train_set.samples) if i not in (0, 2)]
    for spelling in (root, root + "/", f"{tmp_path}/./a"):  # the same folder, spelled three ways
        assert _image_folder(Path(spelling), exclude=str(path)).train_set.samples == keep
    monkeypatch.chdir(tmp_path)
    assert _image_folder(Path("a"), exclude=str(path)).curated.summary["excluded"] == 2

    (tmp_path / "other" / "dark").mkdir(parents=True)  # another folder: other files
    (tmp_path / "other" / "light").mkdir()
    for i in range(10):
        Image.new("L", (8, 8), 9).save(tmp_path / "other" / "dark" / f"d{i}.png")
        Image.new("L", (8, 8), 99).save(tmp_path / "other" / "light" / f"l{i}.png")
    with pytest.raises(ValueError, match=r"a\.csv.*ImageFolderDataModule: at index \d+ the file has path '"):
        _image_folder(tmp_path / "other", exclude=str(path))


def test_text_files_match_by_text_and_take_noise(tmp_path, tiny_bert):
    rows = [(f"review number {i} {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(60)]
    source = tmp_path / "reviews.csv"
    with source.open("w", newline="") as handle:
        csv.writer(handle).writerows([("text", "label"), *rows])
    config = hf_encoder(str(tiny_bert)).data_config

    def build(**kwargs):
        data = TextFilesDataModule(config, str(source), **kwargs)
        data.setup()
        return data

    noise = {"rate": 0.25, "kind": "pairs", "seed": 0}
    noisy = build(label_noise=noise)
    assert (noisy.curated.labels != noisy.curated.true_labels).sum() == noisy.curated.summary["label_noise"][
        "flipped"
    ]
    path = _csv(noisy, tmp_path / "texts.csv", [4, 7])
    cleaned = build(label_noise=noise, exclude=str(path))
    keep = [i for i in range(len(noisy.train_set)) if i not in (4, 7)]
    assert cleaned.train_set.texts == [noisy.train_set.texts[i] for i in keep]
    assert torch.equal(cleaned.train_set.labels, noisy.train_set.labels[keep])
    with pytest.raises(ValueError, match="TextFilesDataModule: at index .* the file has text"):
        build(label_noise=noise, exclude=str(path), split_seed=1)
