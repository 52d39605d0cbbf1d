"""A trained checkpoint rebuilds its model, classifies new image files, and exports to safetensors/ONNX."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import CONF_DIR, FAST
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch.nn import functional as F

from tl_lightning.run.inference import (
    export,
    export_checkpoint,
    load_trained,
    predict,
    predict_to_file,
)
from tl_lightning.run.pipeline import rebuild_module, train

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 32
SHRINK = [
    "strategy=full_finetune",  # the backbone's weights change too, so loading them is checked
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "+trainer.enable_progress_bar=false",
    "callbacks.rich_progress_bar=null",
    f"data.image_size={IMAGE_SIZE}",
    "data.batch_size=16",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """``last.ckpt`` of the default job (EfficientNet-Lite0 on digits), shrunk to a few steps."""
    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*SHRINK, f"paths.output_dir={run_dir}"])
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> tuple[list[Path], np.ndarray]:
    """Twelve 8x8 digit scans as 8-bit PNGs (grey levels 0-16 scaled to 0-255), and the scans."""
    folder = tmp_path_factory.mktemp("digits")
    scans = load_digits().images[-12:]
    paths = []
    for i, scan in enumerate(scans):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray((scan * 255 / 16).round().astype(np.uint8)).save(paths[-1])
    return paths, scans


def _digits_reference(scans: np.ndarray, data_config) -> torch.Tensor:
    """What the digits data module feeds the model: scans in [0, 1], upsampled whole, normalised."""
    images = torch.tensor(scans, dtype=torch.float32)[:, None] / 16
    size = (IMAGE_SIZE, IMAGE_SIZE)
    upsampled = F.interpolate(images, size=size, mode=data_config.interpolation, align_corners=False)
    mean = torch.tensor(data_config.mean).view(1, 3, 1, 1)
    std = torch.tensor(data_config.std).view(1, 3, 1, 1)
    return (upsampled.clamp(0, 1).expand(-1, 3, -1, -1) - mean) / std


def test_checkpoint_rebuilds_the_trained_module(checkpoint):
    model = load_trained(checkpoint)
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    trained = {k: v for k, v in stored["state_dict"].items() if not k.startswith("heads.source.")}
    rebuilt = model.module.state_dict()
    assert rebuilt.keys() == trained.keys()
    assert all(torch.equal(rebuilt[k], trained[k]) for k in trained)
    assert model.class_names == [str(d) for d in range(10)]
    assert model.image_size == IMAGE_SIZE and not model.module.training


@pytest.mark.parametrize(
    "backbone",
    [
        ["backbone=timm", "backbone.model_name=resnet18", "backbone.pretrained=true"],  # would download
        ["backbone=source_checkpoint", "backbone.path=nowhere/last.ckpt"],  # would read the source run
    ],
    ids=["timm_pretrained", "source_checkpoint"],
)
def test_rebuilding_reads_no_pretrained_weights(tmp_path, backbone):
    """The checkpoint holds every weight: rebuilding downloads nothing and reads no other file."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*backbone, f"paths.output_dir={tmp_path}"])
    module = rebuild_module(OmegaConf.to_container(cfg, resolve=True), num_classes=3)
    assert module.heads["target"](torch.zeros(1, module.backbone.num_features)).shape == (1, 3)
    assert "source" not in module.heads


def test_predictions_use_the_runs_own_preprocessing(checkpoint, digit_files):
    """Image files give the probabilities of the model on the digits pipeline's tensors (up to 8-bit PNGs)."""
    paths, scans = digit_files
    model = load_trained(checkpoint)
    reference = _digits_reference(scans, model.data_config)
    from_files = torch.stack([model.transform()(Image.open(p)) for p in paths])
    torch.testing.assert_close(from_files, reference, atol=0.02, rtol=0)  # no crop, grey, same scaling
    with torch.no_grad():
        expected = model.module(reference).softmax(-1)
    rows = predict(model, paths, top_k=3, batch_size=5, device="cpu")
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for row, probs in zip(rows, expected, strict=True):
        top = probs.topk(3)
        assert [p["class"] for p in row["predictions"]][0] == model.class_names[top.indices[0]]
        got = [p["probability"] for p in row["predictions"]]
        np.testing.assert_allclose(got, top.values.numpy(), atol=0.01)
        assert got == sorted(got, reverse=True)


def test_onnx_export_matches_pytorch(checkpoint, tmp_path):
    model = load_trained(checkpoint)
    path = export(model, "onnx", tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch dimension is dynamic
        images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model.module(images).numpy()
        logits = session.run(["logits"], {"images": images.numpy()})[0]
        assert logits.shape == (batch, 10)
        assert np.abs(logits - expected).max() <= 1e-4
    properties = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert properties["class_names"] == model.class_names
    assert properties["data_config"]["mean"] == list(model.data_config.mean)
    assert properties["image_size"] == IMAGE_SIZE and properties["data"].endswith("DigitsDataModule")


def test_safetensors_export_round_trips(checkpoint, digit_files, tmp_path):
    paths, _ = digit_files
    model = load_trained(checkpoint)
    exported = load_trained(export(model, "safetensors", tmp_path / "model.safetensors"))
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(exported.module(images), model.module(images))
    assert exported.class_names == model.class_names
    assert predict(exported, paths, 2, 4, "cpu") == predict(model, paths, 2, 4, "cpu")


def test_predict_cli_reads_a_list_file_and_writes_json(checkpoint, digit_files, tmp_path):
    paths, _ = digit_files
    listing = tmp_path / "images.txt"
    listing.write_text("# new scans\n" + "\n".join(str(p) for p in paths[:3]) + "\n\n")
    output = tmp_path / "predictions.json"
    subprocess.run(
        [
            sys.executable,
            "predict.py",
            f"ckpt_path={checkpoint}",
            f"inputs={listing}",
            f"output={output}",
            "top_k=2",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    rows = json.loads(output.read_text())
    assert [r["path"] for r in rows] == [str(p) for p in paths[:3]]
    assert all(len(r["predictions"]) == 2 for r in rows)


def test_predict_writes_csv(checkpoint, digit_files, tmp_path):
    paths, _ = digit_files
    output = predict_to_file(checkpoint, paths[0].parent, tmp_path / "p.csv", top_k=2, device="cpu")
    lines = output.read_text().splitlines()
    assert lines[0] == "path,class_1,probability_1,class_2,probability_2"
    assert len(lines) == 1 + len(paths)


class _Payload:
    """Anything but tensors and plain data: a weights_only load must refuse it."""


def _bad_checkpoint(kind: str, tmp_path: Path, checkpoint: Path) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if kind == "no_metadata":
        stored.pop("tl_lightning")
        torch.save(stored, path)
    elif kind == "metadata_without_class_names":
        stored["tl_lightning"].pop("class_names")
        torch.save(stored, path)
    elif kind == "other_model":
        stored["state_dict"] = {"heads.target.1.weight": torch.zeros(3, 3)}
        torch.save(stored, path)
    elif kind == "pickle":
        torch.save({"state_dict": {}, "payload": _Payload()}, path)
    elif kind == "truncated":
        path.write_bytes(checkpoint.read_bytes()[:1000])
    elif kind == "unknown_backbone":
        stored["tl_lightning"]["config"]["backbone"]["_target_"] = "tl_lightning.backbones.gone"
        torch.save(stored, path)
    elif kind == "plain_safetensors":
        path = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in stored["state_dict"].items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "error", "names"),
    [
        ("missing", FileNotFoundError, ["missing.ckpt"]),
        ("no_metadata", ValueError, ["no_metadata.ckpt", "tl_lightning"]),
        ("metadata_without_class_names", ValueError, ["metadata_without_class_names.ckpt", "class_names"]),
        ("other_model", ValueError, ["other_model.ckpt", "missing"]),
        ("pickle", ValueError, ["pickle.ckpt", "weights_only"]),
        ("truncated", ValueError, ["truncated.ckpt"]),
        ("unknown_backbone", ValueError, ["unknown_backbone.ckpt", "tl_lightning.backbones.gone"]),
        ("plain_safetensors", ValueError, ["plain_safetensors.safetensors", "tl_lightning"]),
    ],
)
def test_bad_checkpoints_are_named(checkpoint, tmp_path, kind, error, names):
    path = _bad_checkpoint(kind, tmp_path, checkpoint)
    with pytest.raises(error) as raised:
        load_trained(path)
    assert all(name in str(raised.value) for name in names), raised.value


def test_bad_prediction_inputs_are_named(checkpoint, digit_files, tmp_path):
    paths, _ = digit_files
    broken = tmp_path / "broken.png"
    broken.write_bytes(paths[0].read_bytes()[:40])
    cases = [
        ({"inputs": [paths[0], broken]}, ValueError, "broken.png"),
        ({"inputs": tmp_path / "nowhere"}, FileNotFoundError, "nowhere"),
        ({"inputs": checkpoint}, ValueError, ".txt"),
        ({"output": tmp_path / "p.xlsx"}, ValueError, ".csv"),
        ({"top_k": 11}, ValueError, "top_k=11"),
        ({"device": "gpu0"}, ValueError, "device='gpu0'"),
    ]
    for change, error, named in cases:
        arguments = {"inputs": paths[:2], "output": tmp_path / "p.csv", "top_k": 2, "device": "cpu"} | change
        with pytest.raises(error, match=named.replace(".", r"\.")):
            predict_to_file(checkpoint, **arguments)


def test_unknown_export_format_is_refused_before_loading(tmp_path):
    with pytest.raises(
        ValueError, match=r"format='tflite' is not one of \['safetensors', 'onnx', 'hf', 'timm'\]"
    ):
        export_checkpoint(tmp_path / "not-even-there.ckpt", "tflite", tmp_path / "model.tflite")


# Runs that train more than one classifier: a domain pair (DANN) and two tasks, digits only (fast).
NOT_SINGLE_TASK = {
    "dann": [
        "data=mnist5k_to_digits",
        "strategy=dann",
        "data.source._target_=tl_lightning.data.DigitsDataModule",
    ],
    "multitask": [
        "data=mnist5k_fashion",
        "strategy=multitask",
        "~data.tasks.fashion",
        "data.tasks.digit._target_=tl_lightning.data.DigitsDataModule",
        "+data.tasks.scan._target_=tl_lightning.data.DigitsDataModule",
        "+data.tasks.scan._partial_=true",
    ],
}


def _train_small(run_dir: Path, *overrides: str) -> Path:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=[*FAST, "backbone=small_cnn", f"paths.output_dir={run_dir}", *overrides]
        )
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(NOT_SINGLE_TASK))
def test_multi_task_and_domain_pair_checkpoints_say_what_predict_and_export_take(kind, digit_files, tmp_path):
    """predict.py and export.py refuse them naming the checkpoint, what they support and what to do; the
    domain-pair advice (a single-task run from its backbone) is followed here and that run predicts."""
    checkpoint = _train_small(tmp_path / kind, *NOT_SINGLE_TASK[kind])
    paths, _ = digit_files
    calls = {
        "predict": lambda: predict_to_file(checkpoint, paths[:2], tmp_path / "p.csv", top_k=2, device="cpu"),
        "export": lambda: export_checkpoint(checkpoint, "safetensors", tmp_path / "m.safetensors"),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as raised:
            call()
        message = str(raised.value)
        assert str(checkpoint) in message and f"strategy={kind}" in message, (name, message)
        assert "support single-task checkpoints only" in message and "TransferModule" in message, message
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.safetensors").exists()
    if kind == "multitask":
        assert (
            "digit: tl_lightning.data.DigitsDataModule, scan: tl_lightning.data.DigitsDataModule" in message
        )
        assert "train that task as a single-task run" in message
        return
    advice = re.search(r"python train\.py (.*), and predict", message).group(1)
    overrides = shlex.split(advice.replace("data=<the target data>", "data=digits"))
    follow_up = _train_small(tmp_path / "follow_up", *overrides)
    rows = predict(load_trained(follow_up), paths[:2], top_k=2, device="cpu")
    assert [r["path"] for r in rows] == [str(p) for p in paths[:2]]
