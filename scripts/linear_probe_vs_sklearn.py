"""Converged linear probe vs scikit-learn's LogisticRegression on the same cached features.

Builds the backbone and data module of the composed config (Hydra overrides as arguments), caches the
features of every split (``feature_cache=disk`` reuses them), then fits both with the same ``l2`` grid
(scikit-learn's ``C = 1 / (l2 * n_train)``) and the same choice rule on the validation split, and
prints one JSON line: validation/test accuracy, chosen ``l2`` and fit time of each.

Example::

    python scripts/linear_probe_vs_sklearn.py backbone=efficientnet_lite0 data=digits
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression

from tl_lightning.callbacks.linear_probe import DEFAULT_L2_GRID, accuracy_and_loss, select_l2
from tl_lightning.run.feature_cache import CachedFeatureDataModule

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def cached_splits(overrides: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (float64 features, labels)}`` of the configured backbone and data."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    backbone = instantiate(cfg.backbone)
    data = instantiate(cfg.data, data_config=backbone.data_config)
    cache_dir = Path(cfg.paths.cache_dir) / "features"
    cached = CachedFeatureDataModule(
        data, backbone, cache_dir, OmegaConf.to_container(cfg.backbone, resolve=True)
    )
    sets = {split: cached.features(split) for split in ("train", "val", "test")}
    return {name: (s.tensors[0].double().flatten(1), s.tensors[1]) for name, s in sets.items()}


def probe(splits: dict, grid: list[float]) -> dict:
    started = time.perf_counter()
    l2, fit, _ = select_l2(splits["train"], splits["val"], int(splits["train"][1].max()) + 1, grid)
    seconds = time.perf_counter() - started
    val, _ = accuracy_and_loss(*splits["val"], fit.weight, fit.bias)
    test, _ = accuracy_and_loss(*splits["test"], fit.weight, fit.bias)
    return {"l2": l2, "val_acc": val, "test_acc": test, "fit_s": round(seconds, 2)}


def sklearn(splits: dict, grid: list[float]) -> dict:
    (x, y), (xv, yv), (xt, yt) = ((a.numpy(), b.numpy()) for a, b in splits.values())
    started = time.perf_counter()
    best = None
    for l2 in sorted(grid, reverse=True):
        model = LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=5000).fit(x, y)
        weight, bias = torch.tensor(model.coef_), torch.tensor(model.intercept_)
        acc, loss = accuracy_and_loss(*splits["val"], weight, bias)
        if best is None or (acc, -loss) > best[0]:
            best = ((acc, -loss), l2, model)
    seconds = time.perf_counter() - started
    _, l2, model = best
    return {
        "l2": l2,
        "val_acc": model.score(xv, yv),
        "test_acc": model.score(xt, yt),
        "fit_s": round(seconds, 2),
    }


def main(overrides: list[str]) -> None:
    splits = cached_splits(overrides)
    grid = list(DEFAULT_L2_GRID)
    sizes = {name: len(labels) for name, (_, labels) in splits.items()}
    print(
        json.dumps(
            {
                "overrides": overrides,
                "sizes": sizes,
                "probe": probe(splits, grid),
                "sklearn": sklearn(splits, grid),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
