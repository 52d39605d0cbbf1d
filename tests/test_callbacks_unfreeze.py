"""GradualUnfreeze: staging, any module, schedulers, BatchNorm, warm-up, resume, DDP."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from callback_helpers import Recorder, TinyModel, dataloader, make_trainer, state, timm_cosine
from lightning.pytorch.callbacks import BaseFinetuning, ModelCheckpoint
from torch import nn
from torch.optim import lr_scheduler

from tl_lightning.callbacks import GradualUnfreeze

HEAD = {"head.weight", "head.bias"}


def layer(i: int) -> set[str]:
    return {f"backbone.{i}.{m}.{p}" for m in (0, 1) for p in ("weight", "bias")}


def per_epoch(rec: Recorder) -> list[set[str]]:
    return rec.trainable[::4]  # 4 steps per epoch


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"milestones": []}, "strictly increasing"),
        ({"milestones": [2, 1]}, "strictly increasing"),
        ({"milestones": [-1]}, "integers >= 0"),
        ({"milestones": [1], "unit": "epochs"}, r"one of \('epoch', 'step'\)"),
        ({"milestones": [1, 2], "groups_per_milestone": 0}, "integer >= 1 or a list of 2"),
        ({"milestones": [1, 2], "groups_per_milestone": [1]}, "integer >= 1 or a list of 2"),
        ({"milestones": [1], "warmup_steps": -1}, "integer >= 0"),
        ({"milestones": [1], "train_bn": 1}, "True or False"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradualUnfreeze(**kwargs)


class BackboneOnly(pl.LightningModule):
    """Every parameter lies in ``backbone`` (three Linear layer groups); the optimizer gets them all."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3))
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        x, y = batch
        return nn.functional.cross_entropy(self.backbone(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def frozen_head() -> TinyModel:
    model = TinyModel(optim="all")
    model.head.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    ("make_model", "kwargs", "phase"),
    [
        (BackboneOnly, {"milestones": [1, 2]}, r"phase 0 \(until epoch 1\)"),
        (BackboneOnly, {"milestones": [3], "unit": "step"}, r"phase 0 \(until step 3\)"),
        (BackboneOnly, {"milestones": [0, 2], "groups_per_milestone": [2, 1]}, None),
        (frozen_head, {"milestones": [1, 2], "train_bn": False}, r"phase 0 \(until epoch 1\)"),
        (frozen_head, {"milestones": [1, 2], "train_bn": True}, None),  # BatchNorm trains from step 1
        (BackboneOnly, {"milestones": [0, 1]}, None),  # milestone 0: a layer group trains from step 1
    ],
)
def test_first_phase_with_nothing_to_train_fails_at_fit_start(tmp_path, make_model, kwargs, phase):
    """Refused before any step exactly when the first step would have nothing to train."""
    model = make_model()
    rec = Recorder()
    trainer = make_trainer(tmp_path, 3, [GradualUnfreeze(**kwargs), rec])
    if phase is None:
        trainer.fit(model, dataloader())
        assert rec.trainable[0], "something trains from the first step"
        return
    with pytest.raises(
        ValueError,
        match=rf"GradualUnfreeze\(modules=\['backbone'\], milestones={re.escape(str(kwargs['milestones']))}.*"
        rf"leaves nothing to train in {phase}.*{type(model).__name__} has no other trainable parameter",
    ):
        trainer.fit(model, dataloader())
    assert rec.trainable == [] and getattr(model, "steps", 0) == 0, "refused before any step"


class UnfreezeHeadAtStart(BaseFinetuning):
    """Another callback that changes trainability: it unfreezes ``head`` when the first epoch starts."""

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        pass

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Any) -> None:
        if epoch == 0:
            pl_module.head.requires_grad_(True)


@pytest.mark.parametrize(
    ("callbacks", "refused"),
    [
        ([GradualUnfreeze(milestones=[1, 2]), GradualUnfreeze(modules="head", milestones=[2])], True),
        ([GradualUnfreeze(milestones=[1, 2]), GradualUnfreeze(modules="head", milestones=[0])], False),
        ([GradualUnfreeze(modules="head", milestones=[0]), GradualUnfreeze(milestones=[1, 2])], False),
        ([GradualUnfreeze(milestones=[1, 2]), UnfreezeHeadAtStart()], False),  # cannot tell: not judged
    ],
)
def test_first_phase_counts_what_other_callbacks_unfreeze_before_the_first_step(tmp_path, callbacks, refused):
    model, rec = TinyModel(optim="all"), Recorder()
    model.head.requires_grad_(False)
    trainer = make_trainer(tmp_path, 3, [*callbacks, rec])
    if refused:
        with pytest.raises(ValueError, match=r"leaves nothing to train in phase 0"):
            trainer.fit(model, dataloader())
        assert rec.trainable == []
    else:
        trainer.fit(model, dataloader())
        assert rec.trainable[0] == HEAD


def test_more_milestones_than_layer_groups_fails_in_setup(tmp_path):
    trainer = make_trainer(tmp_path, 1, [GradualUnfreeze(milestones=[1, 2, 3, 4])])
    with pytest.raises(
        ValueError, match=r"but \['backbone'\] has 3: \['backbone.0', 'backbone.1', 'backbone.2'\]"
    ):
        trainer.fit(TinyModel(), dataloader())


@pytest.mark.parametrize("optim", ["trainable", "all", "split"])
def test_unfreezes_from_the_output_side_on_any_module(tmp_path, optim):
    model = TinyModel(optim=optim)
    before = state(model)
    rec = Recorder()
    trainer = make_trainer(tmp_path, 4, [GradualUnfreeze(milestones=[1, 2, 3]), rec])
    trainer.fit(model, dataloader())
    assert per_epoch(rec) == [
        HEAD,
        HEAD | layer(2),
        HEAD | layer(2) | layer(1),
        HEAD | layer(2) | layer(1) | layer(0),
    ]
    after = state(model)
    # added to the optimizer (a Linear bias before BatchNorm gets no gradient, so check the weights)
    assert all(
        not torch.equal(before[name], after[name]) for name in ("backbone.0.0.weight", "backbone.0.1.weight")
    )
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert {"backbone.0", "backbone.1", "backbone.2"} <= set(names) and len(names) == len(set(names))


def test_groups_per_milestone_list_and_lp_ft(tmp_path):
    rec = Recorder()
    make_trainer(tmp_path, 3, [GradualUnfreeze(milestones=[1, 2], groups_per_milestone=[2, 1]), rec]).fit(
        TinyModel(), dataloader()
    )
    assert per_epoch(rec) == [HEAD, HEAD | layer(2) | layer(1), HEAD | layer(2) | layer(1) | layer(0)]
    rec = Recorder()
    make_trainer(tmp_path, 2, [GradualUnfreeze(milestones=[1]), rec]).fit(TinyModel(), dataloader())
    assert per_epoch(rec) == [HEAD, HEAD | layer(2) | layer(1) | layer(0)]


def test_step_milestone_waits_for_the_accumulation_window(tmp_path):
    rec = Recorder()
    trainer = make_trainer(
        tmp_path, 2, [GradualUnfreeze(milestones=[3], unit="step"), rec], accumulate_grad_batches=2
    )
    trainer.fit(TinyModel(), dataloader())
    # 2 optimizer steps per epoch; global_step reaches 3 after batch 5, so batch 6 starts a window with it
    assert [len(t) for t in rec.trainable] == [2] * 6 + [14] * 2


SCHEDULERS = {
    "one_cycle": lambda o: {
        "scheduler": lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=12),
        "interval": "step",
    },
    "plateau": lambda o: {
        "scheduler": lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=10.0),
        "monitor": "train_loss",
    },
    "lambda_list": lambda o: {
        "scheduler": lr_scheduler.LambdaLR(o, [lambda s: 1.0 / (1 + s), lambda s: 0.5]),
        "interval": "step",
    },
    "warmup_cosine": lambda o: {
        "scheduler": lr_scheduler.SequentialLR(
            o,
            [lr_scheduler.LinearLR(o, 0.1, total_iters=3), lr_scheduler.CosineAnnealingLR(o, T_max=9)],
            milestones=[3],
        ),
        "interval": "step",
    },
    "timm_cosine": timm_cosine,
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_stay_aligned(tmp_path, name):
    """Added backbone groups copy the first group ("other", the decay group) and follow its schedule."""
    rec = Recorder()
    model = TinyModel(optim="split", scheduler=SCHEDULERS[name])
    make_trainer(tmp_path, 3, [GradualUnfreeze(milestones=[1, 2]), rec]).fit(model, dataloader())
    for lrs in rec.lrs:
        assert lrs.keys() == {"other", "other/2", "backbone.0", "backbone.1", "backbone.2"}
        assert lrs["backbone.0"] == lrs["backbone.1"] == lrs["backbone.2"] == lrs["other"]
    assert len({lrs["other"] for lrs in rec.lrs}) > 1  # the schedule moved
    if name == "lambda_list":
        assert all(lrs["other/2"] == 0.05 for lrs in rec.lrs)


def test_frozen_batchnorm_untouched_until_unfrozen(tmp_path):
    class TrainEveryEpoch(TinyModel):
        def on_train_epoch_start(self) -> None:
            self.train()

    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(Recorder):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            snapshots.append(state(pl_module))

    model = TrainEveryEpoch(optim="all")
    initial = state(model)
    make_trainer(tmp_path, 3, [GradualUnfreeze(milestones=[2]), Snapshot()]).fit(model, dataloader())
    bn = [f"backbone.{i}.1.{k}" for i in range(3) for k in ("weight", "bias", "running_mean", "running_var")]
    for epoch in (0, 1):
        assert all(torch.equal(initial[k], snapshots[epoch][k]) for k in bn)
    assert all(not torch.equal(initial[k], snapshots[2][k]) for k in bn)


def test_warmup_scales_only_the_step_and_only_new_blocks(tmp_path):
    used: list[dict[str, float]] = []

    class StepLrs(Recorder):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            opt = trainer.optimizers[0]
            opt.register_step_pre_hook(lambda *_: used.append({g["name"]: g["lr"] for g in opt.param_groups}))

    rec = StepLrs()
    callbacks = [GradualUnfreeze(milestones=[1, 2], warmup_steps=3), rec]
    make_trainer(tmp_path, 3, callbacks).fit(TinyModel(lr=0.1), dataloader())
    assert all(lrs == dict.fromkeys(lrs, 0.1) for lrs in rec.lrs)  # restored after every step
    ramp = [0.025, 0.05, 0.075, 0.1]
    assert [u["head.weight" if "head.weight" in u else "other"] for u in used] == [0.1] * 12
    assert [u["backbone.2"] for u in used[4:8]] == pytest.approx(ramp)
    assert [u["backbone.1"] for u in used[8:12]] == pytest.approx(ramp)
    assert [u["backbone.0"] for u in used[8:12]] == pytest.approx(ramp)
    assert [u["backbone.2"] for u in used[8:12]] == [0.1] * 4


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize(
    "kwargs",
    [{"milestones": [2], "warmup_steps": 2}, {"milestones": [3, 6], "unit": "step", "warmup_steps": 3}],
)
def test_resume_matches_uninterrupted_run(tmp_path, kwargs):
    """Checkpoints after epochs 1, 2, 3 of 4 (before, at and after the milestones, mid-warm-up)."""

    def model() -> TinyModel:
        return TinyModel(
            optim="split",
            optimizer="adam",
            lr=0.01,
            scheduler=lambda o: {
                "scheduler": lr_scheduler.LambdaLR(o, [lambda s: 1.0 / (1 + s), lambda s: 0.5]),
                "interval": "step",
            },
        )

    full = model()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    make_trainer(tmp_path, 4, [GradualUnfreeze(**kwargs), ckpt], enable_checkpointing=True).fit(
        full, dataloader()
    )
    for epoch in (0, 1, 2):
        resumed = model()
        make_trainer(tmp_path, 4, [GradualUnfreeze(**kwargs)]).fit(
            resumed, dataloader(), ckpt_path=tmp_path / f"epoch={epoch}.ckpt"
        )
        diff = max(
            (a - b).abs().max().item() for a, b in zip(full.parameters(), resumed.parameters(), strict=True)
        )
        assert diff <= 1e-6, f"resumed after epoch {epoch}: max abs diff {diff}"


def test_state_key_lets_two_instances_coexist(tmp_path):
    callbacks = [GradualUnfreeze(milestones=[0]), GradualUnfreeze(modules="head", milestones=[3])]
    trainer = make_trainer(tmp_path, 2, callbacks)
    trainer.fit(TinyModel(optim="all"), dataloader())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    assert saved[callbacks[0].state_key]["stage"] == 1 and saved[callbacks[1].state_key]["stage"] == 0
    assert saved[callbacks[1].state_key]["blocks"] == [["head._direct"]]


def test_resume_with_different_layer_groups_fails(tmp_path):
    trainer = make_trainer(tmp_path, 1, [GradualUnfreeze(milestones=[1])])
    trainer.fit(TinyModel(), dataloader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = GradualUnfreeze(
        milestones=[1], layer_groups={"low": ["backbone.0"], "high": ["backbone.1", "backbone.2"]}
    )
    with pytest.raises(ValueError, match="layer groups"):
        make_trainer(tmp_path, 2, [other]).fit(TinyModel(), dataloader(), ckpt_path=tmp_path / "a.ckpt")


@pytest.mark.slow
def test_ddp_late_unfrozen_parameters_stay_identical_across_ranks(tmp_path):
    """Two CPU processes, per-rank data, unfrozen after DDP wrapped the model (Lightning #20340).

    The same run without the gradient all-reduce (``--no-sync``) runs alongside and must diverge,
    which shows the comparison can see the bug.
    """
    script = Path(__file__).with_name("ddp_unfreeze_script.py")
    runs = {}
    for variant in ("sync", "no-sync"):
        out = tmp_path / variant
        out.mkdir()
        args = [sys.executable, str(script), str(out)] + (["--no-sync"] if variant == "no-sync" else [])
        runs[variant] = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for proc in runs.values():
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output[-3000:]

    def load(variant: str, rank: int) -> dict[str, Any]:
        return torch.load(tmp_path / variant / f"rank{rank}.pt", weights_only=True)

    r0, r1 = load("sync", 0), load("sync", 1)
    assert r0["final"].keys() == r1["final"].keys() and len(r0["final"]) == 14
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), name
        assert not torch.equal(r0["final"][name], r0["initial"][name]), f"{name} never trained"
    u0, u1 = load("no-sync", 0), load("no-sync", 1)
    diverged = [n for n in u0["final"] if not torch.equal(u0["final"][n], u1["final"][n])]
    assert sorted(diverged) == sorted(n for n in u0["final"] if n.startswith("backbone."))


@pytest.mark.parametrize(
    ("kwargs", "trainer_kwargs", "match"),
    [
        ({"milestones": [1, 3]}, {"max_epochs": 2}, r"milestone 3 \(epoch\) is never reached.*max_epochs=2"),
        ({"milestones": [2]}, {"max_epochs": 5, "max_steps": 6}, r"milestone 2 \(epoch\).*max_steps=6"),
        (
            {"milestones": [8], "unit": "step"},
            {"max_epochs": 2},
            r"milestone 8 \(step\).*\(8 optimizer steps\)",
        ),
    ],
)
def test_milestones_past_the_end_warn_at_fit_start(tmp_path, kwargs, trainer_kwargs, match):
    max_epochs = trainer_kwargs.pop("max_epochs")
    trainer = make_trainer(tmp_path, max_epochs, [GradualUnfreeze(**kwargs)], **trainer_kwargs)
    with pytest.warns(UserWarning, match=match):
        trainer.fit(TinyModel(), dataloader())


def test_reachable_milestones_do_not_warn(tmp_path, recwarn):
    make_trainer(tmp_path, 2, [GradualUnfreeze(milestones=[1])]).fit(TinyModel(), dataloader())
    make_trainer(tmp_path, 2, [GradualUnfreeze(milestones=[7], unit="step")]).fit(TinyModel(), dataloader())
    assert not [w for w in recwarn if "never reached" in str(w.message)]


def test_epoch_milestones_under_a_step_only_budget(tmp_path):
    # max_epochs=-1: Lightning loads no data before fit, so the epoch length is unknown at fit start
    recorder = Recorder()
    trainer = make_trainer(tmp_path, -1, [GradualUnfreeze(milestones=[1]), recorder], max_steps=10)
    trainer.fit(TinyModel(), dataloader())
    assert trainer.global_step == 10
    assert [layer(2) <= trainable for trainable in recorder.trainable] == [False] * 4 + [True] * 6
