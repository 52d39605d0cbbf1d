"""Rank candidate (backbone, cut) pairs for a dataset with LogME, LEEP and NCE, before any fine-tuning.

Each candidate is ``<backbone config>`` or ``<backbone config>@<layer group>`` (``backbone.cut_at``).
Everything after the options is a Hydra override of the composed ``train`` config (the data, its size,
``paths``), shared by every candidate. The features of the training split are computed once per
candidate and cached on disk under ``paths.cache_dir/features`` with the same key a training run with
``feature_cache=disk`` uses. LEEP and NCE need the backbone's source head (its ImageNet classifier):
after a cut it is dropped, and they are reported as missing (``-``).

Prints a Markdown table, one row per candidate, in the order given; ``--csv`` also writes the rows to a
CSV file (a missing score is an empty cell), which ``scripts/transferability_check.py`` reads.

Example::

    python scripts/transferability.py -c efficientnet_lite0 -c efficientnet_lite0@blocks.4 \\
        data=digits data.image_size=32 data.train_per_class=40
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tl_lightning.analysis.transferability import leep, logme, nce
from tl_lightning.run.feature_cache import extract_features

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
COLUMNS = ("candidate", "feature dim", "train samples", "LogME", "LEEP", "NCE", "seconds")


def candidate_overrides(candidate: str) -> list[str]:
    """``backbone=<name>`` and, for ``<name>@<group>``, ``backbone.cut_at=<group>``."""
    name, _, cut_at = candidate.partition("@")
    return [f"backbone={name}"] + ([f"backbone.cut_at={cut_at}"] if cut_at else [])


def score(candidate: str, overrides: list[str]) -> dict:
    """Scores of one candidate on the training split of the configured data."""
    started = time.perf_counter()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *candidate_overrides(candidate)])
    backbone = instantiate(cfg.backbone)
    data = instantiate(cfg.data, data_config=backbone.data_config)
    data.setup("fit")
    # the same key as CachedFeatureDataModule's, so training runs and this script share the cache
    config = {
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "data_config": data.data_config.as_dict(),
    }
    cache_dir = Path(cfg.paths.cache_dir) / "features"
    features, labels = extract_features(
        backbone, data.train_set, data.batch_size, cache_dir, config=config
    ).tensors
    row = {"candidate": candidate, "feature dim": features.shape[1], "train samples": len(labels)}
    row["LogME"] = logme(features, labels)
    source_head = backbone.pop_source_head()
    if source_head is not None:
        with torch.no_grad():
            probabilities = torch.softmax(source_head(features).double(), dim=1)
        row["LEEP"] = leep(probabilities, labels)
        row["NCE"] = nce(probabilities.argmax(1), labels)
    row["seconds"] = time.perf_counter() - started
    return row


def markdown_table(rows: list[dict]) -> str:
    """One line per row; scores with 4 decimals, a missing score as ``-``."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    """The rows as CSV with the table's columns; a missing score is an empty cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{column: row.get(column) for column in COLUMNS} for row in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-c",
        "--candidate",
        action="append",
        required=True,
        help="<backbone config>[@<layer group>], e.g. efficientnet_lite1@blocks.4; repeat for each candidate",
    )
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides shared by every candidate, e.g. data=digits"
    )
    args = parser.parse_args(argv)
    rows = [score(candidate, args.overrides) for candidate in args.candidate]
    print(markdown_table(rows))
    if args.csv is not None:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
