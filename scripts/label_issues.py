"""Find label issues in the training split before fine-tuning: ``python scripts/label_issues.py <overrides>``.

Composes the same config as ``train.py`` (``conf/label_issues.yaml`` adds the ``label_issues`` node to
``conf/train.yaml``), so any data and backbone overrides of a training run apply. Steps:

1. the frozen backbone's features of the training and validation splits, from the feature cache
   (``paths.cache_dir/features``, the key a ``feature_cache=disk`` training run uses), always without
   augmentation (``data.augment`` is ignored);
2. out-of-fold class probabilities: ``label_issues.folds`` converged linear probes (the
   ``linear_probe_lbfgs`` fit: L-BFGS logistic regression, L2 chosen on the validation split), each
   scoring the fold it did not see;
3. cleanlab's confident learning on them;
4. into the run directory: ``label_issues.csv`` (what ``data.exclude`` reads), ``top_flagged.png``
   (images) or ``top_flagged.md`` (texts), ``noise_matrix.png``, ``feature_map.png`` and
   ``label_issues.json`` (the summary line, counts, timings; with ``data.label_noise``, the detection
   precision and recall against the planted truth).

Only the training split is scored; nothing is deleted. Example::

    python scripts/label_issues.py data=fashion_mnist data.train_per_class=200
    python train.py data=fashion_mnist data.train_per_class=200 \
        data.exclude=outputs/label_issues/<run>/label_issues.csv
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tl_lightning.analysis.label_quality import (
    detection_scores,
    find_label_issues,
    out_of_fold_probabilities,
    write_label_issues,
)
from tl_lightning.analysis.label_quality_plots import (
    contact_sheet,
    feature_map,
    markdown_sheet,
    noise_heatmap,
)
from tl_lightning.callbacks.linear_probe import select_l2
from tl_lightning.data.base import ClassificationDataModule
from tl_lightning.run.feature_cache import CachedFeatureDataModule

log = logging.getLogger(__name__)


def probe_fit(
    val: tuple[torch.Tensor, torch.Tensor], num_classes: int, l2_grid, tolerance: float, chosen: list
):
    """``fit(features, labels)`` for :func:`out_of_fold_probabilities`: a converged probe whose L2 is chosen
    on ``val`` (the validation split, never the scored fold); each chosen L2 is appended to ``chosen``."""

    def fit(features: torch.Tensor, labels: torch.Tensor):
        l2, solution, _ = select_l2((features, labels), val, num_classes, l2_grid, tolerance=tolerance)
        chosen.append(l2)
        return lambda x: torch.softmax(x @ solution.weight.T + solution.bias, dim=1)

    return fit


def frozen_features(
    cfg: DictConfig, split_names: tuple[str, ...] = ("train", "val")
) -> tuple[ClassificationDataModule, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The data module of ``cfg`` (set up) and float64 ``(features, labels)`` of the named splits.

    Raises:
        ValueError: If ``data.exclude`` is set (the scan scores the whole training split), or the data
            module has no curated training split (multi-task or domain-pair data).
    """
    if OmegaConf.select(cfg, "data.exclude") is not None:
        raise ValueError(
            "label_issues.py scores the whole training split: remove data.exclude / data.exclude_top"
        )
    backbone = instantiate(cfg.backbone)
    # features for scoring are never augmented: the training split is read with evaluation transforms
    # whatever data.augment says, so the overrides of the training run apply unchanged
    deterministic = {"augment": False} if "augment" in cfg.data else {}
    data = instantiate(cfg.data, data_config=backbone.data_config, **deterministic)
    data.setup("fit")
    if getattr(data, "curated", None) is None:
        raise ValueError(
            f"data {cfg.data._target_} has no single training split to score (multi-task or domain pair?)"
        )
    cache_dir = None if cfg.feature_cache == "off" else Path(cfg.paths.cache_dir) / "features"
    cached = CachedFeatureDataModule(
        data, backbone, cache_dir, OmegaConf.to_container(cfg.backbone, resolve=True)
    )
    splits = {s: cached.features(s).tensors for s in split_names}
    return data, {s: (x.double().flatten(1), y.long()) for s, (x, y) in splits.items()}


def scan(cfg: DictConfig) -> dict:
    """Score the training split of ``cfg``'s data and write the outputs into ``paths.output_dir``.

    Returns:
        The contents of ``label_issues.json``.
    """
    started = time.perf_counter()
    options = cfg.label_issues
    data, splits = frozen_features(cfg)
    features_s = time.perf_counter() - started
    (features, given), names = splits["train"], data.class_names
    chosen: list[float] = []
    fit = probe_fit(splits["val"], len(names), list(options.l2_grid), options.tolerance, chosen)
    probabilities = out_of_fold_probabilities(
        features, given, len(names), fit, options.folds, options.fold_seed
    )
    issues = find_label_issues(given.numpy(), probabilities, names)
    out = Path(cfg.paths.output_dir)
    noisy = data.curated.summary.get("label_noise") is not None
    true = data.curated.true_labels
    write_label_issues(out / "label_issues.csv", issues, data.curated.rows, true if noisy else None)
    shown = _show(data, issues, out, options.show)
    noise_heatmap(issues.joint, names, issues.summary(), out / "noise_matrix.png")
    if options.feature_map:
        feature_map(features, issues.given, issues.flagged, names, out / "feature_map.png", options.fold_seed)
    result = {
        "summary": issues.summary(),
        "train_examples": len(given),
        "flagged": int(issues.flagged.sum()),
        "folds": options.folds,
        "l2_per_fold": chosen,
        "out_of_fold_accuracy": float((issues.suggested == issues.given).mean()),
        "label_noise": data.curated.summary.get("label_noise"),
        "detection": detection_scores(issues.flagged, issues.given, true) if noisy else None,
        "shown": shown,
        "features_s": round(features_s, 2),
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    (out / "label_issues.json").write_text(json.dumps(result, indent=2))
    log.info("%s; written to %s", result["summary"], out)
    return result


def _show(data: ClassificationDataModule, issues, out: Path, count: int) -> str:
    """The top ``count`` flagged examples: a contact sheet of images, or a Markdown table of texts."""
    order = [int(i) for i in np.argsort(-issues.score, kind="stable") if issues.flagged[i]][:count]
    if not order:
        return ""
    names = issues.class_names
    titles = [f"{names[issues.given[i]]} -> {names[issues.suggested[i]]}" for i in order]
    texts = getattr(data.train_set, "texts", None)
    if texts is not None:
        table = markdown_sheet(
            [texts[i] for i in order],
            [names[issues.given[i]] for i in order],
            [names[issues.suggested[i]] for i in order],
            [issues.score[i] for i in order],
            order,
        )
        path = out / "top_flagged.md"
        path.write_text(table)
        return path.name
    mean = torch.tensor(data.data_config.mean).view(3, 1, 1)
    std = torch.tensor(data.data_config.std).view(3, 1, 1)
    images = [data.train_set[i][0] * std + mean for i in order]
    return contact_sheet(images, titles, out / "top_flagged.png").name


@hydra.main(version_base="1.3", config_path="../conf", config_name="label_issues")
def main(cfg: DictConfig) -> None:
    scan(cfg)


if __name__ == "__main__":
    main()
