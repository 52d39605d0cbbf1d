"""Task arithmetic: vectors, weighted sums, negation, TIES/DARE, base checks, LoRA, merged checkpoints."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, FAST
from hydra import compose, initialize_config_dir
from peft import LoraConfig, get_peft_model
from torch import nn

from tl_lightning.adapters.merging import (
    TaskVector,
    apply_task_vector,
    lora_task_vector,
    merge_task_vectors,
    state_fingerprint,
    task_vector,
)
from tl_lightning.backbones import efficientnet_lite0
from tl_lightning.data import DigitsDataModule
from tl_lightning.run.checkpointing import load_checkpoint
from tl_lightning.run.inference import load_trained
from tl_lightning.run.merge import merge_checkpoints
from tl_lightning.run.pipeline import pretrained_backbone, rebuild_module, train


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def _finetuned(pretrained: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A 'fine-tune': every floating-point tensor moved, the BN batch counter advanced."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in pretrained.items():
        if value.is_floating_point():
            state[key] = value + 0.1 * torch.randn(value.shape, generator=generator)
        else:
            state[key] = value + 7
    state["1.running_var"] = pretrained["1.running_var"] * 1.5  # stays positive, as a variance must
    return state


@pytest.fixture
def states():
    pretrained = {k: v.clone() for k, v in _tiny_model().state_dict().items()}
    pretrained["1.running_mean"] += 0.3  # BN statistics that differ from their init values
    return pretrained, _finetuned(pretrained, 1), _finetuned(pretrained, 2)


def test_weighted_sum_equals_hand_computed_weights(states):
    pretrained, ft_a, ft_b = states
    tau_a, tau_b = task_vector(ft_a, pretrained), task_vector(ft_b, pretrained)
    merged = apply_task_vector(pretrained, merge_task_vectors([tau_a, tau_b], [0.3, 0.7]))
    assert set(merged) == set(pretrained)
    for key, base in pretrained.items():
        if key.endswith("num_batches_tracked"):  # integer buffers are never merged: the base's
            assert torch.equal(merged[key], base)
            continue
        expected = base + (0.3 * (ft_a[key] - base) + 0.7 * (ft_b[key] - base))
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-7, msg=key)
    assert not torch.equal(merged["1.running_mean"], pretrained["1.running_mean"])  # merged like weights


def test_bn_stats_base_keeps_pretrained_running_statistics(states):
    pretrained, ft_a, _ = states
    tau = task_vector(ft_a, pretrained, bn_stats="base")
    assert "1.running_var" not in tau.deltas and "1.weight" in tau.deltas
    merged = apply_task_vector(pretrained, tau)
    assert torch.equal(merged["1.running_var"], pretrained["1.running_var"])
    torch.testing.assert_close(merged["1.weight"], ft_a["1.weight"], rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"bn_stats='recompute' is not one of \['merge', 'base'\]"):
        task_vector(ft_a, pretrained, bn_stats="recompute")


def test_full_vector_restores_the_finetune_and_negation_subtracts(states):
    pretrained, ft_a, ft_b = states
    tau_a, tau_b = task_vector(ft_a, pretrained), task_vector(ft_b, pretrained)
    restored = apply_task_vector(pretrained, tau_a)
    negated = apply_task_vector(pretrained, -tau_b)
    scaled = apply_task_vector(pretrained, merge_task_vectors([tau_a, tau_b], [1.0, -0.5]))
    for key in tau_a.deltas:
        base = pretrained[key]
        torch.testing.assert_close(restored[key], ft_a[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(negated[key], base - (ft_b[key] - base), rtol=0, atol=1e-7)
        expected = base + ((ft_a[key] - base) - 0.5 * (ft_b[key] - base))
        torch.testing.assert_close(scaled[key], expected, rtol=0, atol=1e-7)
    summed = tau_a + (-1.0) * tau_b
    for key in tau_a.deltas:
        assert torch.equal(summed.deltas[key], tau_a.deltas[key] - tau_b.deltas[key])


def _one_tensor_vectors(*values: list[float]) -> list[TaskVector]:
    return [TaskVector({"w": torch.tensor(v)}, "base") for v in values]


def test_ties_matches_hand_computed_case():
    # density 0.75 keeps the 3 largest magnitudes: a -> [3, 0, 2, -4], b -> [-1, 2, 5, 0].
    # Elected signs (sign of the unweighted sum [2, 2, 7, -4]): [+, +, +, -].
    # Weighted (1, 0.5): a -> [3, 0, 2, -4], b -> [-0.5, 1, 2.5, 0]; the agreeing entries are averaged:
    # [3 / 1, 1 / 1, (2 + 2.5) / 2, -4 / 1].
    vectors = _one_tensor_vectors([3.0, -1.0, 2.0, -4.0], [-1.0, 2.0, 5.0, 0.5])
    merged = merge_task_vectors(vectors, [1.0, 0.5], method="ties", density=0.75)
    assert torch.equal(merged.deltas["w"], torch.tensor([3.0, 1.0, 2.25, -4.0]))
    # 'frequency' elects by sign count: position 0 ties (one +, one -) and goes to +, as 'total' did,
    # so only magnitude pruning and the disjoint mean differ from the plain sum
    frequency = merge_task_vectors(
        vectors, [1.0, 0.5], method="ties", density=0.75, majority_sign_method="frequency"
    )
    assert torch.equal(frequency.deltas["w"], torch.tensor([3.0, 1.0, 2.25, -4.0]))
    pruned = merge_task_vectors(vectors, [1.0, 0.5], method="magnitude_prune", density=0.75)
    assert torch.equal(pruned.deltas["w"], torch.tensor([2.5, 1.0, 4.5, -4.0]))


def test_dare_at_density_one_is_the_plain_sum_and_drops_with_a_fixed_seed():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, generator=generator), torch.randn(4000, generator=generator)
    vectors = [TaskVector({"w": a, "v": b}, "base"), TaskVector({"w": b, "v": a}, "base")]
    plain = merge_task_vectors(vectors, [0.4, 0.6])
    dense = merge_task_vectors(vectors, [0.4, 0.6], method="dare_linear", density=1.0)
    for key in ("w", "v"):
        assert torch.equal(dense.deltas[key], plain.deltas[key])
    single = merge_task_vectors(vectors[:1], [0.5], method="dare_linear", density=0.25, seed=3)
    ratio = single.deltas["w"] / (0.5 * a / 0.25)  # each entry dropped (0) or kept and rescaled (1)
    assert torch.all((ratio == 0) | torch.isclose(ratio, torch.tensor(1.0)))
    assert 0.2 < (ratio != 0).float().mean() < 0.3
    again = merge_task_vectors(vectors[:1], [0.5], method="dare_linear", density=0.25, seed=3)
    reordered = [TaskVector({"v": b, "w": a}, "base")]  # same tensors, other dict order: same draw
    swapped = merge_task_vectors(reordered, [0.5], method="dare_linear", density=0.25, seed=3)
    other = merge_task_vectors(vectors[:1], [0.5], method="dare_linear", density=0.25, seed=4)
    assert torch.equal(again.deltas["w"], single.deltas["w"])
    assert torch.equal(swapped.deltas["w"], single.deltas["w"])
    assert not torch.equal(other.deltas["w"], single.deltas["w"])
    dare_ties = merge_task_vectors(vectors, [0.4, 0.6], method="dare_ties", density=1.0)
    ties = merge_task_vectors(vectors, [0.4, 0.6], method="ties", density=1.0)
    assert torch.equal(dare_ties.deltas["w"], ties.deltas["w"])


def test_merge_arguments_are_checked():
    vectors = _one_tensor_vectors([1.0, 2.0], [3.0, 4.0])
    with pytest.raises(ValueError, match="got 1 weights for 2 task vectors"):
        merge_task_vectors(vectors, [1.0])
    with pytest.raises(ValueError, match=r"method='mean' is not one of \['task_arithmetic', "):
        merge_task_vectors(vectors, [1.0, 1.0], method="mean")
    with pytest.raises(ValueError, match=r"density=0.0 must be in \(0, 1\]"):
        merge_task_vectors(vectors, [1.0, 1.0], method="ties", density=0.0)
    with pytest.raises(ValueError, match="majority_sign_method='max' is not one of"):
        merge_task_vectors(vectors, [1.0, 1.0], method="ties", majority_sign_method="max")
    with pytest.raises(ValueError, match="no task vectors given"):
        merge_task_vectors([], [])


def test_mismatched_bases_are_errors(states):
    pretrained, ft_a, ft_b = states
    tau_a = task_vector(ft_a, pretrained)
    other_base = {k: v.clone() for k, v in _tiny_model(seed=5).state_dict().items()}
    tau_other = task_vector(_finetuned(other_base, 3), other_base)
    with pytest.raises(
        ValueError, match="task vectors 0 and 1 were taken against different pretrained weights"
    ):
        merge_task_vectors([tau_a, tau_other], [0.5, 0.5])
    with pytest.raises(ValueError, match="different pretrained weights"):
        tau_a + tau_other
    with pytest.raises(ValueError, match="taken against other pretrained weights"):
        apply_task_vector(other_base, tau_a)
    wider = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5))
    wider_state = wider.state_dict()
    tau_wider = task_vector(
        _finetuned(wider_state, 4) | {"1.running_var": wider_state["1.running_var"]}, wider_state
    )
    with pytest.raises(
        ValueError, match=r"task vectors 0 and 1: different architectures .*only in the first: \['3.bias'"
    ):
        merge_task_vectors([tau_a, tau_wider], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"shape mismatch: \[\('0.bias', \(4,\), \(5,\)\)"):
        merge_task_vectors([tau_a, tau_wider], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"task_vector\(finetuned, pretrained\): different architectures"):
        task_vector(wider_state, pretrained)
    assert state_fingerprint(pretrained) == state_fingerprint(dict(reversed(list(pretrained.items()))))


def test_lora_task_vector_equals_merged_minus_base_weights():
    model = _tiny_model()
    model[1].running_mean += 0.3
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["3", "6"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)  # random A and B: a non-zero delta, as after training
    tau = lora_task_vector(peft_model, pretrained)
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(merged) == set(pretrained)
    changed = {k for k, v in tau.deltas.items() if v.abs().sum() > 0}
    assert changed == {"3.weight", "6.weight"}  # the 1x1 conv and the linear layer
    for key in tau.deltas:
        torch.testing.assert_close(tau.deltas[key], merged[key] - pretrained[key], rtol=0, atol=1e-6)
    inputs = torch.randn(2, 3, 8, 8)
    rebuilt = _tiny_model().eval()
    rebuilt.load_state_dict(apply_task_vector(pretrained, tau))
    torch.testing.assert_close(rebuilt(inputs), peft_model.eval()(inputs), rtol=0, atol=1e-6)
    tau_full = task_vector(_finetuned(pretrained, 1), pretrained)
    merge_task_vectors([tau, tau_full], [1.0, 1.0])  # LoRA and full vectors of one base combine
    shifted = {k: v + 1 if k == "3.weight" else v for k, v in pretrained.items()}
    with pytest.raises(ValueError, match="LoRA layer '3' wraps a base weight that differs"):
        lora_task_vector(peft_model, shifted)
    with pytest.raises(ValueError, match="no LoRA layer with adapter 'other'"):
        lora_task_vector(peft_model, pretrained, adapter_name="other")


_MERGE_SCRIPT = importlib.util.spec_from_file_location(
    "tl_merge_script", Path(__file__).resolve().parent.parent / "scripts" / "merge.py"
)
merge_script = importlib.util.module_from_spec(_MERGE_SCRIPT)
_MERGE_SCRIPT.loader.exec_module(merge_script)


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """Lite0 fine-tuned (3 steps, 32 px) on digits 0-4 (A, and L with LoRA) and on 5-9 (B): train.py
    checkpoints of one base."""
    root = tmp_path_factory.mktemp("merge_runs")
    paths = {}
    runs = (
        ("A", "[0,1,2,3,4]", "full_finetune"),
        ("B", "[5,6,7,8,9]", "full_finetune"),
        ("L", "[0,1,2,3,4]", "lora"),
    )
    for task, classes, strategy in runs:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    *FAST,
                    f"strategy={strategy}",
                    "module.optimizer.lr=1e-2",
                    f"data.classes={classes}",
                    "logger=none",
                    f"paths.output_dir={root / task}",
                ],
            )
        train(cfg)
        paths[task] = root / task / "checkpoints" / "last.ckpt"
    return paths


def _digit_batch() -> torch.Tensor:
    data = DigitsDataModule(efficientnet_lite0(pretrained=False).data_config, image_size=32)
    data.setup()
    return torch.stack([data.test_set[i][0] for i in range(8)])


def test_merged_checkpoint_gives_the_logits_of_the_merged_state(two_tasks, tmp_path):
    a, b = str(two_tasks["A"]), str(two_tasks["B"])
    out = tmp_path / "merged"
    merge_script.main(["--vectors", a, b, "--weights", "0.6", "0.3", "--out", str(out)])
    assert json.loads((out / "merge.json").read_text())["files"] == {
        str(out / "head0.ckpt"): a,
        str(out / "head1.ckpt"): b,
    }
    checkpoint_a, checkpoint_b = load_checkpoint(a), load_checkpoint(b)
    config = checkpoint_a["tl_lightning"]["config"]
    pretrained = {k: v.clone() for k, v in pretrained_backbone(config).state_dict().items()}
    # the merged state by hand: theta_pre + 0.6 tau_A + 0.3 tau_B over floating-point tensors
    merged = {}
    for key, base in pretrained.items():
        ft_a, ft_b = (
            checkpoint_a["state_dict"][f"backbone.{key}"],
            checkpoint_b["state_dict"][f"backbone.{key}"],
        )
        merged[key] = base + (0.6 * (ft_a - base) + 0.3 * (ft_b - base)) if base.is_floating_point() else base
    assert not torch.equal(merged["model.conv_stem.weight"], pretrained["model.conv_stem.weight"])
    images = _digit_batch()
    for index, checkpoint in enumerate((checkpoint_a, checkpoint_b)):
        written = load_checkpoint(out / f"head{index}.ckpt")
        assert not any(k.startswith("ModelCheckpoint") for k in written["callbacks"])
        assert written["tl_lightning"]["merge"]["weights"] == [0.6, 0.3]
        reference = rebuild_module(config, 5).eval()
        heads = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("heads.target.")}
        reference.load_state_dict({f"backbone.{k}": v for k, v in merged.items()} | heads)
        loaded = load_trained(out / f"head{index}.ckpt").module
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), reference(images), rtol=0, atol=1e-6)


def test_negated_checkpoint_keeps_the_chosen_head(two_tasks, tmp_path):
    a, b = str(two_tasks["A"]), str(two_tasks["B"])
    out = tmp_path / "negated"
    with pytest.raises(
        ValueError, match="running variances of .* are negative"
    ):  # statistics merged as weights
        merge_script.main(["--vectors", b, "--weights", "-0.5", "--heads", a, "--out", str(out)])
    merge_script.main(
        ["--vectors", b, "--weights", "-0.5", "--heads", a, "--bn-stats", "base", "--out", str(out)]
    )
    written, checkpoint_a, checkpoint_b = (
        load_checkpoint(out / "head0.ckpt"),
        load_checkpoint(a),
        load_checkpoint(b),
    )
    pretrained = pretrained_backbone(checkpoint_a["tl_lightning"]["config"]).state_dict()
    key = "model.blocks.3.0.conv_pw.weight"
    base = pretrained[key]
    expected = base + (-0.5) * (checkpoint_b["state_dict"][f"backbone.{key}"] - base)
    torch.testing.assert_close(written["state_dict"][f"backbone.{key}"], expected, rtol=0, atol=1e-7)
    statistics = "model.blocks.3.0.bn1.running_var"  # bn_stats=base: the pretrained statistics
    assert torch.equal(written["state_dict"][f"backbone.{statistics}"], pretrained[statistics])
    assert torch.equal(
        written["state_dict"]["heads.target.1.weight"], checkpoint_a["state_dict"]["heads.target.1.weight"]
    )


def test_checkpoints_of_different_bases_are_an_error(two_tasks, tmp_path):
    a = str(two_tasks["A"])
    other = load_checkpoint(a)
    other["tl_lightning"]["config"]["backbone"]["cut_at"] = "blocks.4"  # another architecture (a cut Lite0)
    torch.save(other, tmp_path / "cut.ckpt")
    with pytest.raises(
        ValueError, match=r"'.*cut.ckpt': task_vector\(finetuned, pretrained\): different architectures"
    ):
        merge_checkpoints([a, str(tmp_path / "cut.ckpt")], [0.5, 0.5])
    with pytest.raises(
        ValueError, match=r"'.*last.ckpt' and '.*cut.ckpt' were fine-tuned from different pretrained"
    ):
        merge_checkpoints([a], [0.5], head_paths=[a, str(tmp_path / "cut.ckpt")])
    other = load_checkpoint(a)
    other["tl_lightning"]["config"]["backbone"]["pretrained"] = False
    torch.save(other, tmp_path / "scratch.ckpt")
    with pytest.raises(ValueError, match="trained from a random init"):
        merge_checkpoints([str(tmp_path / "scratch.ckpt")], [1.0])


def test_negative_merged_running_variance_is_an_error(states):
    pretrained, _, ft_b = states
    tau_b = task_vector(ft_b, pretrained)  # running_var grew by half: -3 tau_b makes it negative
    with pytest.raises(
        ValueError, match=r"running variances of \['1.running_var'\] \(1 layers\) are negative"
    ):
        apply_task_vector(pretrained, -3.0 * tau_b)
    apply_task_vector(pretrained, -3.0 * task_vector(ft_b, pretrained, bn_stats="base"))


def test_lora_checkpoint_vector_is_the_peft_merged_weights_minus_the_base(two_tasks, tmp_path):
    lora, full = str(two_tasks["L"]), str(two_tasks["A"])
    assert not any(
        k.startswith("backbone.model.base_model.model.model.conv_stem")
        for k in load_checkpoint(lora)["state_dict"]
    )
    config = load_checkpoint(full)["tl_lightning"]["config"]
    pretrained = pretrained_backbone(config).state_dict()
    peft_model = load_trained(lora).module  # the adapters folded in by PEFT's merge_and_unload
    peft_merged = peft_model.backbone.state_dict()
    merge_script.main(["--vectors", lora, "--weights", "1", "--out", str(tmp_path / "alone")])
    alone = load_checkpoint(tmp_path / "alone" / "head0.ckpt")
    assert alone["tl_lightning"]["config"]["adapter"] is None and "optimizer_states" not in alone
    adapted, untouched = "model.blocks.3.0.conv_pwl.weight", "model.blocks.3.0.conv_dw.weight"
    assert not torch.equal(peft_merged[adapted], pretrained[adapted])
    assert torch.equal(alone["state_dict"][f"backbone.{untouched}"], pretrained[untouched])
    images = _digit_batch()
    with torch.no_grad():
        reference = peft_model.eval()(images)
        torch.testing.assert_close(
            load_trained(tmp_path / "alone" / "head0.ckpt").module(images), reference, rtol=0, atol=1e-6
        )
    merge_script.main(
        ["--vectors", lora, full, "--weights", "1", "0.5", "--heads", full, "--out", str(tmp_path / "mixed")]
    )
    mixed = load_checkpoint(tmp_path / "mixed" / "head0.ckpt")["state_dict"]
    finetuned = load_checkpoint(full)["state_dict"]
    for key in (adapted, untouched):
        base = pretrained[key]
        expected = base + (1.0 * (peft_merged[key] - base) + 0.5 * (finetuned[f"backbone.{key}"] - base))
        torch.testing.assert_close(mixed[f"backbone.{key}"], expected, rtol=0, atol=1e-6)
