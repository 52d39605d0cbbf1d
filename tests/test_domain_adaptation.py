"""Source + target data and the DANN / MMD module: pairing, target labels kept out, the pipeline."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.nn import functional as F

from tl_lightning.backbones import small_cnn
from tl_lightning.data import DigitsDataModule, DomainPairDataModule, MNIST5kDataModule
from tl_lightning.modules.domain_adaptation import DomainAdaptationModule
from tl_lightning.modules.heads import LinearHead
from tl_lightning.objectives.domain import dann_coefficient
from tl_lightning.run.pipeline import train

CLASSES = [0, 1, 2]


def _pair(data_config, source_classes=CLASSES, target_classes=CLASSES) -> DomainPairDataModule:
    source = partial(DigitsDataModule, classes=source_classes, train_per_class=8, shuffle_seed=0)
    target = partial(MNIST5kDataModule, classes=target_classes, train_per_class=12, shuffle_seed=0)
    return DomainPairDataModule(data_config, source, target, image_size=16, batch_size=4)


def _module(adaptation: str) -> DomainAdaptationModule:
    backbone = small_cnn(channels=(8, 16), input_size=16)
    optimizer = partial(torch.optim.SGD, lr=0.1)
    return DomainAdaptationModule(
        backbone, LinearHead(16, 3), 3, optimizer, adaptation=adaptation, domain_hidden=8
    )


def test_pair_yields_labelled_source_and_unlabelled_target_at_one_size_and_normalisation():
    config = small_cnn(input_size=16).data_config
    data = _pair(config)
    data.setup("fit")
    batches = [batch for batch, _, _ in data.train_dataloader()]
    (x_source, y_source), x_target = batches[0]["source"], batches[0]["target"]
    assert x_source.shape == x_target.shape == (4, 3, 16, 16)
    assert y_source.dtype == torch.int64 and torch.is_tensor(x_target)
    for domain in (data.source, data.target):
        assert domain.image_size == 16
        assert domain.train_set.mean.flatten().tolist() == list(config.mean)
        assert domain.train_set.std.flatten().tolist() == list(config.std)
    # max_size_cycle: an epoch is one pass over the larger (target, 36 images) split
    assert len(batches) == 9
    assert [len(loader.dataset) for loader in data.val_dataloader()] == [
        len(data.target.val_set),
        len(data.source.val_set),
    ]
    assert data.num_classes == 3 and len(data.train_set) == 24


def test_pair_rejects_domains_with_other_classes():
    data = _pair(small_cnn().data_config, target_classes=[0, 1, 3])
    with pytest.raises(ValueError, match=r"same classes.*\['0', '1', '2'\] and \['0', '1', '3'\]"):
        data.setup("fit")


def _train_weights(adaptation: str, corrupt: str | None) -> dict[str, torch.Tensor]:
    """Weights after 6 steps; ``corrupt`` permutes the training labels of the ``source`` or ``target``."""
    pl.seed_everything(0)
    data = _pair(small_cnn(input_size=16).data_config)
    data.setup("fit")
    if corrupt is not None:
        train_set = getattr(data, corrupt).train_set
        train_set.labels = (train_set.labels + 1) % 3
    module = _module(adaptation)
    trainer = pl.Trainer(
        max_steps=6,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
    )
    trainer.fit(module, datamodule=data)
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("adaptation", ["dann", "mmd"])
def test_target_labels_never_reach_the_loss(adaptation):
    reference = _train_weights(adaptation, corrupt=None)
    with_wrong_target_labels = _train_weights(adaptation, corrupt="target")
    assert reference.keys() == with_wrong_target_labels.keys()
    assert all(torch.equal(reference[k], with_wrong_target_labels[k]) for k in reference)
    # the harness sees labels that do reach the loss: changing the source labels changes the weights
    with_wrong_source_labels = _train_weights(adaptation, corrupt="source")
    assert not torch.equal(
        reference["heads.target.1.weight"], with_wrong_source_labels["heads.target.1.weight"]
    )


def test_dann_gradient_is_source_ce_minus_coefficient_times_domain_gradient():
    torch.manual_seed(0)
    module = _module("dann")
    x_source, y_source, x_target = (
        torch.randn(4, 3, 16, 16),
        torch.tensor([0, 1, 2, 0]),
        torch.randn(4, 3, 16, 16),
    )
    progress = 0.3
    module.progress = lambda: progress  # the schedule's input, without a Trainer
    module.log = module.log_dict = lambda *args, **kwargs: None
    module.training_step({"source": (x_source, y_source), "target": x_target}, 0).backward()
    got = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    def grads(loss):
        module.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    features = module.backbone(torch.cat([x_source, x_target]))
    ce = grads(F.cross_entropy(module.heads["target"](features[:4]), y_source))
    features = module.backbone(torch.cat([x_source, x_target]))
    domain_logits = module.heads["domain"](features).squeeze(1)
    bce = grads(F.binary_cross_entropy_with_logits(domain_logits, torch.tensor([0.0] * 4 + [1.0] * 4)))
    coeff = dann_coefficient(progress)
    for name, grad in got.items():
        if name.startswith("backbone."):
            expected = ce[name] - coeff * bce[name]
        else:
            expected = ce.get(name, 0) + bce.get(name, 0)  # the heads see their own losses unreversed
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_module_rejects_unknown_adaptation_and_unpaired_batches():
    with pytest.raises(ValueError, match=r"module.adaptation must be one of \['none', 'dann', 'mmd'\]"):
        _module("coral")
    with pytest.raises(ValueError, match="data=mnist5k_to_digits"):
        _module("mmd").training_step((torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.int64)), 0)


@pytest.mark.parametrize("strategy", ["source_only", "dann", "mmd"])
def test_pipeline_reports_target_and_source_accuracy(make_cfg, strategy):
    cfg = make_cfg(
        "data=mnist5k_to_digits", f"strategy={strategy}", "backbone=small_cnn", "monitor=val/source_acc"
    )
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["strategy"] == strategy and metrics["monitor"] == "val/source_acc"
    assert {"val/acc", "val/source_acc"} <= set(metrics["final"])
    assert {"test/acc", "test/f1", "test/source_acc", "test/source_f1"} <= set(metrics["test"])


def test_reverse_direction_config_swaps_the_domains(make_cfg):
    cfg = make_cfg("data=digits_to_mnist5k", "strategy=dann")
    assert cfg.data.source._target_.endswith("DigitsDataModule")
    assert cfg.data.target._target_.endswith("MNIST5kDataModule")
    assert cfg.data.image_size == 32
