"""Multi-task heads: weighted task losses, PCGrad against hand-computed projections, per-task metrics."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.backbones import Backbone, DataConfig
from tl_lightning.data import DigitsDataModule, MNIST5kDataModule, MultiTaskDataModule
from tl_lightning.modules.multitask import MultiTaskModule, check_pcgrad_strategy, resolve_loss_weights
from tl_lightning.objectives.pcgrad import pcgrad
from tl_lightning.run.pipeline import train

LR = 0.5
N = 8  # samples per task


# ---------------------------------------------------------------- PCGrad on hand-made vectors


def _project(g: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """PCGrad for one task, written out: remove the component along each conflicting other, in order."""
    for other in others:
        dot = float(g @ other)
        if dot < 0:
            g = g - dot / float(other @ other) * other
    return g


def test_pcgrad_projects_a_conflicting_pair_as_computed_by_hand():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # g1.g2 = -1: g1' = g1 + 1/2 g2 = (0.5, 0.5); g2' = g2 + 1/1 g1 = (0, 1); the sum is (0.5, 1.5)
    assert torch.equal(pcgrad([g1, g2], torch.Generator().manual_seed(0)), torch.tensor([0.5, 1.5]))


def test_pcgrad_leaves_non_conflicting_gradients_alone():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(pcgrad([g1, g2]), torch.tensor([2.0, 1.0]))
    g3 = torch.tensor([0.0, -1.0])  # conflicts with g2 only (g1.g3 = 0 is no conflict)
    # g1' = g1; g2' = g2 - (-1)/1 g3 = (1, 0); g3' = g3 - (-1)/2 g2 = (0.5, -0.5)
    assert torch.allclose(pcgrad([g1, g2, g3]), torch.tensor([2.5, -0.5]))


def test_pcgrad_visits_tasks_in_a_seeded_random_order_that_matters():
    g1, g2, g3 = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([-1.0, -2.0])
    # by hand, task 1: order (2, 3): (2,0) + (-1,1) = (1,1); (1,1).g3 = -3 -> (1,1) + 3/5 (-1,-2) = (0.4,-0.2)
    #                  order (3, 2): (2,0) + 2/5 (-1,-2) = (1.6,-0.8); .g2 = -2.4 -> + 1.2 (-1,1) = (0.4,0.4)
    assert torch.allclose(_project(g1, [g2, g3]), torch.tensor([0.4, -0.2]))
    assert torch.allclose(_project(g1, [g3, g2]), torch.tensor([0.4, 0.4]))
    grads = [g1, g2, g3]
    results = set()
    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        orders = [[j for j in torch.randperm(3, generator=generator).tolist() if j != i] for i in range(3)]
        expected = sum(_project(grads[i], [grads[j] for j in orders[i]]) for i in range(3))
        got = pcgrad(grads, torch.Generator().manual_seed(seed))
        assert torch.allclose(got, expected, atol=1e-6)
        assert torch.equal(got, pcgrad(grads, torch.Generator().manual_seed(seed)))  # same seed, same result
        results.add(tuple(round(v, 5) for v in got.tolist()))
    assert len(results) > 1  # the order is drawn, not fixed


def test_pcgrad_commutes_with_a_common_positive_scale():
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(50, generator=generator) for _ in range(4)]
    for scale in (2.0**16, 0.25):
        scaled = pcgrad([scale * g for g in grads], torch.Generator().manual_seed(3))
        assert torch.equal(scaled, scale * pcgrad(grads, torch.Generator().manual_seed(3)))


def test_pcgrad_rejects_empty_and_mismatched_inputs():
    with pytest.raises(ValueError, match="at least one"):
        pcgrad([])
    with pytest.raises(ValueError, match="one shape"):
        pcgrad([torch.zeros(3), torch.zeros(4)])


# ---------------------------------------------------------------- the module in Lightning


def _tiny_module(tasks: dict[str, int], **kwargs) -> MultiTaskModule:
    """A BatchNorm-free MLP backbone (so one joint forward equals separate forwards) and linear heads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
    groups = {name: f"layer{name.split('.')[0]}" for name, _ in model.named_parameters()}
    backbone = Backbone(model, 6, DataConfig((0.5,) * 3, (0.5,) * 3, (3, 2, 2)), groups, name="tiny")
    heads = {task: nn.Linear(6, n) for task, n in tasks.items()}
    return MultiTaskModule(backbone, heads, tasks, partial(torch.optim.SGD, lr=LR), **kwargs)


def _task_data(tasks: dict[str, int], seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {
        task: (torch.randn(N, 3, 2, 2, generator=generator), torch.randint(0, n, (N,), generator=generator))
        for task, n in tasks.items()
    }


def _trainer(**kwargs) -> pl.Trainer:
    settings = {"max_steps": 1, "limit_val_batches": 0} | kwargs
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )


def _fit_one_step(module: MultiTaskModule, data, batch_size: int = N, **trainer_kwargs) -> dict:
    loaders = {t: DataLoader(TensorDataset(*xy), batch_size=batch_size) for t, xy in data.items()}
    _trainer(**trainer_kwargs).fit(module, train_dataloaders=CombinedLoader(loaders, "max_size_cycle"))
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _task_gradients(
    module: MultiTaskModule, data, weights: dict[str, float]
) -> dict[str, dict[str, torch.Tensor]]:
    """Per task: ``grad (w_t L_t)`` of every parameter, each from its own forward and backward pass."""
    grads = {}
    for task, (x, y) in data.items():
        module.zero_grad(set_to_none=True)
        (weights[task] * F.cross_entropy(module(x, task), y)).backward()
        grads[task] = {
            name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in module.named_parameters()
        }
    module.zero_grad(set_to_none=True)
    return grads


def test_total_loss_gradient_is_the_weighted_sum_of_task_gradients():
    tasks, weights = {"a": 3, "b": 4}, {"a": 0.25, "b": 3.0}
    data = _task_data(tasks)
    module = _tiny_module(tasks, loss_weights=weights)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    grads = _task_gradients(module, data, weights)
    after = _fit_one_step(module, data)
    for name, value in before.items():
        expected = value - LR * (grads["a"][name] + grads["b"][name])
        assert torch.allclose(after[name], expected, atol=1e-6), name


def _hand_pcgrad_step(module: MultiTaskModule, data, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """The SGD update of one PCGrad step for two tasks, from separate backward passes and the formula."""
    grads = _task_gradients(module, data, weights)
    shared = [name for name, _ in module.named_parameters() if name.startswith("backbone.")]
    ga = torch.cat([grads["a"][n].flatten() for n in shared])
    gb = torch.cat([grads["b"][n].flatten() for n in shared])
    dot = float(ga @ gb)
    assert dot < 0, "the test data must make the two tasks conflict"
    combined = (ga - dot / float(gb @ gb) * gb) + (gb - dot / float(ga @ ga) * ga)
    assert not torch.allclose(combined, ga + gb)  # PCGrad changes this step
    step = dict(zip(shared, combined.split([grads["a"][n].numel() for n in shared]), strict=True))
    expected = {}
    for name, p in module.named_parameters():
        grad = step[name].view_as(p) if name in step else grads["a"][name] + grads["b"][name]
        expected[name] = p.detach() - LR * grad
    return expected


def _conflicting_module(tasks: dict[str, int], **kwargs) -> MultiTaskModule:
    """Head b starts as minus head a: on the same images and labels the two tasks pull apart."""
    module = _tiny_module(tasks, pcgrad=True, **kwargs)
    with torch.no_grad():
        module.heads["b"].weight.copy_(-module.heads["a"].weight)
    return module


def _conflicting_data(tasks: dict[str, int], seed: int) -> dict:
    data = _task_data({t: n for t, n in tasks.items() if t != "b"}, seed=seed)
    return {t: data["a" if t == "b" else t] for t in tasks}


def test_one_pcgrad_training_step_gives_the_hand_computed_update():
    weights = {"a": 1.0, "b": 0.5}
    tasks = {"a": 3, "b": 3}
    module, data = _conflicting_module(tasks, loss_weights=weights), _conflicting_data(tasks, seed=0)
    expected = _hand_pcgrad_step(module, data, weights)
    after = _fit_one_step(module, data)
    for name, value in expected.items():
        assert torch.allclose(after[name], value, atol=1e-6), name


class _LossScalingOnly(MixedPrecision):
    """16-mixed's GradScaler without the float16 autocast: isolates the loss-scale handling exactly."""

    def forward_context(self):
        return torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize(("tasks", "seed"), [({"a": 3, "b": 3}, 1), ({"a": 3, "b": 3, "c": 2}, 2)])
def test_pcgrad_step_is_the_same_with_accumulation_and_a_grad_scaler(tasks, seed):
    """Two half batches accumulated, under a 2**12 loss scale, project the same gradient as one batch."""
    data = _conflicting_data(tasks, seed)
    reference = _fit_one_step(_conflicting_module(tasks, pcgrad_seed=4), data)
    accumulated = _fit_one_step(
        _conflicting_module(tasks, pcgrad_seed=4), data, batch_size=N // 2, accumulate_grad_batches=2
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled = _fit_one_step(
        _conflicting_module(tasks, pcgrad_seed=4),
        data,
        batch_size=N // 2,
        accumulate_grad_batches=2,
        plugins=[_LossScalingOnly("16-mixed", "cpu", scaler)],
    )
    assert scaler.get_scale() == 2.0**12  # the step was taken, not skipped as non-finite
    for name, value in reference.items():
        assert torch.allclose(accumulated[name], value, atol=1e-6), name
        assert torch.allclose(scaled[name], value, atol=1e-6), name
    # the reference itself is PCGrad of the full-batch task gradients, in the order drawn for step 0
    module = _conflicting_module(tasks, pcgrad_seed=4)
    grads = _task_gradients(module, data, dict.fromkeys(tasks, 1.0))
    shared = [n for n, _ in module.named_parameters() if n.startswith("backbone.")]
    flat = [torch.cat([grads[t][n].flatten() for n in shared]) for t in tasks]
    seed = np.random.SeedSequence([4, 0]).generate_state(1)[0]
    combined = pcgrad(flat, torch.Generator().manual_seed(int(seed)))
    if len(tasks) == 3:  # the orders drawn for steps 0 and 1 differ here: drawing per micro-batch would show
        step_1 = np.random.SeedSequence([4, 1]).generate_state(1)[0]
        assert not torch.allclose(combined, pcgrad(flat, torch.Generator().manual_seed(int(step_1))))
    start = dict(module.named_parameters())
    for name, g in zip(shared, combined.split([start[n].numel() for n in shared]), strict=True):
        assert torch.allclose(reference[name], start[name].detach() - LR * g.view_as(start[name]), atol=1e-6)


def test_per_task_metrics_are_logged_under_task_names_with_their_mean():
    tasks = {"a": 3, "b": 4}
    train_data, val_data = _task_data(tasks, seed=2), _task_data(tasks, seed=3)
    module = _tiny_module(tasks, loss_weights={"a": 1.0, "b": 2.0})
    train_loaders = {t: DataLoader(TensorDataset(*xy), batch_size=4) for t, xy in train_data.items()}
    val_loaders = [DataLoader(TensorDataset(*val_data[t]), batch_size=3) for t in tasks]
    trainer = _trainer(max_epochs=1, max_steps=-1, limit_val_batches=None)
    trainer.fit(module, CombinedLoader(train_loaders, "max_size_cycle"), val_loaders)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    with torch.no_grad():
        hand = {}
        for task, (x, y) in val_data.items():
            logits = module(x, task)
            hand[task] = (float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y)))
    for task in tasks:
        assert logged[f"val/{task}/acc"] == pytest.approx(hand[task][0])
        assert logged[f"val/{task}/loss"] == pytest.approx(hand[task][1], rel=1e-5)
        assert {f"train/{task}/acc", f"train/{task}/loss", f"val/{task}/f1"} <= set(logged)
    assert logged["val/acc"] == pytest.approx((hand["a"][0] + hand["b"][0]) / 2)
    assert logged["val/loss"] == pytest.approx(hand["a"][1] + 2.0 * hand["b"][1], rel=1e-5)
    assert set(module.monitor_modes()) >= {"val/acc", "val/a/acc", "val/b/loss", "train/loss"}
    tested = trainer.test(module, val_loaders, verbose=False)[0]
    assert tested["test/b/acc"] == pytest.approx(hand["b"][0])
    assert tested["test/acc"] == pytest.approx(logged["val/acc"])


# ---------------------------------------------------------------- configuration errors


def test_a_wrong_task_name_in_the_loss_weights_names_the_key_and_the_tasks():
    with pytest.raises(ValueError, match=r"module.loss_weights names \['fashoin'\].*\['digit', 'fashion'\]"):
        resolve_loss_weights({"digit": 1.0, "fashoin": 1.0}, ["digit", "fashion"])
    with pytest.raises(ValueError, match=r"no weight for \['fashion'\]"):
        resolve_loss_weights({"digit": 1.0}, ["digit", "fashion"])
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        resolve_loss_weights({"digit": -1.0, "fashion": 1.0}, ["digit", "fashion"])
    assert resolve_loss_weights(None, ["a", "b"]) == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match="module.loss_weights names"):
        _tiny_module({"a": 3, "b": 4}, loss_weights={"a": 1.0, "c": 1.0})


def test_pcgrad_is_rejected_under_ddp():
    with pytest.raises(ValueError, match=r"module.pcgrad=true needs a single-device run.*DDPStrategy"):
        check_pcgrad_strategy(DDPStrategy())
    check_pcgrad_strategy(SingleDeviceStrategy(torch.device("cpu")))


# ---------------------------------------------------------------- data and the pipeline


def _two_domain_tasks(data_config) -> MultiTaskDataModule:
    tasks = {
        "mnist": partial(MNIST5kDataModule, classes=[0, 1, 2], train_per_class=12, shuffle_seed=0),
        "digits": partial(DigitsDataModule, classes=[3, 4], train_per_class=8, shuffle_seed=0),
    }
    return MultiTaskDataModule(data_config, tasks, image_size=16, batch_size=4)


def test_data_yields_a_batch_of_every_task_with_its_own_labels():
    data = _two_domain_tasks(DataConfig((0.5,) * 3, (0.5,) * 3, (3, 16, 16)))
    data.setup("fit")
    assert data.task_classes == {"mnist": 3, "digits": 2}
    batches = [batch for batch, _, _ in data.train_dataloader()]
    assert len(batches) == 9  # max_size_cycle over the larger split (36 images / 4)
    for batch in batches:
        assert set(batch) == {"mnist", "digits"}
        assert batch["mnist"][0].shape == batch["digits"][0].shape == (4, 3, 16, 16)
    assert set(torch.cat([b["digits"][1] for b in batches]).tolist()) == {0, 1}
    assert [len(loader.dataset) for loader in data.val_dataloader()] == [
        len(data.tasks["mnist"].val_set),
        len(data.tasks["digits"].val_set),
    ]
    assert data.class_names[:2] == ["mnist/0", "mnist/1"] and data.num_classes == 5
    with pytest.raises(ValueError, match="reserved"):
        MultiTaskDataModule(DataConfig((0.5,) * 3, (0.5,) * 3, (3, 16, 16)), {"source": MNIST5kDataModule})


TWO_TASKS = [
    "data=mnist5k_fashion",
    "~data.tasks.fashion",
    "data.tasks.digit.classes=[0,1,2]",
    "data.tasks.digit.train_per_class=12",
    "+data.tasks.sk={_target_:tl_lightning.data.DigitsDataModule,_partial_:true,classes:[3,4],train_per_class:8}",
    "backbone=small_cnn",
]


@pytest.mark.parametrize("strategy", ["multitask", "multitask_pcgrad"])
def test_pipeline_trains_one_head_per_task_and_reports_each(make_cfg, strategy):
    cfg = make_cfg(*TWO_TASKS, f"strategy={strategy}", "module.loss_weights={digit:1.0,sk:0.5}")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["strategy"] == strategy and metrics["monitor"] == "val/acc"
    expected = {f"test/{task}/{name}" for task in ("digit", "sk") for name in ("acc", "f1", "loss")}
    assert expected | {"test/acc", "test/loss"} <= set(metrics["test"])
    assert metrics["test"]["test/acc"] == pytest.approx(
        (metrics["test"]["test/digit/acc"] + metrics["test"]["test/sk/acc"]) / 2
    )


def test_pipeline_names_the_key_for_a_wrong_task_and_a_single_task_module(make_cfg):
    cfg = make_cfg(*TWO_TASKS, "strategy=multitask", "module.loss_weights={digit:1.0,fashion:1.0}")
    with pytest.raises(
        InstantiationException, match=r"module.loss_weights names \['fashion'\].*\['digit', 'sk'\]"
    ):
        train(cfg)
    cfg = make_cfg(*TWO_TASKS, "strategy=full_finetune", run="single")
    with pytest.raises(ValueError, match="has tasks.*strategy=multitask"):
        train(cfg)
