import json
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback
from torch import nn
from torch.utils.data import TensorDataset

from tl_lightning.backbones import small_cnn, timm_backbone
from tl_lightning.callbacks import Freeze, GradualUnfreeze, LayerwiseLR
from tl_lightning.data import DigitsDataModule
from tl_lightning.data.domain_pair import DomainPairDataModule
from tl_lightning.modules.heads import LinearHead
from tl_lightning.modules.transfer import TransferModule
from tl_lightning.run.feature_cache import (
    cache_applies,
    cache_key,
    evaluation_cache_applies,
    extract_features,
)
from tl_lightning.run.pipeline import train

LONGER = [
    "++trainer.limit_train_batches=12",
    "++trainer.limit_val_batches=4",
    "++trainer.limit_test_batches=4",
    "trainer.max_epochs=2",
]


def _run(make_cfg, *overrides):
    cfg = make_cfg("strategy=linear_probe", *LONGER, *overrides, run=overrides[0].replace("=", "-"))
    train(cfg)
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def _run_fast(make_cfg, *overrides):
    cfg = make_cfg("strategy=linear_probe", *overrides, run=overrides[0].replace("=", "-"))
    train(cfg)
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_cached_linear_probe_matches_uncached(make_cfg, tmp_path):
    uncached = _run(make_cfg, "feature_cache=off")
    cached = _run(make_cfg, "feature_cache=auto")
    assert uncached["feature_cache"] == "off" and cached["feature_cache"] == "memory"
    # the cache leaves the run's RNG stream intact, so only float summation order differs
    assert cached["test"]["test/acc"] == pytest.approx(uncached["test"]["test/acc"], abs=0.01)
    assert cached["test"]["test/loss"] == pytest.approx(uncached["test"]["test/loss"], rel=1e-3)


def test_augmented_linear_probe_evaluates_on_cached_features_with_the_same_results(make_cfg):
    """Training on random augmentations, validation and test on cached features: the same weights and
    the same metrics as running the frozen backbone at every evaluation (before issue 25 such a run
    was ``off``)."""
    small = ("data.augment=true", "backbone=small_cnn", "backbone.pretrained=false")
    uncached, cached = (
        _run(make_cfg, "feature_cache=off", *small),
        _run(make_cfg, "feature_cache=auto", *small),
    )
    assert uncached["feature_cache"] == "off" and cached["feature_cache"] == "evaluation"
    for split in ("final", "test"):
        for name, value in uncached[split].items():
            assert cached[split][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (split, name)
    weights = [
        torch.load(Path(m["best_checkpoint"]).with_name("last.ckpt"), weights_only=True)["state_dict"]
        for m in (uncached, cached)
    ]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:  # training never saw the cache (float-level tolerance: summation order)
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=linear_probe", "data.augment=true"],
        ["strategy=full_finetune"],
        ["strategy=gradual_unfreeze", "callbacks.gradual_unfreeze.groups_per_milestone=1"],
    ],
    ids=["random_augmentation", "backbone_trains", "backbone_unfreezes"],
)
def test_cache_is_never_used_when_features_would_change(make_cfg, overrides):
    cfg = make_cfg(*overrides, "backbone=small_cnn", "backbone.pretrained=false")
    train(cfg)
    # a frozen backbone on augmented images: training runs it, evaluation (fixed inputs) is cached
    expected = "evaluation" if "data.augment=true" in overrides else "off"
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["feature_cache"] == expected
    with pytest.raises(ValueError, match="feature_cache=memory needs a frozen backbone"):
        train(make_cfg(*overrides, "backbone=small_cnn", "feature_cache=memory"))


def test_disk_cache_is_keyed_by_weights_and_inputs(tmp_path):
    backbone = small_cnn()
    images = torch.randn(10, 3, 16, 16)
    data = TensorDataset(images, torch.arange(10))
    first = extract_features(backbone, data, 4, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = extract_features(backbone, data, 4, tmp_path)
    assert torch.equal(first.tensors[0], again.tensors[0])
    assert len(list(tmp_path.glob("*.safetensors"))) == 1, "second call is a cache hit"
    changed = images.clone()
    changed[0, 0, 0, 0] += 1
    extract_features(backbone, TensorDataset(changed, torch.arange(10)), 4, tmp_path)
    with torch.no_grad():
        backbone.model[0][0].weight.add_(1e-3)
    extract_features(backbone, data, 4, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3, "new inputs and new weights get new keys"
    assert backbone.training, "train mode restored"


def test_disk_cache_is_keyed_by_architecture_settings(tmp_path):
    """Same weights, same inputs, ``global_pool`` max vs avg: different keys, each gets its own features."""
    torch.manual_seed(0)
    max_pool = timm_backbone("resnet18", pretrained=False, global_pool="max")
    avg_pool = timm_backbone("resnet18", pretrained=False, global_pool="avg")
    avg_pool.load_state_dict(max_pool.state_dict())
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert cache_key(max_pool, data, 2) != cache_key(avg_pool, data, 2)
    extract_features(max_pool, data, 2, tmp_path)
    served = extract_features(avg_pool, data, 2, tmp_path).tensors[0]
    with torch.no_grad():
        expected = avg_pool.eval()(data.tensors[0])
    torch.testing.assert_close(served, expected)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_disk_cache_is_keyed_by_build_config_and_preprocessing(tmp_path):
    backbone = small_cnn()
    data = TensorDataset(torch.randn(4, 3, 16, 16), torch.arange(4))
    keys = {
        cache_key(backbone, data, 2, {"backbone": {"drop_rate": 0.0}}),
        cache_key(backbone, data, 2, {"backbone": {"drop_rate": 0.2}}),
        cache_key(backbone, data, 2, {"backbone": {"drop_rate": 0.0}, "data_config": {"mean": [0.5]}}),
    }
    assert len(keys) == 3
    assert cache_key(backbone, data, 2) == cache_key(backbone, data, 3), "batch size is not part of the key"


def _module() -> TransferModule:
    backbone = small_cnn(channels=(4, 8))
    return TransferModule(backbone, LinearHead(8, 10), 10, torch.optim.SGD)


class _DeclaresUnfreezing(Callback):
    changes_trainability = True


@pytest.mark.parametrize(
    ("callbacks", "augment", "expected"),
    [
        (lambda: [Freeze("backbone")], False, True),
        (
            lambda: [Freeze(["backbone.model.0", "backbone.model.1"]), LayerwiseLR("backbone", decay=0.5)],
            False,
            True,
        ),
        (lambda: [Freeze("backbone")], True, False),
        (lambda: [], False, False),
        (lambda: [Freeze("backbone.model.0")], False, False),
        (lambda: [Freeze("backbone", train_bn=True)], False, False),
        (lambda: [Freeze("backbone"), GradualUnfreeze(milestones=[1])], False, False),
        (lambda: [Freeze("backbone"), _DeclaresUnfreezing()], False, False),
        (lambda: [Freeze("backbone"), BackboneFinetuning(unfreeze_backbone_at_epoch=1)], False, False),
    ],
    ids=[
        "frozen",
        "frozen_in_parts_lr_only",
        "augmented",
        "not_frozen",
        "partly_frozen",
        "norms_train",
        "gradual_unfreeze",
        "declared_by_any_callback",
        "lightning_finetuning",
    ],
)
def test_cache_applies_only_when_the_whole_backbone_stays_frozen(callbacks, augment, expected):
    data = DigitsDataModule(small_cnn().data_config, image_size=8, augment=augment)
    assert cache_applies(callbacks(), data, _module()) is expected


@pytest.fixture
def fine_thread_switching():
    """Interleave threads every 10 microseconds (instead of 5 ms) for the duration of a test."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("fine_thread_switching")
def test_concurrent_writers_of_one_key_never_collide(tmp_path):
    """DDP ranks extract the same split at once: each writes its own temp file, then renames.

    With one shared temp name, 40 rounds of 4 threads lose a rename (FileNotFoundError) 3-5 times.
    """
    backbone = nn.Flatten()
    errors, barrier = [], threading.Barrier(4)

    def extract(round_data):
        barrier.wait()
        try:
            extract_features(backbone, round_data, 64, tmp_path)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    for round_index in range(40):
        round_data = TensorDataset(torch.full((64, 3, 32, 32), float(round_index)), torch.arange(64))
        threads = [threading.Thread(target=extract, args=(round_data,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert extract_features(backbone, round_data, 64, tmp_path).tensors[0].eq(round_index).all()
    assert errors == []
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".safetensors"] * 40, "no temp file left"


PEAK_RSS_SCRIPT = """
import sys, tempfile
import torch
from torch import nn
from torch.utils.data import Dataset
from tl_lightning.run.feature_cache import extract_features

class Images(Dataset):  # generated on demand: only what the extraction holds is in memory
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(index)), index % 10

pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
extract_features(pool, torch.utils.data.Subset(Images(), range(64)), 64)  # warm up torch's allocations


def status_kib(field):  # VmRSS: resident now; VmHWM: peak since the last reset (ru_maxrss survives exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # reset VmHWM to the current resident set size
before = status_kib("VmRSS")
extract_features(pool, Images(), 64, tempfile.mkdtemp() if sys.argv[1] == "disk" else None)
print((status_kib("VmHWM") - before) / 1024)
"""


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="reads the peak resident set from /proc"
)
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_extraction_holds_one_batch_not_the_split(mode):
    """1,000 images at 128 px are 188 MiB of inputs; hashing and extraction hold one batch (12 MiB)."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, mode], capture_output=True, text=True, check=True
    )
    peak_growth_mib = float(result.stdout.split()[-1])
    assert peak_growth_mib < 80, f"peak RSS grew by {peak_growth_mib:.0f} MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_features_are_computed_on_the_given_device(tmp_path):
    backbone = small_cnn()
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.arange(8))
    seen = []
    backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].device.type))
    features = extract_features(backbone, data, 4, tmp_path, device="cuda").tensors[0]
    assert seen == ["cuda", "cuda"] and features.device.type == "cpu"
    assert next(backbone.parameters()).device.type == "cpu", "the backbone goes back where it was"


# --- features come from the weights that run, not those the run was built with --------------------


def _other_backbone_checkpoint(run_checkpoint: Path, destination: Path) -> Path:
    """``run_checkpoint`` with another backbone (as scripts/merge.py writes one) and no ModelCheckpoint
    state (whose best path would send the test back to the original weights), saved to ``destination``."""
    stored = torch.load(run_checkpoint, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for key, value in stored["state_dict"].items():
        if key.startswith("backbone.") and value.is_floating_point() and "running_var" not in key:
            stored["state_dict"][key] = value + 0.3 * torch.randn(value.shape, generator=generator)
    stored["callbacks"] = {
        k: v for k, v in stored["callbacks"].items() if not k.startswith("ModelCheckpoint")
    }
    torch.save(stored, destination)
    return destination


def test_a_run_loading_ckpt_path_is_served_the_checkpoints_features(make_cfg, tmp_path):
    """Lightning calls ``datamodule.setup()`` before it loads ``ckpt_path``: the cache must not serve the
    built backbone's features to a test of the checkpoint's backbone (a merged checkpoint's test)."""
    probe = ["backbone=small_cnn", "backbone.channels=[8,16]", "strategy=linear_probe"]
    train(make_cfg(*probe, run="probe"))
    other = _other_backbone_checkpoint(
        tmp_path / "probe" / "checkpoints" / "last.ckpt", tmp_path / "other.ckpt"
    )
    tested = {}
    for mode in ("auto", "off"):
        cfg = make_cfg(*probe, f"ckpt_path={other}", f"feature_cache={mode}", run=f"test-{mode}")
        train(cfg)
        tested[mode] = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert tested["auto"]["feature_cache"] == "memory" and tested["off"]["feature_cache"] == "off"
    pretrained = json.loads((tmp_path / "probe" / "metrics.json").read_text())["test"]["test/loss"]
    assert tested["off"]["test"]["test/loss"] != pytest.approx(pretrained, abs=1e-3)  # the weights differ
    assert tested["auto"]["test"]["test/loss"] == pytest.approx(tested["off"]["test"]["test/loss"], rel=1e-5)


def test_cached_features_follow_the_backbones_weights():
    from tl_lightning.run.feature_cache import CachedFeatureDataModule

    backbone = small_cnn(channels=(8, 16), input_size=16).eval()
    data = CachedFeatureDataModule(
        DigitsDataModule(backbone.data_config, image_size=16, batch_size=64), backbone
    )
    first = data.features("test")
    assert data.features("test") is first  # unchanged weights: nothing extracted again
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.add_(0.1)
    again = data.features("test")
    images = torch.stack([image for image, _ in data.source.test_set])
    with torch.no_grad():
        assert torch.allclose(again.tensors[0], backbone(images), atol=1e-5)
    assert not torch.allclose(again.tensors[0], first.tensors[0], atol=1e-3)
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.sub_(0.1)  # modified, but back to the weights the first features came from
    restored = data.features("test")
    assert torch.allclose(restored.tensors[0], first.tensors[0], atol=1e-5)


def test_the_cache_feeds_a_bf16_true_backbone_inputs_of_its_dtype(make_cfg):
    """``precision=bf16-true`` casts the model before the loaders are built: extraction follows its dtype."""
    cfg = make_cfg(
        "backbone=small_cnn",
        "backbone.channels=[8,16]",
        "strategy=linear_probe",
        "+trainer.precision=bf16-true",
    )
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["feature_cache"] == "memory" and metrics["test"]["test/loss"] is not None


def test_evaluation_cache_applies_only_to_one_validation_and_one_test_split():
    """Domain adaptation (validation and test on two domains) keeps running the backbone: ``auto``
    resolved to ``evaluation`` there once, and the wrapper failed on the pair's missing ``data_config``."""
    config = small_cnn().data_config
    frozen, module = [Freeze("backbone")], _module()
    plain = DigitsDataModule(config, image_size=8, augment=True)
    pair = DomainPairDataModule(config, partial(DigitsDataModule, augment=True), partial(DigitsDataModule))
    assert evaluation_cache_applies(frozen, plain, module)
    assert not evaluation_cache_applies(frozen, pair, module)
    assert not evaluation_cache_applies([], plain, module)


def test_bf16_mixed_evaluation_on_cached_features_matches_running_the_backbone(make_cfg):
    """Under ``precision=bf16-mixed`` a validation step runs the backbone under autocast; the cached
    features are extracted under the same autocast, so the metrics equal the uncached run's."""
    small = (
        "data.augment=true",
        "backbone=small_cnn",
        "backbone.pretrained=false",
        "+trainer.precision=bf16-mixed",
    )
    uncached, cached = (
        _run_fast(make_cfg, mode, *small) for mode in ("feature_cache=off", "feature_cache=auto")
    )
    assert cached["feature_cache"] == "evaluation"
    for split in ("final", "test"):
        for name, value in uncached[split].items():
            assert cached[split][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (split, name)
