"""LogME, LEEP and NCE against small cases computed independently: loops, closed forms, an optimiser;
the rank agreement of a score with fine-tuned accuracy against hand-counted pairs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file
from scipy.optimize import minimize

from tl_lightning.analysis.transferability import leep, logme, nce, rank_agreement
from tl_lightning.backbones import efficientnet_lite0
from tl_lightning.run.feature_cache import CachedFeatureDataModule

LABELS = torch.tensor([0, 0, 1, 1, 2, 1])
# softmax outputs of a 3-class source head on 6 target samples
THETA = torch.tensor(
    [
        [0.7, 0.2, 0.1],
        [0.6, 0.3, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.2, 0.6],
        [0.1, 0.1, 0.8],
        [0.3, 0.4, 0.3],
    ],
    dtype=torch.float64,
)


def test_leep_matches_explicit_loops():
    n, z_count = THETA.shape
    rows = THETA.tolist()
    joint = [
        [sum(rows[i][z] for i in range(n) if LABELS[i] == y) / n for z in range(z_count)] for y in range(3)
    ]
    marginal = [sum(joint[y][z] for y in range(3)) for z in range(z_count)]
    expected = 0.0
    for i in range(n):
        y = int(LABELS[i])
        expected += math.log(sum(joint[y][z] / marginal[z] * rows[i][z] for z in range(z_count)))
    expected /= n
    assert leep(THETA, LABELS) == pytest.approx(expected, rel=1e-12)
    assert leep(THETA, LABELS) < 0


def test_leep_of_a_source_that_already_predicts_the_target_is_zero():
    assert leep(torch.eye(3)[LABELS], LABELS) == pytest.approx(0.0, abs=1e-12)


def test_nce_matches_hand_computed_entropy():
    # source z: 0 0 0 1 1 2 ; target y: 0 0 1 1 2 1
    # z=0 (p=1/2): y = 0,0,1 -> H = -(2/3 log 2/3 + 1/3 log 1/3)
    # z=1 (p=1/3): y = 1,2 -> H = log 2;  z=2 (p=1/6): y = 1 -> H = 0
    source = torch.tensor([0, 0, 0, 1, 1, 2])
    expected = -(0.5 * -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) + 1 / 3 * math.log(2))
    assert nce(source, LABELS) == pytest.approx(expected, rel=1e-12)
    assert nce(source, LABELS) < 0


def test_nce_is_zero_when_the_source_label_determines_the_target():
    source = torch.tensor([5, 5, 3, 3, 0, 7])  # 3 and 7 both map to target 1: still determined
    assert nce(source, LABELS) == pytest.approx(0.0, abs=1e-15)
    assert nce(torch.zeros(6, dtype=torch.long), LABELS) < nce(source, LABELS)


def _log_marginal_likelihood(f: np.ndarray, y: np.ndarray, alpha: float, noise: float) -> float:
    """log N(y; 0, F F^T / alpha + noise I): the evidence from its definition, with the n x n covariance.

    ``noise = 1 / beta`` may be 0, the limit the maximum approaches when the features fit ``y`` exactly.
    """
    n = len(y)
    covariance = f @ f.T / alpha + noise * np.eye(n)
    return (
        -n / 2 * math.log(2 * math.pi)
        - np.linalg.slogdet(covariance)[1] / 2
        - y @ np.linalg.solve(covariance, y) / 2
    )


def _brute_force_logme(f: np.ndarray, labels: np.ndarray) -> float:
    per_class = []
    for k in np.unique(labels):
        y = (labels == k).astype(float)
        starts = [[0.0, 1.0], [2.0, 0.1], [-2.0, 0.01]]
        best = min(
            (
                minimize(
                    lambda p, y=y: -_log_marginal_likelihood(f, y, math.exp(p[0]), p[1] ** 2),
                    x0=x0,
                    method="Nelder-Mead",
                    options={"xatol": 1e-12, "fatol": 1e-14, "maxiter": 40000},
                )
                for x0 in starts
            ),
            key=lambda result: result.fun,
        )
        per_class.append(-best.fun / len(y))
    return sum(per_class) / len(per_class)


@pytest.mark.parametrize("shape", [(6, 2), (5, 8)], ids=["n>D", "n<D"])
def test_logme_is_the_maximum_evidence_found_by_a_direct_optimiser(shape):
    rng = np.random.default_rng(0)
    f = rng.normal(size=shape)
    labels = np.arange(shape[0]) % 3
    expected = _brute_force_logme(f, labels)
    assert logme(torch.from_numpy(f), torch.from_numpy(labels)) == pytest.approx(expected, abs=1e-7)


def test_logme_prefers_features_that_separate_the_classes():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 4
    noise = torch.randn(120, 16, generator=generator)
    separating = noise * 0.3 + 3 * torch.eye(4, 16)[labels]
    assert logme(separating, labels) > logme(noise, labels) + 0.5


def test_logme_ignores_absent_class_indices():
    f = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    assert logme(f, LABELS + 2) == pytest.approx(logme(f, LABELS), rel=1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: leep(THETA * 2, LABELS), "rows summing to 1"),
        (lambda: leep(THETA, LABELS[:5]), "6 entries"),
        (lambda: nce(torch.tensor([0, 1]), torch.tensor([0.0, 1.0])), "integer class indices"),
        (lambda: logme(torch.randn(3, 2), torch.tensor([0, -1, 1])), ">= 0"),
        (lambda: logme(torch.randn(0, 2), torch.tensor([], dtype=torch.long)), "empty"),
    ],
)
def test_bad_inputs_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _load_script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "transferability.py"
    spec = importlib.util.spec_from_file_location("tl_transferability_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_script_scores_candidates_on_cached_features_and_drops_leep_nce_after_a_cut(tmp_path, capsys):
    script = _load_script()
    overrides = ["data=digits", "data.image_size=32", "data.train_per_class=3", f"paths.cache_dir={tmp_path}"]
    script.main(["-c", "efficientnet_lite0", "-c", "efficientnet_lite0@blocks.2", *overrides])
    header, _, full, cut = capsys.readouterr().out.strip().splitlines()
    assert header.split(" | ")[3:6] == ["LogME", "LEEP", "NCE"]
    full, cut = full.strip("| ").split(" | "), cut.strip("| ").split(" | ")
    assert full[:3] == ["efficientnet_lite0", "1280", "30"] and cut[:3] == [
        "efficientnet_lite0@blocks.2",
        "40",
        "30",
    ]
    assert float(full[4]) <= 0 and float(full[5]) <= 0 and cut[4:6] == ["-", "-"]
    cached = sorted((tmp_path / "features").glob("*.safetensors"))
    assert len(cached) == 2  # one training split per candidate

    # the row holds the scores of the cached features
    stored = [load_file(path) for path in cached]
    features, labels = next((s["features"], s["labels"]) for s in stored if s["features"].shape[1] == 1280)
    probabilities = torch.softmax(efficientnet_lite0().pop_source_head()(features).double(), dim=1)
    assert f"{logme(features, labels):.4f}" == full[3] and f"{leep(probabilities, labels):.4f}" == full[4]
    assert f"{nce(probabilities.argmax(1), labels):.4f}" == full[5]

    # a training run with feature_cache=disk computes the same key: only val and test are new files
    with initialize_config_dir(config_dir=script.CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "backbone=efficientnet_lite0"])
    backbone = instantiate(cfg.backbone)
    data = instantiate(cfg.data, data_config=backbone.data_config)
    container = OmegaConf.to_container(cfg.backbone, resolve=True)
    cached = CachedFeatureDataModule(data, backbone, tmp_path / "features", container)
    for split in ("train", "val", "test"):
        cached.features(split)
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 4


ACCURACY = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}


def test_rank_agreement_of_concordant_and_reversed_rankings():
    concordant = rank_agreement({"a": -3.0, "b": -2.0, "c": -1.0, "d": 5.0}, ACCURACY)
    assert (concordant.n, concordant.kendall_tau, concordant.weighted_tau) == (
        4,
        pytest.approx(1.0),
        pytest.approx(1.0),
    )
    reversed_ = rank_agreement({"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}, ACCURACY)
    assert reversed_.kendall_tau == pytest.approx(-1.0) and reversed_.weighted_tau == pytest.approx(-1.0)
    # exact null distribution of 4 candidates: only 1 of the 24 orders has no discordant pair
    assert concordant.p_value == pytest.approx(2 / 24) and reversed_.p_value == pytest.approx(2 / 24)


def test_rank_agreement_of_a_mixed_case_matches_hand_counted_pairs():
    # the score swaps b and c: 1 discordant pair of 6
    mixed = rank_agreement({"a": 1.0, "b": 3.0, "c": 2.0, "d": 4.0}, ACCURACY)
    assert mixed.kendall_tau == pytest.approx((5 - 1) / 6)
    # orders with at most 1 discordant pair: 1 + 3 of 24, two-sided
    assert mixed.p_value == pytest.approx(2 * 4 / 24)
    # hyperbolic weights 1/(r + 1) by rank r from the top (0..3), a pair weighs w_i + w_j; the pairs
    # weigh (n - 1) * (1 + 1/2 + 1/3 + 1/4) = 25/4 in all; the discordant pair sits at ranks 1 and 2
    # in both orderings (by score and by accuracy): 5/6. tau_w = (25/4 - 2 * 5/6) / (25/4) = 11/15
    assert mixed.weighted_tau == pytest.approx(11 / 15)


def test_rank_agreement_leaves_out_candidates_without_a_score_instead_of_scoring_them_zero():
    scores = {"a": 1.0, "b": 2.0, "c": 3.0, "d": None, "e": float("nan")}
    accuracy = {**ACCURACY, "d": 0.9, "e": 0.95, "f": 0.99}  # f has no score at all
    result = rank_agreement(scores, accuracy)
    assert (
        result.n == 3
        and result.kendall_tau == pytest.approx(1.0)
        and result.weighted_tau == pytest.approx(1.0)
    )
    # as zeros, d and e would be the lowest scores with the highest accuracies
    as_zero = rank_agreement({**scores, "d": 0.0, "e": 0.0, "f": 0.0}, accuracy)
    assert as_zero.n == 6 and as_zero.kendall_tau < 0
    # a scored candidate that was never fine-tuned is left out too
    assert rank_agreement({**scores, "g": 10.0}, accuracy) == result


def test_rank_agreement_needs_two_candidates_with_both_values():
    with pytest.raises(ValueError, match=r"at least 2 candidates .* got \['a'\]"):
        rank_agreement({"a": 1.0, "b": None}, ACCURACY)


def _load_check_script(monkeypatch):
    path = Path(__file__).resolve().parent.parent / "scripts" / "transferability_check.py"
    spec = importlib.util.spec_from_file_location("tl_transferability_check", path)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses look their module up there
    spec.loader.exec_module(script)
    return script


def _fake_run(run_dir: Path, backbone: str, cut_at: str | None, acc: float) -> None:
    """The files of a finished train.py multirun job that the check reads."""
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save({"hydra": {"runtime": {"choices": {"backbone": backbone}}}}, run_dir / ".hydra/hydra.yaml")
    OmegaConf.save({"backbone": {"cut_at": cut_at}, "seed": 0}, run_dir / ".hydra/config.yaml")
    (run_dir / "metrics.json").write_text(json.dumps({"test": {"test/acc": acc, "test/loss": 1.0}}))


def test_check_script_pairs_runs_with_scores_by_backbone_and_cut(tmp_path, monkeypatch):
    scores = tmp_path / "scores.csv"
    scores.write_text(
        "candidate,feature dim,train samples,LogME,LEEP,NCE,seconds\n"
        "m0,1280,50,0.1,-2.0,-2.5,1.0\n"
        "m0@blocks.4,112,50,0.3,,,1.0\n"
        "m1,1280,50,0.2,-1.0,-1.5,1.0\n"
    )
    _fake_run(tmp_path / "seed0/0", "m0", None, 0.5)
    _fake_run(tmp_path / "seed0/1", "m0", "blocks.4", 0.9)
    _fake_run(tmp_path / "seed0/2", "m1", None, 0.7)
    _fake_run(tmp_path / "seed1/0", "m1", None, 0.8)
    out = tmp_path / "out"
    _load_check_script(monkeypatch).main(
        ["--out", str(out), "--dataset", "toy", str(scores), str(tmp_path / "seed0"), str(tmp_path / "seed1")]
    )
    text = (out / "check.md").read_text()
    assert "| m1 | 1280 | 50 | 0.2000 | -1.0000 | -1.5000 | 0.7500 ± 0.0707 (2) |" in text
    assert "| m0@blocks.4 | 112 | 50 | 0.3000 | - | - | 0.9000 (1) |" in text
    # LogME orders all three as the accuracy does; LEEP/NCE only see the two candidates with a head
    assert "| toy | LogME | 3 | 1.000 | 0.333 | 1.000 |" in text
    assert "| toy | LEEP | 2 | 1.000 |" in text and "| toy | NCE | 2 | 1.000 |" in text
    assert (out / "scores_vs_finetuned.png").stat().st_size > 0
