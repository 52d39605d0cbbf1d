"""strategy=lora|ia3 through PEFT: what is wrapped, what trains, adapter checkpoints, merging, composition.

EfficientNet-Lite0 uses its packaged ImageNet weights (offline); the BERT is a tiny random one built
from a ``BertConfig`` (no download).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from itertools import chain
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from ddp_lora_script import STEPS
from hydra import compose, initialize_config_dir
from peft.tuners.tuners_utils import BaseTunerLayer
from resume_helpers import last_weights
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.adapters.peft import ia3, keep_changed_only, lora, merge_adapter
from tl_lightning.backbones import TextBackbone, TextConfig, efficientnet_lite0
from tl_lightning.callbacks import LayerDriftMonitor, LayerwiseLR, SourceRetention
from tl_lightning.modules.heads import LinearHead
from tl_lightning.modules.transfer import TransferModule
from tl_lightning.run.inference import export_safetensors, load_trained
from tl_lightning.run.pipeline import rebuild_module, train

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
LITE_TARGETS = ("conv_pw", "conv_pwl", "conv_head")


def _adapted_paths(model: torch.nn.Module) -> set[str]:
    """Paths (PEFT prefix removed) of the modules PEFT wrapped."""
    return {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }


def _module(backbone, lr: float = 1e-2) -> TransferModule:
    torch.manual_seed(0)
    return TransferModule(
        backbone, LinearHead(backbone.num_features, 10), 10, partial(torch.optim.AdamW, lr=lr)
    )


def _fit(module: pl.LightningModule, steps: int, callbacks=(), tmp_path=None, val=None) -> pl.Trainer:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(8 * steps, 3, 32, 32, generator=g), torch.randint(0, 10, (8 * steps,), generator=g)
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=8), val)
    return trainer


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (``state_dict`` of an adapted module leaves the frozen ones out)."""
    return {n: t.detach().clone() for n, t in chain(module.named_parameters(), module.named_buffers())}


def test_lora_wraps_the_pointwise_convs_of_efficientnet_lite0():
    plain = efficientnet_lite0(pretrained=False)
    expected = {
        name
        for name, m in plain.model.named_modules()
        if name.rsplit(".", 1)[-1] in LITE_TARGETS and isinstance(m, torch.nn.Conv2d)
    }
    assert all(m.kernel_size == (1, 1) for n, m in plain.model.named_modules() if n in expected)
    assert (
        len(expected) == 16 + 15 + 1
    )  # 16 expansions (block 0: its pointwise conv), 15 projections, conv_head
    backbone = lora(efficientnet_lite0(pretrained=False), r=4)
    assert _adapted_paths(backbone.model) == expected
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(expected)


def test_lora_wraps_query_and_value_of_a_tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    backbone = TextBackbone(BertModel(config), TextConfig("unused", 64, "cls"), name="tiny-bert")
    assert backbone.peft_targets == ["query", "value"]
    lora(backbone, r=2)
    assert _adapted_paths(backbone.model) == {
        f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")
    }
    groups = backbone.layer_groups()
    assert list(groups) == ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"]
    adapter = "model.base_model.model.encoder.layer.1.attention.self.value.lora_B.default.weight"
    assert adapter in groups["encoder.layer.1"]
    tokens = {
        "input_ids": torch.randint(0, 100, (2, 7)),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
    }
    assert backbone(tokens).shape == (2, 32)


def test_a_target_that_matches_nothing_is_named_with_the_modules_there_are():
    with pytest.raises(ValueError, match=r"adapter\.target_modules: 'conv_pww' matches no module.*conv_pw"):
        lora(efficientnet_lite0(pretrained=False), target_modules=["conv_pw", "conv_pww"])
    with pytest.raises(ValueError, match=r"adapter\.target_modules: 'blocks.*9.*' matches no module"):
        ia3(efficientnet_lite0(pretrained=False), target_modules=r"blocks\.9.*")


def test_only_adapters_and_the_target_head_change_and_frozen_batchnorm_keeps_its_statistics(tmp_path):
    module = _module(lora(efficientnet_lite0(), r=4))
    before = _state(module)
    _fit(module, steps=3, tmp_path=tmp_path)
    after = _state(module)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    adapters = {n for n in before if ".lora_A." in n or ".lora_B." in n}
    assert changed == adapters | {"heads.target.1.weight", "heads.target.1.bias"}
    assert any("running_mean" in n for n in before) and "heads.source.weight" in before
    x = torch.randn(2, 3, 32, 32)
    module.train()
    with torch.no_grad():
        in_train_mode = module(x)
        module.eval()
        assert torch.equal(in_train_mode, module(x)), (
            "frozen BatchNorm must normalise with its running statistics"
        )


def test_ia3_starts_from_the_pretrained_function_and_trains_only_its_scales(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    plain = efficientnet_lite0().eval()
    with torch.no_grad():
        expected = plain(x)
    backbone = ia3(efficientnet_lite0()).eval()
    with torch.no_grad():
        assert torch.equal(backbone(x), expected)  # scales start at 1
    assert _adapted_paths(backbone.model) == _adapted_paths(lora(efficientnet_lite0(pretrained=False)).model)
    module = _module(backbone.train())
    before = _state(module)
    _fit(module, steps=2, tmp_path=tmp_path)
    after = _state(module)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if ".ia3_l." in n} | {"heads.target.1.weight", "heads.target.1.bias"}


@pytest.mark.parametrize("factory", [partial(lora, r=4), ia3], ids=["lora", "ia3"])
def test_merged_weights_give_the_adapter_model_s_logits(factory):
    module = _module(factory(efficientnet_lite0())).eval()
    torch.manual_seed(1)
    for p in module.backbone.parameters():
        if p.requires_grad:  # a trained-looking adapter: lora_B != 0, IA3 scales != 1
            p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        adapted = module(x)
        with module.backbone.model.disable_adapter():
            base = module(x)
    keep_changed_only(module)
    assert merge_adapter(module)
    with torch.no_grad():
        merged = module(x)
    assert (adapted - base).abs().max() > 1e-2, "the adapter must matter, or the comparison proves nothing"
    assert (merged - adapted).abs().max() <= 1e-5
    assert not any(isinstance(m, BaseTunerLayer) for m in module.modules())
    plain = _module(efficientnet_lite0())
    assert module.state_dict().keys() == plain.state_dict().keys(), "merged: every weight, plain names"
    assert module.backbone.layer_groups() == plain.backbone.layer_groups()


def test_layerwise_lr_and_monitors_see_peft_names_through_layer_groups(tmp_path):
    module = TransferModule(
        lora(efficientnet_lite0(), r=4), LinearHead(1280, 10), 10, partial(torch.optim.AdamW, lr=1e-2)
    )
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g)
    probe = DataLoader(images, batch_size=4)
    val = DataLoader(TensorDataset(images, torch.arange(8) % 10), batch_size=4)
    callbacks = [LayerwiseLR("backbone", decay=0.5), LayerDriftMonitor("backbone"), SourceRetention(probe)]
    trainer = _fit(module, steps=2, callbacks=callbacks, val=val)
    prefix = "backbone.model.base_model.model."
    lr_of = {id(p): g["lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    params = dict(module.named_parameters())

    def lr(name: str) -> float:
        return lr_of[id(params[prefix + name])]

    assert lr("conv_head.lora_A.default.weight") == pytest.approx(1e-2 * 0.5)  # top group: k = 1
    assert lr("blocks.3.0.conv_pw.lora_A.default.weight") == pytest.approx(1e-2 * 0.5**4)  # blocks.3: k = 4
    assert lr("blocks.3.0.conv_pw.lora_B.default.weight") == lr("blocks.3.0.conv_pw.base_layer.weight")
    drift = trainer.callback_metrics
    assert drift["drift/backbone.conv_stem+bn1"] == 0  # no adapter there
    assert drift["drift/backbone.blocks.3"] > 0
    assert (
        0 <= drift["source/agreement"] <= 1 and drift["source/kl"] > 0
    )  # the adapters moved the source logits


# --- through the pipeline: adapter checkpoints, resume, export ---------------------------------------

RUN = [
    "strategy=lora",
    "adapter.r=4",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "+trainer.enable_progress_bar=false",
    "callbacks.rich_progress_bar=null",
    "data.image_size=32",
    "data.batch_size=8",
]


def _cfg(out: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*RUN, f"paths.output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A 2-epoch LoRA run, the same run stopped after epoch 0, and that one resumed."""
    root = tmp_path_factory.mktemp("lora_runs")
    straight = _cfg(root / "straight")
    train(straight)
    cut = _cfg(
        root / "cut", "+callbacks.stop._target_=resume_helpers.StopAfterEpoch", "+callbacks.stop.epoch=0"
    )
    train(cut)
    resumed = _cfg(root / "resumed", f"ckpt_path={root / 'cut' / 'checkpoints' / 'last.ckpt'}")
    train(resumed)
    return {"straight": straight, "cut": cut, "resumed": resumed}


def test_checkpoints_hold_the_adapters_and_the_target_head_only(runs):
    cfg = runs["straight"]
    weights = last_weights(cfg)
    assert weights and all(
        ".lora_A." in k or ".lora_B." in k or k.startswith("heads.target.") for k in weights
    )
    assert sum(k.startswith("heads.target.") for k in weights) == 2
    assert sum(".lora_" in k for k in weights) == 2 * 32
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    params = metrics["params"]
    assert params["trainable"] == sum(v.numel() for v in weights.values())
    assert params["trainable_fraction"] == round(params["trainable"] / params["total"], 6) < 0.1
    assert metrics["test"]["test/acc"] is not None  # the best checkpoint loaded for test


def test_resume_from_an_adapter_checkpoint_reproduces_the_uninterrupted_run(runs):
    expected, actual = last_weights(runs["straight"]), last_weights(runs["resumed"])
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    interrupted = last_weights(runs["cut"])
    assert any(not torch.equal(expected[k], interrupted[k]) for k in expected if ".lora_" in k)


def test_export_merges_the_adapters_into_plain_weights_with_the_same_logits(runs, tmp_path):
    path = Path(runs["straight"].paths.output_dir) / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    adapted = rebuild_module(checkpoint["tl_lightning"]["config"], 10).eval()
    adapted.load_state_dict(checkpoint["state_dict"])  # the base comes from the packaged weights
    model = load_trained(path)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.module.modules())
    assert not any("lora" in k for k in model.serving_state_dict())
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        reference = adapted(x)
        assert (model.module(x) - reference).abs().max() <= 1e-5
        exported = load_trained(export_safetensors(model, tmp_path / "model.safetensors"))
        assert (exported.module(x) - reference).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("Freeze", ["+callbacks.freeze._target_=tl_lightning.callbacks.Freeze"]),
        (
            "GradualUnfreeze",
            [
                "+callbacks.unfreeze._target_=tl_lightning.callbacks.GradualUnfreeze",
                "+callbacks.unfreeze.milestones=[1]",
            ],
        ),
    ],
)
def test_freezing_callbacks_are_refused_with_an_adapter_strategy(tmp_path, name, overrides):
    with pytest.raises(
        ValueError, match=rf"strategy=lora trains the adapters.*\['{name}'\].*callbacks\.<name>=null"
    ):
        train(_cfg(tmp_path / "run", *overrides))


def test_an_adapter_over_random_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"backbone\.pretrained=true.*strategy=scratch"):
        train(_cfg(tmp_path / "run", "backbone.pretrained=false"))


@pytest.mark.slow
def test_ddp_lora_replicas_are_bitwise_equal(tmp_path):
    """``trainer=ddp_cpu strategy=lora`` through the pipeline (see ``ddp_lora_script.py``)."""
    script = Path(__file__).with_name("ddp_lora_script.py")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["final"].keys() == r1["final"].keys()
    unequal = [n for n in r0["final"] if not torch.equal(r0["final"][n], r1["final"][n])]
    assert unequal == []
    changed = {n for n in r0["final"] if not torch.equal(r0["final"][n], r0["initial"][n])}
    adapters = {n for n in r0["final"] if ".lora_A." in n or ".lora_B." in n}
    assert changed == adapters | {"heads.target.1.weight", "heads.target.1.bias"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"] == STEPS
