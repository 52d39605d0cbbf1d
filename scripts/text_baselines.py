"""Baselines for ``experiment=text_sentiment`` on exactly its split: TF-IDF + logistic regression, and the
frozen encoder's mean-pooled features + logistic regression (the linear probe, ``--probe``).

The split comes from the data module the experiment uses (``RottenTomatoesDataModule``, same
``split_seed``), so the numbers compare with the run's ``test/acc``. The regularisation strength ``C``
is chosen on the validation split, the test split is scored once.

Usage::

    python scripts/text_baselines.py [--probe] [--split-seed 0] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from tl_lightning.backbones import hf_encoder
from tl_lightning.data import RottenTomatoesDataModule
from tl_lightning.run.feature_cache import extract_features

C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def fit_logistic(train: tuple, val: tuple, test: tuple) -> dict:
    """Logistic regression with ``C`` chosen on ``val``; accuracy on every split."""
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=3000).fit(*train)
        score = model.score(*val)
        if best is None or score > best[0]:
            best = (score, c, model)
    val_acc, c, model = best
    return {"C": c, "val_acc": round(val_acc, 4), "test_acc": round(model.score(*test), 4)}


def tfidf_baseline(data: RottenTomatoesDataModule) -> dict:
    """Word 1-2-grams, sublinear TF, fitted on the training texts only."""
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    splits = (data.train_set, data.val_set, data.test_set)
    x_train = vectorizer.fit_transform(splits[0].texts)
    xs = [x_train, *(vectorizer.transform(s.texts) for s in splits[1:])]
    return fit_logistic(*((x, s.labels.numpy()) for x, s in zip(xs, splits, strict=True)))


def probe_baseline(data: RottenTomatoesDataModule, batch_size: int = 64) -> dict:
    """The pretrained encoder, frozen, as the run tokenises; logistic regression on its features."""
    backbone = hf_encoder()
    splits = [
        extract_features(backbone, s, batch_size, collate=data.collate_fn)
        for s in (data.train_set, data.val_set, data.test_set)
    ]
    return fit_logistic(*((f.tensors[0].numpy(), f.tensors[1].numpy()) for f in splits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--probe", action="store_true", help="also the frozen-encoder linear probe (minutes)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    data = RottenTomatoesDataModule(hf_encoder(pretrained=False).data_config, split_seed=args.split_seed)
    data.setup("fit")
    results = {"split": {s: len(getattr(data, f"{s}_set")) for s in ("train", "val", "test")}}
    started = time.perf_counter()
    results["tfidf_logreg"] = tfidf_baseline(data) | {"seconds": round(time.perf_counter() - started, 1)}
    if args.probe:
        started = time.perf_counter()
        results["minilm_probe"] = probe_baseline(data) | {"seconds": round(time.perf_counter() - started, 1)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
