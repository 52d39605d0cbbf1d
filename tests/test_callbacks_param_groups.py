"""Repartitioning optimizers into named per-layer-group parameter groups, schedulers included."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from tl_lightning.callbacks._param_groups import groups_of_layers, partition_optimizer, scale_lrs


@pytest.fixture
def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))  # "0", "1" selected, "2" = head


def layers_of(net: nn.Sequential) -> dict[str, dict[str, nn.Parameter]]:
    return {f"l{i}": {f"{i}.{n}": p for n, p in net[i].named_parameters()} for i in (0, 1)}


def names(opt: torch.optim.Optimizer) -> list[str]:
    return [g["name"] for g in opt.param_groups]


def test_splits_single_group_by_layer_and_keeps_hyperparameters(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    assert partition_optimizer(opt, layers_of(net))
    assert names(opt) == ["other", "l0", "l1"]
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 1e-3 for g in opt.param_groups)
    found = groups_of_layers(opt, layers_of(net))
    assert [p for g in found["l0"] for p in g["params"]] == list(net[0].parameters())
    assert opt.param_groups[0]["params"] == list(net[2].parameters())


def test_weight_decay_split_stays_split(net):
    decay = [m.weight for m in net]
    no_decay = [m.bias for m in net]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1, "name": "decay"}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1.0,
    )
    partition_optimizer(opt, layers_of(net))
    assert names(opt) == ["decay", "other", "l0/decay", "l0", "l1/decay", "l1"]
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["l0/decay"]["weight_decay"] == 0.1 and by_name["l0/decay"]["params"] == [net[0].weight]
    assert by_name["l0"]["weight_decay"] == 0.0 and by_name["l0"]["params"] == [net[0].bias]


def test_appends_missing_parameters_from_the_first_group(net):
    opt = torch.optim.SGD(net[2].parameters(), lr=0.1, momentum=0.5)
    assert not partition_optimizer(opt, layers_of(net))  # without add_missing: nothing to split
    assert partition_optimizer(opt, layers_of(net), add_missing=True)
    assert names(opt) == ["other", "l0", "l1"]
    assert opt.param_groups[1]["params"] == list(net[0].parameters())
    assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[1]["momentum"] == 0.5


def test_layout_does_not_depend_on_what_was_trainable(net):
    """A resumed module that filters by requires_grad may already hold some layers: same layout."""
    fresh = torch.optim.SGD(net[2].parameters(), lr=0.1)
    partition_optimizer(fresh, layers_of(net), add_missing=True)
    resumed = torch.optim.SGD([*net[2].parameters(), *net[1].parameters()], lr=0.1)
    partition_optimizer(resumed, layers_of(net), add_missing=True)
    assert names(fresh) == names(resumed)
    assert [g["params"] for g in fresh.param_groups] == [g["params"] for g in resumed.param_groups]
    resumed.load_state_dict(fresh.state_dict())


def test_idempotent_on_partitioned_optimizer(net):
    opt = torch.optim.SGD(
        [{"params": net[2].parameters(), "name": "head"}]
        + [{"params": net[i].parameters(), "name": f"backbone.{i}", "lr": 0.01 * (i + 1)} for i in (0, 1)],
        lr=0.1,
    )
    sched = lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.5, lambda s: 0.25])
    before = [dict(g) for g in opt.param_groups]
    lambdas = list(sched.lr_lambdas)
    assert not partition_optimizer(opt, layers_of(net), [sched], add_missing=True)
    assert [dict(g) for g in opt.param_groups] == before
    assert sched.lr_lambdas == lambdas


def test_names_unnamed_groups_without_splitting(net):
    opt = torch.optim.SGD([{"params": net[0].parameters()}, {"params": net[2].parameters()}], lr=0.1)
    assert not partition_optimizer(opt, {"l0": dict(net[0].named_parameters())})
    assert names(opt) == ["l0", "other"]


def test_scheduler_lists_follow_their_source_group(net):
    opt = torch.optim.SGD(
        [
            {"params": [net[0].weight, net[1].weight, net[2].weight]},
            {"params": [net[0].bias, net[1].bias, net[2].bias]},
        ],
        lr=1.0,
        momentum=0.9,
    )
    lam = lr_scheduler.LambdaLR(opt, [lambda s: 2.0, lambda s: 3.0])
    plateau = lr_scheduler.ReduceLROnPlateau(opt, min_lr=[0.2, 0.3])
    cyclic = lr_scheduler.CyclicLR(opt, base_lr=[0.1, 0.01], max_lr=[1.0, 0.5])
    seq = lr_scheduler.SequentialLR(
        opt,
        [lr_scheduler.LinearLR(opt, 0.1, total_iters=2), lr_scheduler.CosineAnnealingLR(opt, 5)],
        milestones=[2],
    )
    partition_optimizer(opt, layers_of(net), [lam, plateau, cyclic, seq])
    # source group of each new group: 0 = weights, 1 = biases
    src = [0 if g["params"][0].ndim == 2 else 1 for g in opt.param_groups]
    assert [f(0) for f in lam.lr_lambdas] == [(2.0, 3.0)[s] for s in src]
    assert plateau.min_lrs == [(0.2, 0.3)[s] for s in src]
    assert cyclic.max_lrs == [(1.0, 0.5)[s] for s in src]
    for inner in seq._schedulers:
        assert len(inner.base_lrs) == len(opt.param_groups)
    opt.step()
    seq.step()
    plateau.step(1.0)


def test_one_cycle_group_keys_travel_with_the_group(net):
    opt = torch.optim.SGD(net[2].parameters(), lr=0.1, momentum=0.9)
    sched = lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=10)
    partition_optimizer(opt, layers_of(net), [sched], add_missing=True)
    for g in opt.param_groups:
        assert (g["max_lr"], g["initial_lr"]) == (0.4, 0.4 / 25)
    opt.step()
    sched.step()
    assert len({g["lr"] for g in opt.param_groups}) == 1


def test_param_names_are_split_too(net):
    opt = torch.optim.SGD(list(net.named_parameters()), lr=0.1)
    partition_optimizer(opt, layers_of(net))
    assert [g["param_names"] for g in opt.param_groups] == [
        ["2.weight", "2.bias"],
        ["0.weight", "0.bias"],
        ["1.weight", "1.bias"],
    ]


def test_scale_lrs_scales_groups_and_scheduler_lists_once(net):
    opt = torch.optim.SGD(
        [{"params": net[i].parameters(), "name": str(i)} for i in range(3)], lr=1.0, momentum=0.9
    )
    seq = lr_scheduler.SequentialLR(
        opt, [lr_scheduler.LinearLR(opt, 0.5, total_iters=2), lr_scheduler.StepLR(opt, 1)], milestones=[2]
    )
    scale_lrs(opt, [0.5, 0.25, 1.0], [seq])
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.125, 0.5]
    assert [g["initial_lr"] for g in opt.param_groups] == [0.5, 0.25, 1.0]
    assert seq._last_lr == [0.25, 0.125, 0.5]  # shared with the first inner scheduler, scaled once
    assert seq._schedulers[1].base_lrs == [0.5, 0.25, 1.0]


class PeakPerGroup:
    """A scheduler of a kind the callbacks do not know, holding one entry per parameter group."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.peaks = [group["lr"] for group in optimizer.param_groups]


def test_unknown_per_group_scheduler_state_is_an_error_naming_it(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"PeakPerGroup\.peaks has one entry per parameter group"):
        partition_optimizer(opt, layers_of(net), [PeakPerGroup(opt)])


def test_timm_scheduler_lists_follow_the_split(net):
    from timm.scheduler import CosineLRScheduler, PlateauLRScheduler

    opt = torch.optim.SGD(
        [{"params": net[0].parameters(), "lr": 0.1}, {"params": net[2].parameters()}], lr=0.2
    )
    cosine = CosineLRScheduler(opt, t_initial=10, warmup_t=2, warmup_lr_init=0.01)
    with pytest.warns(FutureWarning):  # deprecated in timm, still used
        plateau = PlateauLRScheduler(opt, warmup_t=2, warmup_lr_init=0.01)
    layers = {"l0": dict(net[0].named_parameters()), "l1": dict(net[1].named_parameters())}
    assert partition_optimizer(opt, layers, [cosine, plateau], add_missing=True)
    assert names(opt) == ["other", "l0", "l1"]
    for scheduler in (cosine, plateau):
        assert scheduler.base_values == [0.2, 0.1, 0.1]
        assert scheduler.warmup_steps == pytest.approx([0.095, 0.045, 0.045])
    assert plateau.lr_scheduler.min_lrs == [0, 0, 0]
    scale_lrs(opt, [1.0, 0.5, 0.25], [cosine])
    assert cosine.base_values == pytest.approx([0.2, 0.05, 0.025])
    cosine.step(1)  # half-way: from the unscaled floor 0.01 towards the scaled base values
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.105, 0.03, 0.0175])
