"""LayerwiseLR: per-layer-group factors that every torch scheduler respects, resume-safe."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from callback_helpers import Recorder, TinyModel, dataloader, make_trainer, timm_cosine
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.optim import lr_scheduler

from tl_lightning.callbacks import GradualUnfreeze, LayerwiseLR

FACTORS = {"other": 1.0, "backbone.0": 0.125, "backbone.1": 0.25, "backbone.2": 0.5}

SCHEDULERS = {
    "one_cycle": lambda o: {
        "scheduler": lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=12),
        "interval": "step",
    },
    "plateau": lambda o: {
        "scheduler": lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=10.0, min_lr=1e-3),
        "monitor": "train_loss",
    },
    "lambda": lambda o: {"scheduler": lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)), "interval": "step"},
    "warmup_cosine": lambda o: {
        "scheduler": lr_scheduler.SequentialLR(
            o,
            [lr_scheduler.LinearLR(o, 0.1, total_iters=3), lr_scheduler.CosineAnnealingLR(o, T_max=9)],
            milestones=[3],
        ),
        "interval": "step",
    },
    "step": lambda o: {"scheduler": lr_scheduler.StepLR(o, step_size=2, gamma=0.5), "interval": "step"},
    "cyclic": lambda o: {
        "scheduler": lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.2, step_size_up=3),
        "interval": "step",
    },
    "timm_cosine": timm_cosine,
}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 0}, r"in \(0, 1\]"),
        ({"decay": 1.5}, r"in \(0, 1\]"),
        ({"lrs": {"backbone.0": -1}}, ">= 0"),
        ({"lrs": {"backbone.(": 0.1}}, "not a valid regex"),
        ({"layer_groups": {"low": []}}, r"`layer_groups\['low'\]` must be a non-empty list"),
        ({"layer_groups": ["backbone.0"]}, "must be None or a non-empty mapping"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerwiseLR(**kwargs)


def test_lrs_key_matching_no_group_fails_in_setup(tmp_path):
    with pytest.raises(ValueError, match=r"'blocks.*' matches no layer group.*'backbone.0'"):
        make_trainer(tmp_path, 1, [LayerwiseLR(lrs={r"blocks\.\d": 0.1})]).fit(
            TinyModel(optim="all"), dataloader()
        )


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_yields_the_scaled_schedule(tmp_path, name):
    """Single-group optimizer built by the module; each group's lr = reference lr * factor, every step."""
    reference = Recorder()
    make_trainer(tmp_path, 3, [reference]).fit(
        TinyModel(optim="all", scheduler=SCHEDULERS[name]), dataloader()
    )
    scaled = Recorder()
    make_trainer(tmp_path, 3, [LayerwiseLR(), scaled]).fit(
        TinyModel(optim="all", scheduler=SCHEDULERS[name]), dataloader()
    )
    assert len(scaled.lrs) == len(reference.lrs) == 12
    assert len({ref["other"] for ref in reference.lrs}) > 1  # the schedule moves
    for ref, lrs in zip(reference.lrs, scaled.lrs, strict=True):
        assert lrs == pytest.approx({group: ref["other"] * f for group, f in FACTORS.items()}, rel=1e-9)


def test_explicit_factors_override_decay(tmp_path):
    rec = Recorder()
    callback = LayerwiseLR(decay=0.9, lrs={r"backbone\.[01]": 0.0, "backbone.0": 1.0})
    make_trainer(tmp_path, 1, [callback, rec], max_steps=1).fit(TinyModel(optim="all", lr=0.1), dataloader())
    assert rec.lrs[0] == pytest.approx(
        {"other": 0.1, "backbone.0": 0.0, "backbone.1": 0.0, "backbone.2": 0.09}
    )


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, metrics))


def test_logs_every_group_under_a_readable_name(tmp_path):
    logger = MemoryLogger()
    trainer = make_trainer(
        tmp_path, 1, [LayerwiseLR()], logger=logger, log_every_n_steps=2, accumulate_grad_batches=2
    )
    trainer.fit(TinyModel(optim="all", lr=0.1), dataloader(n=64))  # 8 batches, 4 optimizer steps
    rows = [(step, m) for step, m in logger.rows if any(k.startswith("lr/") for k in m)]
    assert [step for step, _ in rows] == [0, 2]
    assert rows[0][1] == pytest.approx({f"lr/{group}": 0.1 * f for group, f in FACTORS.items()})


def test_composes_with_gradual_unfreeze_in_either_order(tmp_path):
    results = []
    for order in (1, -1):
        model = TinyModel(optim="trainable", scheduler=SCHEDULERS["one_cycle"])
        rec = Recorder()
        callbacks = [LayerwiseLR(), GradualUnfreeze(milestones=[1, 2], warmup_steps=2)][::order]
        make_trainer(tmp_path, 3, [*callbacks, rec]).fit(model, dataloader())
        results.append((rec.lrs, [p.detach().clone() for p in model.parameters()]))
    (lrs_a, params_a), (lrs_b, params_b) = results
    assert lrs_a == lrs_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))
    for lrs in lrs_a:
        assert lrs == pytest.approx({group: lrs["other"] * f for group, f in FACTORS.items()}, rel=1e-9)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_matches_uninterrupted_run(tmp_path):
    def model() -> TinyModel:
        return TinyModel(optim="trainable", optimizer="adam", lr=0.01, scheduler=SCHEDULERS["one_cycle"])

    full, full_rec = model(), Recorder()
    callbacks: list[Any] = [LayerwiseLR(), GradualUnfreeze(milestones=[1]), full_rec]
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    make_trainer(tmp_path, 3, [*callbacks, ckpt], enable_checkpointing=True).fit(full, dataloader())
    resumed, rec = model(), Recorder()
    make_trainer(tmp_path, 3, [LayerwiseLR(), GradualUnfreeze(milestones=[1]), rec]).fit(
        resumed, dataloader(), ckpt_path=tmp_path / "epoch=0.ckpt"
    )
    assert rec.lrs == full_rec.lrs[4:]  # scaled once, not twice
    diff = max(
        (a - b).abs().max().item() for a, b in zip(full.parameters(), resumed.parameters(), strict=True)
    )
    assert diff <= 1e-6


def test_timm_warm_up_starts_at_its_scalar_floor_and_ends_at_the_scaled_lr(tmp_path):
    """With ``warmup_lr_init > 0`` the warm-up starts at the unscaled floor; then lr = ref * factor."""
    reference = Recorder()
    make_trainer(tmp_path, 3, [reference]).fit(
        TinyModel(optim="all", scheduler=lambda o: timm_cosine(o, warmup_lr_init=1e-3)), dataloader()
    )
    scaled = Recorder()
    make_trainer(tmp_path, 3, [LayerwiseLR(), scaled]).fit(
        TinyModel(optim="all", scheduler=lambda o: timm_cosine(o, warmup_lr_init=1e-3)), dataloader()
    )
    for ref, lrs in zip(reference.lrs[3:], scaled.lrs[3:], strict=True):
        assert lrs == pytest.approx({group: ref["other"] * f for group, f in FACTORS.items()}, rel=1e-9)
    for group in FACTORS:
        ramp = [lrs[group] for lrs in scaled.lrs[1:4]]
        assert 1e-3 < ramp[0] < ramp[1] < ramp[2]
