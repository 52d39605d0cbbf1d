"""ConvergedLinearProbe: the head holds the optimum of the probe objective and matches scikit-learn.

Reference: scikit-learn's ``LogisticRegression`` (lbfgs, tight tolerance) on the very features the
head receives, with the same grid (``C = 1 / (l2 * n_train)``) and the same choice rule on the
validation split; and the gradient of the objective recomputed by autograd at the head's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.callbacks import ConvergedLinearProbe, Freeze
from tl_lightning.callbacks.linear_probe import accuracy_and_loss, fit_logistic, probe_objective
from tl_lightning.run.pipeline import train

GRID = [1e-5, 1e-4, 1e-3, 1e-2]


class ProbeModel(pl.LightningModule):
    """A frozen random ReLU projection of digit pixels (``features``) and a linear ``classifier``.

    Trained with AdamW (lr 1, weight decay 0.5): anything that reached the head would move it.
    """

    def __init__(self, head: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(64, 48), nn.ReLU())
        self.classifier = head if head is not None else nn.Linear(48, 10)
        self.scores: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def _score(self, batch, stage: str) -> None:
        x, y = batch
        self.log(f"{stage}/acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True, batch_size=len(y))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._score(batch, "test")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1.0, weight_decay=0.5)


def _digits_loaders() -> dict[str, DataLoader]:
    """Stratified 60/20/20 split of scikit-learn's digits, pixels in [0, 1]; training batches shuffled."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = torch.tensor(x[order] / 16.0, dtype=torch.float32), torch.tensor(y[order])
    cut = [int(0.6 * len(y)), int(0.8 * len(y))]
    splits = zip(("train", "val", "test"), np.split(np.arange(len(y)), cut), strict=True)
    return {
        name: DataLoader(TensorDataset(x[idx], y[idx]), batch_size=64, shuffle=name == "train")
        for name, idx in splits
    }


def _features(model: ProbeModel, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    x, y = loader.dataset.tensors
    with torch.no_grad():
        return model.features(x).double().numpy(), y.numpy()


def _trainer(max_epochs: int = 1, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _sklearn_choice(train, val) -> tuple[float, LogisticRegression]:
    """Same grid and rule as the callback: best val accuracy, then lower val loss, then stronger l2."""
    best = None
    for l2 in sorted(GRID, reverse=True):
        model = LogisticRegression(C=1.0 / (l2 * len(train[1])), tol=1e-10, max_iter=10_000).fit(*train)
        weight, bias = torch.tensor(model.coef_), torch.tensor(model.intercept_)
        acc, loss = accuracy_and_loss(torch.tensor(val[0]), torch.tensor(val[1]), weight, bias)
        if best is None or (acc, -loss) > best[0]:
            best = ((acc, -loss), l2, model)
    return best[1], best[2]


@pytest.fixture(scope="module")
def fitted():
    """A one-epoch fit with the probe, and scikit-learn's choice on the same features."""
    loaders = _digits_loaders()
    model = ProbeModel()
    probe = ConvergedLinearProbe(head="classifier", l2_grid=GRID)
    trainer = _trainer(callbacks=[Freeze(modules="features"), probe])
    trainer.fit(model, loaders["train"], loaders["val"])
    splits = {name: _features(model, loader) for name, loader in loaders.items()}
    l2, reference = _sklearn_choice(splits["train"], splits["val"])
    return model, probe, trainer, loaders, splits, l2, reference


def test_probe_reaches_sklearn_logistic_regression_on_the_same_features(fitted):
    model, probe, trainer, loaders, splits, l2, reference = fitted
    assert probe.results["l2"] == l2
    assert probe.results["sklearn_C"] == pytest.approx(1.0 / (l2 * len(splits["train"][1])))
    val = trainer.validate(model, loaders["val"], verbose=False)[0]["val/acc"]
    test = trainer.test(model, loaders["test"], verbose=False)[0]["test/acc"]
    assert val >= reference.score(*splits["val"]) - 1e-6
    assert test >= reference.score(*splits["test"]) - 1e-6
    weight = model.classifier.weight.detach().double()
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=2e-3)


def test_head_holds_the_optimum_after_training(fitted):
    model, probe, _, _, splits, l2, reference = fitted
    x, y = (torch.tensor(a) for a in splits["train"])
    # the float32 head, evaluated in float64: the gradient of the objective there is ~0
    weight = model.classifier.weight.detach().double().requires_grad_()
    bias = model.classifier.bias.detach().double().requires_grad_()
    objective = probe_objective(x, y, weight, bias, l2)
    grads = torch.autograd.grad(objective, [weight, bias])
    assert max(float(g.abs().max()) for g in grads) < 1e-5
    chosen = next(row for row in probe.results["grid"] if row["l2"] == l2)
    assert chosen["grad_max"] <= 1e-8  # the float64 solution before it was written into the head
    sklearn_objective = probe_objective(
        x, y, torch.tensor(reference.coef_), torch.tensor(reference.intercept_), l2
    )
    assert chosen["objective"] <= float(sklearn_objective) + 1e-9


def test_training_leaves_the_fitted_head_unchanged():
    loaders = _digits_loaders()
    fitted_heads = []

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            fitted_heads.append(pl_module.classifier.weight.detach().clone())

    model = ProbeModel()
    callbacks = [
        Freeze(modules="features"),
        ConvergedLinearProbe(head="classifier", l2_grid=[1e-3]),
        Record(),
    ]
    trainer = _trainer(callbacks=callbacks, max_epochs=2)
    trainer.fit(model, loaders["train"], loaders["val"])
    assert trainer.global_step == 2 * len(loaders["train"])  # the optimizer stepped, the head did not move
    assert torch.equal(model.classifier.weight, fitted_heads[0])


def test_fit_is_reproducible():
    loaders = _digits_loaders()
    heads = []
    for _ in range(2):
        model = ProbeModel()
        probe = ConvergedLinearProbe(head="classifier", l2_grid=[1e-3, 1e-2])
        _trainer(callbacks=[Freeze(modules="features"), probe]).fit(model, loaders["train"], loaders["val"])
        heads.append(model.classifier.weight.detach())
    assert torch.equal(heads[0], heads[1])


def test_float32_fit_agrees_with_float64(fitted):
    _, _, _, _, splits, l2, _ = fitted
    x, y = (torch.tensor(a) for a in splits["train"])
    exact = fit_logistic(x, y, 10, l2)
    single = fit_logistic(x.float(), y, 10, l2, tolerance=1e-5)
    # float32 stops where the loss no longer changes in single precision: ~1e-4 of the objective
    assert single.objective == pytest.approx(exact.objective, rel=5e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"l2_grid": []}, "`l2_grid` must be a non-empty list"),
        ({"l2_grid": [1e-3, 0.0]}, "finite values > 0"),
        ({"dtype": "float16"}, r"\['float32', 'float64'\]"),
        ({"max_iter": 0}, "`max_iter` must be >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvergedLinearProbe(**kwargs)


def test_missing_or_non_linear_head_or_trainable_features_fail_clearly():
    loaders = _digits_loaders()
    with pytest.raises(AttributeError, match=r"head='heads.target'.*'features', 'classifier'"):
        _trainer(callbacks=[ConvergedLinearProbe()]).fit(ProbeModel(), loaders["train"], loaders["val"])
    mlp = nn.Sequential(nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(TypeError, match="needs an nn.Linear, got Sequential"):
        probe = ConvergedLinearProbe(head="classifier")
        _trainer(callbacks=[probe]).fit(ProbeModel(mlp), loaders["train"], loaders["val"])
    with pytest.raises(ValueError, match=r"features\.0\.weight.*Freeze\(modules='backbone'\)"):
        probe = ConvergedLinearProbe(head="classifier")
        _trainer(callbacks=[probe]).fit(ProbeModel(), loaders["train"], loaders["val"])


def test_pipeline_strategy_scores_the_probe_in_metrics_json(make_cfg):
    cfg = make_cfg(
        "strategy=linear_probe_lbfgs",
        "backbone=small_cnn",
        "trainer.max_epochs=1",
        "~trainer.limit_train_batches",
        "~trainer.limit_val_batches",
        "~trainer.limit_test_batches",
        "callbacks.converged_probe.l2_grid=[1e-4,1e-2]",
    )
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["strategy"] == "linear_probe_lbfgs" and metrics["feature_cache"] == "memory"
    assert metrics["epochs"] == 1 and metrics["params"]["trainable"] == 10 * 64 + 10
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True)
    probe_state = next(v for k, v in checkpoint["callbacks"].items() if "ConvergedLinearProbe" in k)
    chosen = next(row for row in probe_state["results"]["grid"] if row["l2"] == probe_state["results"]["l2"])
    # the validation the pipeline logged is the fitted probe's (float32 head vs float64 fit)
    assert metrics["final"]["val/acc"] == pytest.approx(chosen["val_acc"], abs=1.5 / 360)
    assert metrics["test"]["test/acc"] > 0.5
