"""``trainer=fsdp|fsdp_cpu`` compose; what cannot run sharded and DeepSpeed stop before anything is built."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from torch import nn

from tl_lightning.modules.sharding import unit_paths
from tl_lightning.run.config_checks import check_config
from tl_lightning.run.pipeline import train
from tl_lightning.run.sharding import ShardedDataParallel


@pytest.mark.parametrize("trainer", ["ddp", "ddp_cpu", "fsdp", "fsdp_cpu"])
def test_every_distributed_trainer_config_names_its_nodes(make_cfg, trainer):
    cfg = make_cfg(f"trainer={trainer}", "trainer.num_nodes=2")
    assert cfg.trainer.num_nodes == 2  # an override, not a `+` addition: the key exists


def test_fsdp_cpu_is_two_gloo_processes_sharding_everything(make_cfg):
    cfg = make_cfg("trainer=fsdp_cpu")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ShardedDataParallel)
    assert (cfg.trainer.devices, strategy.process_group_backend, strategy._tensor_parallel_size) == (
        2,
        "gloo",
        1,
    )
    assert make_cfg("trainer=fsdp").trainer.precision == "bf16-mixed"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["strategy=linear_probe_lbfgs"], "strategy=linear_probe_lbfgs cannot run under trainer=fsdp"),
        (["strategy=linear_probe", "feature_cache=memory"], "feature_cache=memory cannot run under"),
        (
            ["strategy=multitask_pcgrad", "data=mnist5k_fashion"],
            "strategy=multitask_pcgrad cannot",
        ),
    ],
)
def test_what_cannot_run_sharded_is_refused_before_training(make_cfg, overrides, match):
    cfg = make_cfg("trainer=fsdp_cpu", *overrides)
    with pytest.raises(ValueError, match=match):
        check_config(cfg)
    with pytest.raises(ValueError, match=match):
        train(cfg)  # before anything is built or launched


def test_a_module_that_does_not_shard_itself_is_refused(make_cfg):
    cfg = make_cfg("trainer=fsdp_cpu", "task=causal_lm", fast=False)  # CausalLMModule: no configure_model
    match = r"module._target_=.*CausalLMModule cannot run under trainer=fsdp.*configure_model"
    with pytest.raises(ValueError, match=match):
        check_config(cfg)
    with pytest.raises(ValueError, match=match):
        train(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer=ddp", "trainer.strategy=deepspeed_stage_2"],
        ["trainer=ddp_cpu", "trainer.strategy._target_=lightning.pytorch.strategies.DeepSpeedStrategy"],
    ],
)
def test_deepspeed_is_refused_naming_fsdp2(make_cfg, overrides):
    with pytest.raises(ValueError, match=r"DeepSpeed is not supported.*trainer=fsdp .*trainer=fsdp_cpu"):
        check_config(make_cfg(*overrides))


def test_shard_units_are_the_modules_holding_exactly_one_layer_group():
    root = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), nn.Linear(2, 2))
    groups = {
        "stem": ["0.weight", "0.bias", "2.weight"],  # spread over two children: no unit of its own
        "block": ["1.0.weight", "1.0.bias", "1.1.weight", "1.1.bias"],
        "out": ["2.bias"],  # half of a module: stays with the root
    }
    assert unit_paths(root, groups) == ["1"]


def test_a_group_tied_to_a_module_outside_it_stays_with_the_root():
    """An embedding tied to the LM head as a unit of its own stopped FSDP2 at the first forward."""
    root = nn.ModuleDict({"emb": nn.Embedding(10, 4), "block": nn.Linear(4, 4), "lm_head": nn.Linear(4, 10)})
    root["lm_head"].weight = root["emb"].weight  # named_parameters lists the tied weight once, as emb's
    groups = {"emb": ["emb.weight"], "block": ["block.weight", "block.bias"]}
    assert unit_paths(root, groups) == ["block"]


def test_trainer_precision_becomes_fsdp2_mixed_precision():
    import torch

    from tl_lightning.modules.sharding import mixed_precision

    bf16 = mixed_precision("bf16-mixed")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)  # fp32 reduction
    full = mixed_precision("32-true")
    assert (full.param_dtype, full.reduce_dtype) == (None, None)  # the parameters' own dtype
