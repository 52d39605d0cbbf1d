"""EWC and L2SP add exactly the penalty's gradient, once per optimizer step; resume does not recompute."""

import copy

import pytest
import torch
from callback_helpers import make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import tl_lightning.callbacks.penalty as penalty_module
from tl_lightning.callbacks.penalty import EWC, L2SP
from tl_lightning.fisher import fisher_diagonal


class Tiny(LightningModule):
    def __init__(self, freeze_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"source": nn.Linear(8, 3), "target": nn.Linear(8, 2)})
        self.backbone[0].requires_grad_(not freeze_first)

    def forward(self, x):
        return self.heads["target"](self.backbone(x))

    def source_logits(self, x):
        return self.heads["source"](self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(
            TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)), 4
        )


class GradTap(Callback):
    """Snapshot parameters and gradients each time Lightning is about to step."""

    def __init__(self) -> None:
        self.grads, self.params = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        named = list(pl_module.named_parameters())
        self.grads.append({n: None if p.grad is None else p.grad.clone() for n, p in named})
        self.params.append({n: p.detach().clone() for n, p in named})


def _trainer(tmp_path, callbacks, max_epochs: int = 1, **kwargs) -> Trainer:
    return make_trainer(tmp_path, max_epochs, callbacks, log_every_n_steps=1, **kwargs)


def _penalty_grads(params, terms):
    """Autograd of Σ strength/2 · importance · (θ − anchor)² on copies of the parameters."""
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    value = sum(
        strength / 2 * (importance[n] * (leaves[n] - anchor[n]).square()).sum()
        for strength, anchor, importance in terms
        for n in anchor
    )
    value.backward()
    return {n: leaf.grad for n, leaf in leaves.items()}, value.detach()


def _check_added_gradient(before, after, terms, steps):
    assert len(before.grads) == len(after.grads) == steps
    for step in range(steps):
        expected, _ = _penalty_grads(before.params[step], terms)
        for name, grad_before in before.grads[step].items():
            added = None if grad_before is None else after.grads[step][name] - grad_before
            if grad_before is None:  # frozen or unused: no gradient is created
                assert after.grads[step][name] is None, name
            elif expected[name] is None:
                assert torch.equal(added, torch.zeros_like(added)), name
            else:
                torch.testing.assert_close(added, expected[name], rtol=1e-5, atol=1e-7)


def _ewc_terms(ewc):
    state = ewc.state_dict()
    return [(ewc.lambda_, state["anchor"], state["fisher"])]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ewc_adds_autograd_penalty_gradient_once_per_step(tmp_path, accumulate):
    model, before, after = Tiny(), GradTap(), GradTap()
    initial = copy.deepcopy(model)
    ewc = EWC(lambda_=3.0, modules="backbone", source_forward="source_logits", fisher_samples=12)
    trainer = _trainer(tmp_path, [before, ewc, after], max_epochs=2, accumulate_grad_batches=accumulate)
    trainer.fit(model)

    _check_added_gradient(before, after, _ewc_terms(ewc), steps=8 // accumulate)
    state = ewc.state_dict()
    assert list(state["anchor"]) == [n for n, _ in initial.named_parameters() if n.startswith("backbone.")]
    for name, p in initial.named_parameters():
        if name in state["anchor"]:
            assert torch.equal(state["anchor"][name], p.detach()), name
    raw = fisher_diagonal(
        initial,
        initial.train_dataloader(),
        mode="sampled",
        max_samples=12,
        params=list(state["anchor"]),
        method="source_logits",
    )
    mean = torch.cat([f.flatten() for f in raw.values()]).mean()
    for name, value in raw.items():
        torch.testing.assert_close(state["fisher"][name], value / mean)
    # the logged value is the penalty at the last step's weights
    _, value = _penalty_grads(before.params[-1], _ewc_terms(ewc))
    torch.testing.assert_close(trainer.callback_metrics["penalty/ewc"], value)


def test_l2sp_gradient_and_frozen_params_untouched(tmp_path):
    model, before, after = Tiny(freeze_first=True), GradTap(), GradTap()
    frozen = model.backbone[0].weight.detach().clone()
    l2sp = L2SP(alpha=0.7, beta=0.2, pretrained="backbone", new="heads.target")
    trainer = _trainer(tmp_path, [before, l2sp, after])
    trainer.fit(model)

    anchor = l2sp.state_dict()["anchor"]
    head = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n.startswith("heads.target.")}
    terms = [
        (0.7, anchor, {n: torch.ones_like(a) for n, a in anchor.items()}),
        (0.2, head, {n: torch.ones_like(z) for n, z in head.items()}),
    ]
    _check_added_gradient(before, after, terms, steps=4)
    assert torch.equal(model.backbone[0].weight, frozen)
    assert all(g["backbone.0.weight"] is None and g["heads.source.weight"] is None for g in after.grads)
    _, value = _penalty_grads(before.params[-1], terms)
    torch.testing.assert_close(trainer.callback_metrics["penalty/l2sp"], value)


def test_resume_restores_anchor_and_fisher_without_recomputing(tmp_path, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return fisher_diagonal(*args, **kwargs)

    monkeypatch.setattr(penalty_module, "fisher_diagonal", counting)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = EWC(lambda_=1.0, source_forward="source_logits", fisher_samples=8)
    _trainer(tmp_path, [first, ckpt], enable_checkpointing=True).fit(Tiny())
    assert len(calls) == 1

    resumed = EWC(lambda_=1.0, source_forward="source_logits", fisher_samples=8)
    _trainer(tmp_path, [resumed], max_epochs=2).fit(Tiny(), ckpt_path=tmp_path / "last.ckpt")
    assert len(calls) == 1
    saved, restored = first.state_dict(), resumed.state_dict()
    for key in ("anchor", "fisher"):
        assert saved[key].keys() == restored[key].keys()
        assert all(torch.equal(saved[key][n], restored[key][n]) for n in saved[key])


def test_online_ewc_decays_and_moves_anchor(tmp_path):
    model = Tiny()
    ewc = EWC(
        lambda_=1.0, source_forward="source_logits", fisher_samples=8, online=True, gamma=0.5, normalize=None
    )
    _trainer(tmp_path, [ewc]).fit(model)
    first = ewc.state_dict()
    after_first = copy.deepcopy(model)
    _trainer(tmp_path, [ewc]).fit(model)
    second = ewc.state_dict()

    names = list(first["anchor"])
    fresh = fisher_diagonal(
        after_first,
        after_first.train_dataloader(),
        mode="sampled",
        max_samples=8,
        params=names,
        method="source_logits",
        seed=1,
    )
    current = dict(after_first.named_parameters())
    for name in names:
        torch.testing.assert_close(second["fisher"][name], 0.5 * first["fisher"][name] + fresh[name])
        assert torch.equal(second["anchor"][name], current[name].detach())
        assert not torch.equal(second["anchor"][name], first["anchor"][name])
    assert second["tasks"] == 2


def test_offline_ewc_keeps_source_anchor_across_fits(tmp_path):
    model = Tiny()
    ewc = EWC(lambda_=1.0, source_forward="source_logits", fisher_samples=8)
    _trainer(tmp_path, [ewc]).fit(model)
    first = ewc.state_dict()
    _trainer(tmp_path, [ewc]).fit(model)
    assert all(torch.equal(first["anchor"][n], t) for n, t in ewc.state_dict()["anchor"].items())


def test_fisher_file_round_trip(tmp_path, monkeypatch):
    path = tmp_path / "fisher.safetensors"
    saver = EWC(lambda_=1.0, source_forward="source_logits", fisher_samples=8, fisher_save_path=path)
    _trainer(tmp_path, [saver]).fit(Tiny())
    monkeypatch.setattr(penalty_module, "fisher_diagonal", None)  # loading must not compute
    loader = EWC(lambda_=1.0, fisher_path=path)
    _trainer(tmp_path, [loader]).fit(Tiny())
    saved, loaded = saver.state_dict()["fisher"], loader.state_dict()["fisher"]
    assert (
        list(loaded) == list(saved) == [n for n, _ in Tiny().named_parameters() if n.startswith("backbone.")]
    )
    assert all(torch.equal(saved[n], loaded[n]) for n in saved)


def test_normalisation_does_not_depend_on_dict_order():
    """safetensors returns keys sorted; these values make a float32 mean in dict order differ by one ulp."""
    g = torch.Generator().manual_seed(2)
    shapes = {
        "backbone.0.weight": (8, 4),
        "backbone.0.bias": (8,),
        "backbone.2.weight": (8, 8),
        "backbone.2.bias": (8,),
    }
    fisher = {name: torch.rand(shape, generator=g) ** 4 for name, shape in shapes.items()}
    in_order = penalty_module._normalized(fisher, "mean")
    by_name = penalty_module._normalized(dict(sorted(fisher.items())), "mean")
    mean = torch.cat([f.flatten().double() for f in fisher.values()]).mean().float()
    for name, value in fisher.items():
        assert torch.equal(in_order[name], by_name[name]), name
        assert torch.equal(in_order[name], value / mean), name


class TargetOnly(Tiny):
    """A fine-tuning module whose only forward runs the new, randomly initialised target head."""

    source_logits = None


def test_ewc_default_never_measures_the_target_head(tmp_path):
    assert EWC(lambda_=1.0).source_forward == "source_logits"
    with pytest.raises(
        AttributeError, match="EWC\\(source_forward='source_logits'\\): TargetOnly has no method"
    ):
        _trainer(tmp_path, [EWC(lambda_=1.0)]).fit(TargetOnly())


def test_logs_on_lightnings_logging_steps_only(tmp_path):
    logged = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append("penalty/l2sp" in trainer.callback_metrics)
            trainer.callback_metrics.pop("penalty/l2sp", None)

    make_trainer(tmp_path, 1, [L2SP(), Watch()], log_every_n_steps=3).fit(Tiny())
    assert logged == [False, False, True, True]  # step 3, and the last step (the trainer stops)


def test_missing_module_lists_children(tmp_path):
    with pytest.raises(AttributeError, match="'backbone', 'heads'"):
        _trainer(tmp_path, [EWC(lambda_=1.0, modules="encoder")]).fit(Tiny())
    with pytest.raises(AttributeError, match="'backbone', 'heads'"):
        _trainer(tmp_path, [L2SP(new="head")]).fit(Tiny())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lambda_=0.0), "lambda_"),
        (dict(lambda_=1.0, fisher_mode="fim"), "'empirical', 'sampled', 'exact'"),
        (dict(lambda_=1.0, fisher_mode="empirical"), "source_data"),
        (dict(lambda_=1.0, normalize="sum"), "'mean', 'max', None"),
        (dict(lambda_=1.0, gamma=0.5), "online=True"),
        (dict(lambda_=1.0, fisher_path="a", fisher_save_path="b"), "not both"),
        (dict(lambda_=1.0, modules=[]), "non-empty"),
    ],
)
def test_ewc_validates_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EWC(**kwargs)


def test_l2sp_validates_arguments():
    with pytest.raises(ValueError, match="not both 0"):
        L2SP(alpha=0.0, beta=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        L2SP(alpha=-1.0)
