"""A checkpoint written before the package was regrouped (0.1.0) still predicts, exports and resumes.

``fixtures/pre_move_small_cnn.ckpt`` was written by ``main`` before the move (see ``fixtures/README.md``);
its stored config names the old import paths (``tl_lightning.module.TransferModule`` ...). Each entry
point is run as a user runs it, as a subprocess of the real script.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from tl_lightning.run.checkpointing import MOVED_PATHS, load_checkpoint, moved_path
from tl_lightning.run.inference import load_trained

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINT = FIXTURES / "pre_move_small_cnn.ckpt"
# the overrides the fixture was written with (fixtures/README.md), the run one epoch longer
RESUME = [
    "backbone=small_cnn",
    "backbone.channels=[8,16]",
    "data.image_size=32",
    "data.batch_size=16",
    "callbacks.gradual_unfreeze.milestones=[1]",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "callbacks.rich_progress_bar=null",
    "+trainer.enable_progress_bar=false",
    "logger=none",
]


def _run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, script, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """The three digit scans the fixture's recorded predictions were made on, as 8-bit PNGs."""
    folder = tmp_path_factory.mktemp("scans")
    digits = load_digits()
    for i in range(1794, 1797):
        image = (digits.images[i] * 255 / 16).round().astype(np.uint8)
        Image.fromarray(image).save(folder / f"scan{i}.png")
    return folder


def test_the_fixture_names_the_old_paths():
    stored = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["tl_lightning"]["config"]
    assert stored["module"]["_target_"] == "tl_lightning.module.TransferModule"
    assert stored["head"]["_target_"] == "tl_lightning.heads.LinearHead"
    assert stored["module"]["scheduler"]["_target_"] == "tl_lightning.optim.warmup_cosine"
    upgraded = load_checkpoint(CHECKPOINT)["tl_lightning"]["config"]
    assert upgraded["module"]["_target_"] == "tl_lightning.modules.transfer.TransferModule"
    assert upgraded["head"]["_target_"] == "tl_lightning.modules.heads.LinearHead"
    assert upgraded["module"]["scheduler"]["_target_"] == "tl_lightning.modules.optim.warmup_cosine"


def test_predict_cli_gives_the_predictions_recorded_before_the_move(scans, tmp_path):
    output = tmp_path / "predictions.json"
    _run(
        "predict.py",
        f"ckpt_path={CHECKPOINT}",
        f"inputs={scans}",
        f"output={output}",
        "top_k=3",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    recorded = json.loads((FIXTURES / "pre_move_small_cnn.predictions.json").read_text())["predictions"]
    rows = json.loads(output.read_text())
    assert [Path(r["path"]).name for r in rows] == ["scan1794.png", "scan1795.png", "scan1796.png"]
    for row, expected in zip(rows, recorded, strict=True):
        assert [p["class"] for p in row["predictions"]] == [c for c, _ in expected]
        assert [p["probability"] for p in row["predictions"]] == pytest.approx(
            [p for _, p in expected], abs=1e-6
        )


def test_the_loaded_model_holds_every_stored_weight():
    model = load_trained(CHECKPOINT)
    stored = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["state_dict"]
    state = model.module.state_dict()
    assert set(state) == set(stored)
    assert all(torch.equal(state[k], stored[k]) for k in stored)


def test_export_cli_writes_safetensors_and_onnx_that_agree_with_the_checkpoint(scans, tmp_path):
    model = load_trained(CHECKPOINT)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.module(images)
    weights = tmp_path / "model.safetensors"
    _run(
        "export.py",
        f"ckpt_path={CHECKPOINT}",
        "format=safetensors",
        f"output={weights}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    exported = load_trained(weights)
    assert exported.metadata["config"]["module"]["_target_"] == "tl_lightning.modules.transfer.TransferModule"
    with torch.no_grad():
        assert torch.equal(exported.module(images), expected)
    graph = tmp_path / "model.onnx"
    _run(
        "export.py",
        f"ckpt_path={CHECKPOINT}",
        "format=onnx",
        f"output={graph}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": images.numpy()})[0]
    assert np.abs(logits - expected.numpy()).max() <= 1e-4


@pytest.mark.slow
def test_train_cli_resumes_it_for_one_more_epoch(tmp_path):
    checkpoint = tmp_path / "pre_move.ckpt"
    shutil.copy(CHECKPOINT, checkpoint)  # a resumed run may write next to it; keep the fixture untouched
    run_dir = tmp_path / "run"
    _run("train.py", *RESUME, f"ckpt_path={checkpoint}", f"hydra.run.dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stored = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    assert stored["epoch"] == 1 and metrics["epochs"] == 3
    assert metrics["global_step"] == stored["global_step"] + 3  # one more epoch of 3 batches, not a restart
    assert metrics["strategy"] == "gradual_unfreeze"
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["tl_lightning"]["config"]["module"]["_target_"] == "tl_lightning.modules.TransferModule"


# public names of 0.1.0 that were removed on purpose, not moved: why
REMOVED = {
    "tl_lightning.inference.read_image": "predict decodes with data.images.load_rgb, as training does",
}


def test_every_public_name_of_0_1_0_resolves_where_the_table_says():
    """Each top-level public name the flat 0.1.0 modules defined (listed from main at 6461fd9 in
    fixtures/pre_move_public_names.json) resolves at the path ``moved_path`` gives (classes and
    functions: to one of that name)."""
    from hydra.utils import get_object

    names = json.loads((FIXTURES / "pre_move_public_names.json").read_text())
    assert len(names) > 100 and set(REMOVED) <= set(names)
    for old in sorted(set(names) - set(REMOVED)):
        new = moved_path(old) or old
        obj = get_object(new)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__name__ == old.rsplit(".", 1)[-1], (old, new, obj)
    for old, new in MOVED_PATHS.items():
        assert moved_path(old) == new
        get_object(new)
    assert moved_path("tl_lightning.module.TransferModule") == "tl_lightning.modules.transfer.TransferModule"
    assert moved_path("tl_lightning.modules.TransferModule") is None  # a prefix of a new path is not old
    assert moved_path("tl_lightning.callbacks.Freeze") is None


def test_a_users_config_with_an_old_path_names_the_new_one(make_cfg):
    from tl_lightning.run.pipeline import train

    cfg = make_cfg("module._target_=tl_lightning.module.TransferModule")
    with pytest.raises(
        ValueError,
        match=r"module\._target_='tl_lightning.module.TransferModule'.*"
        r"tl_lightning.modules.transfer.TransferModule",
    ):
        train(cfg)


def test_lightnings_own_loader_reads_it_too():
    """``TransferModule.load_from_checkpoint`` upgrades the old paths as ``tl_lightning.load`` does."""
    from tl_lightning.modules import TransferModule

    module = TransferModule.load_from_checkpoint(CHECKPOINT)
    stored = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["state_dict"]
    state = module.state_dict()
    assert not module.training and set(state) == set(stored)
    assert all(torch.equal(state[k], stored[k]) for k in stored)
