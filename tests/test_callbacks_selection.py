"""Selection by tensor identity: tied weights, compiled modules, regex vs attribute path, eval mode."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from callback_helpers import TinyModel, dataloader, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.callbacks import EWC, L2SP, Freeze, GradualUnfreeze, LayerDriftMonitor, LayerwiseLR
from tl_lightning.callbacks._select import layer_groups, selected_parameters

VOCAB, WIDTH = 12, 8


class TiedLM(pl.LightningModule):
    """A tiny language model whose output projection shares the input embedding (GPT-2 / BERT-MLM style).

    ``lm_head.weight`` is ``embed.weight``; ``named_parameters()`` lists the tensor once, as ``embed.weight``.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.blocks(self.embed(tokens)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        return nn.functional.cross_entropy(self(tokens), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def token_loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(
        TensorDataset(torch.randint(0, VOCAB, (16,), generator=g), torch.randint(0, VOCAB, (16,))), 4
    )


def test_tied_weight_is_selected_through_its_second_owner_once():
    model = TiedLM()
    assert selected_parameters(model, "lm_head") == {"embed.weight": model.embed.weight}
    both = selected_parameters(model, ["embed", "lm_head"])
    assert list(both) == ["embed.weight"]
    groups = layer_groups(model, ["embed", "blocks", "lm_head"])
    # lm_head holds only the tied tensor, which belongs to the first group holding it
    assert groups == {
        "embed._direct": ["embed.weight"],
        "blocks.0": ["blocks.0.weight", "blocks.0.bias"],
        "blocks.2": ["blocks.2.weight", "blocks.2.bias"],
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda: GradualUnfreeze(modules=r"blocks\.2|lm_head", milestones=[1, 2]),
        lambda: LayerwiseLR(modules=["blocks", "lm_head"]),
        lambda: L2SP(alpha=0.1, beta=0.0, pretrained="lm_head", new=None),
        lambda: EWC(
            lambda_=1.0, modules="lm_head", source_forward="forward", fisher_samples=8, fisher_chunk_size=4
        ),
        lambda: LayerDriftMonitor(modules=["blocks", "lm_head"]),
    ],
    ids=["GradualUnfreeze", "LayerwiseLR", "L2SP", "EWC", "LayerDriftMonitor"],
)
def test_callbacks_select_a_tied_weight_through_its_second_owner(tmp_path, make):
    model = TiedLM()
    before = model.embed.weight.detach().clone()
    make_trainer(tmp_path, 3, [make()]).fit(model, token_loader())
    assert not torch.equal(before, model.embed.weight)  # trained, once it was unfrozen


def test_gradual_unfreeze_handles_the_tied_weight_in_the_lm_head_group(tmp_path):
    trainable: list[bool] = []

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            trainable.append(pl_module.embed.weight.requires_grad)

    callback = GradualUnfreeze(modules=r"blocks\.2|lm_head", milestones=[1, 2])
    make_trainer(tmp_path, 3, [callback, Probe()]).fit(TiedLM(), token_loader())
    assert callback.state_dict()["blocks"] == [["lm_head"], ["blocks.2"]]
    # Probe runs after GradualUnfreeze at each epoch start: frozen in epoch 0, trainable from epoch 1
    assert trainable == [False, True, True]


def test_l2sp_tied_tensor_in_pretrained_and_new_is_an_error_naming_both_paths(tmp_path):
    trainer = make_trainer(tmp_path, 1, [L2SP(pretrained="embed", new="lm_head")])
    with pytest.raises(ValueError, match=r"'embed\.weight'.*'lm_head\.weight'"):
        trainer.fit(TiedLM(), token_loader())


def test_l2sp_penalises_a_tied_tensor_once(tmp_path):
    """One SGD step from a point away from the anchor: the pull equals alpha * (w - w0), not twice that."""
    model = TiedLM()
    callback = L2SP(alpha=1.0, beta=0.0, pretrained=["embed", "lm_head"], new=None)

    class Displace(pl.Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            pl_module.embed.weight.grad.zero_()

    class Shift(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            with torch.no_grad():
                pl_module.embed.weight.add_(1.0)  # after L2SP took its anchor

    trainer = make_trainer(tmp_path, 1, [Displace(), callback, Shift()], max_steps=1)
    anchor = model.embed.weight.detach().clone()
    trainer.fit(model, token_loader())
    # w1 = (w0 + 1) - lr * alpha * 1
    torch.testing.assert_close(model.embed.weight.detach(), anchor + 1.0 - 0.1, rtol=0, atol=1e-6)


def encoder_model() -> pl.LightningModule:
    """``model.encoder.layer`` holds 6 BERT-like layers with three sub-modules each."""

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention, self.intermediate, self.output = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(Layer() for _ in range(6))

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = nn.Linear(4, 4)
            self.encoder = Encoder()

    root = pl.LightningModule()
    root.model = Wrapper()
    return root


def test_regex_and_attribute_path_give_the_same_layer_groups():
    root = encoder_model()
    by_path = layer_groups(root, "model.encoder.layer")
    by_regex = layer_groups(root, r"model\.encoder\.layer\.\d+")
    assert by_regex == by_path
    assert list(by_path) == [f"model.encoder.layer.{i}" for i in range(6)]
    assert all(len(names) == 6 for names in by_path.values())
    factors = []
    for selector in ("model.encoder.layer", r"model\.encoder\.layer\.\d+"):
        callback = LayerwiseLR(modules=selector, decay=0.5)
        callback.setup(None, root, "fit")  # type: ignore[arg-type]
        factors.append(callback.factors)
    assert factors[0] == factors[1] and factors[0]["model.encoder.layer.0"] == 0.5**6


def compiled_tiny() -> TinyModel:
    model = TinyModel(optim="all")
    model.backbone = torch.compile(model.backbone, backend="eager")
    return model


def identities(groups: dict[str, list[str]], model: nn.Module) -> dict[str, list[int]]:
    params = dict(model.named_parameters())
    return {g: [id(params[n]) for n in names] for g, names in groups.items()}


def test_selection_sees_through_torch_compile():
    plain, compiled = TinyModel(), compiled_tiny()
    assert type(compiled.backbone).__name__ == "OptimizedModule"
    groups = layer_groups(compiled, "backbone")
    assert list(groups) == list(layer_groups(plain, "backbone")) == ["backbone.0", "backbone.1", "backbone.2"]
    assert identities(groups, compiled) == {
        f"backbone.{i}": [id(p) for p in compiled.backbone._orig_mod[i].parameters()] for i in range(3)
    }
    assert list(layer_groups(compiled, r"backbone\.\d")) == list(groups)
    assert selected_parameters(compiled, "backbone.1").keys() == {
        f"backbone._orig_mod.1.{m}.{p}" for m in (0, 1) for p in ("weight", "bias")
    }
    factors = []
    for model in (plain, compiled):
        callback = LayerwiseLR(decay=0.5)
        callback.setup(None, model, "fit")  # type: ignore[arg-type]
        factors.append(callback.factors)
    assert factors[0] == factors[1] == {"backbone.0": 0.125, "backbone.1": 0.25, "backbone.2": 0.5}


class TrainableCount(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.seen.append(sum(p.requires_grad for p in pl_module.parameters()))


def test_gradual_unfreeze_trains_a_compiled_backbone_like_the_original(tmp_path):
    results = []
    for model in (TinyModel(optim="all"), compiled_tiny()):
        count = TrainableCount()
        make_trainer(tmp_path, 4, [GradualUnfreeze(milestones=[1, 2, 3]), count]).fit(model, dataloader())
        results.append((count.seen, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0] == [2, 6, 10, 14]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)


class DropoutModel(TinyModel):
    """TinyModel with a Dropout in each backbone block; records which backbone modules train per step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for block in self.backbone:
            block.append(nn.Dropout(0.5))
        self.training_modules: list[set[str]] = []

    def on_train_epoch_start(self) -> None:
        self.train()  # as many user modules do

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_modules.append(
            {n for n, m in self.backbone.named_modules(prefix="backbone") if m.training}
        )
        return super().training_step(batch, batch_idx)


BACKBONE_MODULES = (
    {"backbone"}
    | {f"backbone.{i}" for i in range(3)}
    | {f"backbone.{i}.{j}" for i in range(3) for j in range(4)}
)


def test_freeze_puts_the_whole_frozen_module_in_eval_mode(tmp_path):
    model = DropoutModel()
    make_trainer(tmp_path, 2, [Freeze()]).fit(model, dataloader())
    assert model.training_modules == [set()] * 8
    x = torch.randn(5, 4)
    model.train()
    Freeze().setup(None, model, "fit")  # type: ignore[arg-type]
    model.backbone.eval()
    assert torch.equal(model.backbone(x), model.backbone(x))


def test_freeze_train_bn_keeps_only_norm_layers_training(tmp_path):
    model = DropoutModel()
    make_trainer(tmp_path, 1, [Freeze(train_bn=True)]).fit(model, dataloader())
    assert model.training_modules == [{f"backbone.{i}.1" for i in range(3)}] * 4


def test_gradual_unfreeze_keeps_frozen_groups_wholly_in_eval_mode(tmp_path):
    model = DropoutModel()
    make_trainer(tmp_path, 3, [GradualUnfreeze(milestones=[1, 2])]).fit(model, dataloader())
    per_epoch = model.training_modules[::4]
    block = lambda i: {f"backbone.{i}"} | {f"backbone.{i}.{j}" for j in range(4)}  # noqa: E731
    # the container ``backbone`` trains once any of its groups does
    assert per_epoch == [set(), {"backbone"} | block(2), BACKBONE_MODULES]
