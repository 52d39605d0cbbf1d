"""``trainer=fsdp_cpu`` checkpoints: sharded directories written atomically, resume mid-schedule equal to
the straight run, and what a run produced loads without a process group (consolidated on load).

One launch of two gloo processes runs the pipeline three times (``fsdp_checkpoint_script.py``).
Before ``ShardedDataParallel.load_checkpoint``, resuming a staged unfreezing stopped on
``Missing key in checkpoint state_dict: optimizer_0.state...`` (Lightning asked for optimizer states of
parameters that were frozen when the checkpoint was written), and so did ``trainer.test`` on the best
checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tl_lightning.modules.sharding import is_sharded_checkpoint, readable_checkpoint
from tl_lightning.modules.transfer import TransferModule
from tl_lightning.run.inference import load_trained


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_checkpoint")
    script = Path(__file__).with_name("fsdp_checkpoint_script.py")
    command = [sys.executable, str(script), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "rank0.txt").is_file() and (out / "rank1.txt").is_file()
    return out


def _state(run: Path) -> dict:
    return torch.load(readable_checkpoint(run / "checkpoints" / "last.ckpt"), weights_only=True)


@pytest.mark.slow
def test_checkpoints_are_shard_directories_with_nothing_partial_left(runs):
    for name in ("straight", "cut", "resumed"):
        checkpoints = runs / name / "checkpoints"
        last = checkpoints / "last.ckpt"
        assert is_sharded_checkpoint(last)
        assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == []  # renamed, not left
        assert (runs / name / "metrics.json").is_file()


@pytest.mark.slow
def test_sharded_resume_mid_schedule_equals_straight_run(runs):
    straight, cut, resumed = (_state(runs / name) for name in ("straight", "cut", "resumed"))
    assert cut["epoch"] == 0 and resumed["global_step"] == straight["global_step"]
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    unequal = [
        k
        for k in straight["state_dict"]
        if not torch.equal(straight["state_dict"][k], resumed["state_dict"][k])
    ]
    assert unequal == []
    moved = [
        k for k in straight["state_dict"] if not torch.equal(straight["state_dict"][k], cut["state_dict"][k])
    ]
    assert any(k.startswith("backbone.") for k in moved), "the resumed part must train the backbone"
    final = [json.loads((runs / n / "metrics.json").read_text())["final"] for n in ("straight", "resumed")]
    assert final[0] == final[1]  # the last validation: same weights, same numbers


@pytest.mark.slow
def test_a_sharded_checkpoint_loads_for_predict_and_load_from_checkpoint(runs):
    last = runs / "straight" / "checkpoints" / "last.ckpt"
    weights = _state(runs / "straight")["state_dict"]
    module = TransferModule.load_from_checkpoint(last)
    trained = load_trained(last)  # what predict.py and export.py use
    for loaded in (module.state_dict(), trained.module.state_dict()):
        assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(module(images), trained.module(images))
