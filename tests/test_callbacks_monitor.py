"""TrainableParamsMonitor and LayerDriftMonitor."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from callback_helpers import TinyModel, dataloader, make_trainer, tensors_in
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tl_lightning.callbacks import GradualUnfreeze, LayerDriftMonitor, TrainableParamsMonitor


class EpochMetrics(Callback):
    """Keeps ``callback_metrics`` at every training epoch end (after the monitors, listed first)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epochs.append({k: v.item() for k, v in trainer.callback_metrics.items()})


def test_trainable_params_follow_the_stages(tmp_path):
    metrics = EpochMetrics()
    callbacks = [TrainableParamsMonitor(), GradualUnfreeze(milestones=[1, 2]), metrics]
    make_trainer(tmp_path, 3, callbacks).fit(TinyModel(), dataloader())
    head, block = 8 * 3 + 3, 8 * 8 + 8 + 16
    first = 4 * 8 + 8 + 16
    assert [m["trainable_params"] for m in metrics.epochs] == [head, head + block, head + 2 * block + first]


def test_drift_is_zero_for_frozen_groups_and_grows_once_unfrozen(tmp_path):
    metrics = EpochMetrics()
    model = TinyModel()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    callbacks = [LayerDriftMonitor(), GradualUnfreeze(milestones=[1, 2]), metrics]
    make_trainer(tmp_path, 3, callbacks).fit(model, dataloader())
    drift = [{k: v for k, v in m.items() if k.startswith("drift/")} for m in metrics.epochs]
    assert drift[0] == {"drift/backbone.0": 0.0, "drift/backbone.1": 0.0, "drift/backbone.2": 0.0}
    assert drift[1]["drift/backbone.2"] > 0 and drift[1]["drift/backbone.1"] == 0.0
    names = [n for n in initial if n.startswith("backbone.2.")]
    moved = sum((dict(model.named_parameters())[n] - initial[n]).square().sum() for n in names)
    expected = (moved / sum(initial[n].square().sum() for n in names)).sqrt().item()
    assert drift[2]["drift/backbone.2"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_drift_origin_survives_resume(tmp_path):
    full = EpochMetrics()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    make_trainer(tmp_path, 2, [LayerDriftMonitor(), full, ckpt], enable_checkpointing=True).fit(
        TinyModel(optim="all"), dataloader()
    )
    resumed = EpochMetrics()
    make_trainer(tmp_path, 2, [LayerDriftMonitor(), resumed]).fit(
        TinyModel(optim="all"), dataloader(), ckpt_path=tmp_path / "epoch=0.ckpt"
    )
    drift = {k: v for k, v in resumed.epochs[0].items() if k.startswith("drift/")}
    assert drift == pytest.approx({k: full.epochs[1][k] for k in drift}) and len(drift) == 3
    assert all(v > 0.01 for v in drift.values())


def test_drift_state_is_keyed_by_selector(tmp_path):
    a, b = LayerDriftMonitor(), LayerDriftMonitor(modules="head")
    trainer = make_trainer(tmp_path, 1, [a, b], max_steps=1)
    trainer.fit(TinyModel(optim="all"), dataloader())
    assert a.state_key != b.state_key
    assert a.state_dict()["fingerprint"] != b.state_dict()["fingerprint"]


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_checkpoint_holds_no_drift_reference_and_resume_logs_the_same_drift(tmp_path):
    monitor = LayerDriftMonitor()
    full = EpochMetrics()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    callbacks = [monitor, GradualUnfreeze(milestones=[1, 2]), full, ckpt]
    make_trainer(tmp_path, 3, callbacks, enable_checkpointing=True).fit(TinyModel(), dataloader())

    checkpoint = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    state = checkpoint["callbacks"][monitor.state_key]
    assert set(state) == {"fingerprint"} and isinstance(state["fingerprint"], str)
    assert tensors_in(state) == []
    # no copy of any starting weight anywhere (ModelCheckpoint keeps a scalar score)
    assert [t.shape for t in tensors_in(checkpoint["callbacks"]) if t.numel() > 1] == []
    assert len(tensors_in(checkpoint["state_dict"])) > 0  # the checks above see tensors where there are some

    resumed = EpochMetrics()
    make_trainer(tmp_path, 3, [LayerDriftMonitor(), GradualUnfreeze(milestones=[1, 2]), resumed]).fit(
        TinyModel(), dataloader(), ckpt_path=tmp_path / "epoch=1.ckpt"
    )
    drift = {k: v for k, v in resumed.epochs[0].items() if k.startswith("drift/")}
    assert len(drift) == 3 and drift["drift/backbone.1"] > 0
    assert drift == {k: full.epochs[2][k] for k in drift}  # exactly the uninterrupted run's values


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_from_other_starting_weights_names_the_fix(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    make_trainer(tmp_path, 1, [LayerDriftMonitor(), ckpt], enable_checkpointing=True).fit(
        TinyModel(optim="all"), dataloader()
    )
    trainer = make_trainer(tmp_path, 2, [LayerDriftMonitor()])
    with pytest.raises(
        ValueError, match=r"cannot resume its drift.*same pretrained weights or seed.*layer_drift=null"
    ):
        trainer.fit(TinyModel(optim="all", seed=1), dataloader(), ckpt_path=tmp_path / "epoch=0.ckpt")


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_a_checkpoint_holding_the_reference_itself_still_resumes(tmp_path):
    full = EpochMetrics()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    make_trainer(tmp_path, 2, [LayerDriftMonitor(), full, ckpt], enable_checkpointing=True).fit(
        TinyModel(optim="all"), dataloader()
    )
    path = tmp_path / "epoch=0.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    key = LayerDriftMonitor().state_key
    start = TinyModel(optim="all")
    names = [n for n, _ in start.named_parameters() if n.startswith("backbone.")]
    checkpoint["callbacks"][key] = {"initial": {n: start.get_parameter(n).detach().clone() for n in names}}
    torch.save(checkpoint, path)
    resumed = EpochMetrics()  # from a module with other starting weights: the checkpoint's θ₀ counts
    make_trainer(tmp_path, 2, [LayerDriftMonitor(), resumed]).fit(
        TinyModel(optim="all", seed=1), dataloader(), ckpt_path=path
    )
    drift = {k: v for k, v in resumed.epochs[0].items() if k.startswith("drift/")}
    assert drift == {k: full.epochs[1][k] for k in drift} and len(drift) == 3


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_a_bf16_true_run_resumes_its_drift(tmp_path):
    """``precision=bf16-true`` converts the module after Lightning loads a checkpoint: the weights held
    before the load are compared in the dtype the run took its starting point in."""
    monitor = LayerDriftMonitor()
    full = EpochMetrics()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    callbacks = [monitor, full, ckpt]
    make_trainer(tmp_path, 2, callbacks, enable_checkpointing=True, precision="bf16-true").fit(
        TinyModel(optim="all"), dataloader()
    )
    resumed = EpochMetrics()
    make_trainer(tmp_path, 2, [LayerDriftMonitor(), resumed], precision="bf16-true").fit(
        TinyModel(optim="all"), dataloader(), ckpt_path=tmp_path / "epoch=0.ckpt"
    )
    drift = {k: v for k, v in resumed.epochs[0].items() if k.startswith("drift/")}
    assert drift and drift == {k: full.epochs[1][k] for k in drift}
