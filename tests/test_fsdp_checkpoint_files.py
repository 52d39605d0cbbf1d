"""What a ``trainer=fsdp|fsdp_cpu`` checkpoint directory is used for besides resuming under sharding: a
source backbone, a read-only copy, and a resume under another trainer, which is refused before training.

The directory is written here by DCP in one process (no process group): the same layout
(``.metadata``, ``__0_0.distcp``, ``meta.pt``) as a sharded run's, at no launch cost.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tl_lightning.backbones import small_cnn
from tl_lightning.modules.heads import LinearHead
from tl_lightning.modules.sharding import is_sharded_checkpoint, readable_checkpoint
from tl_lightning.run.config_checks import check_config
from tl_lightning.run.source_checkpoint import from_checkpoint


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A sharded checkpoint directory of a small_cnn ``TransferModule`` (backbone + target head)."""
    torch.manual_seed(0)
    backbone = small_cnn()
    head = LinearHead(backbone.num_features, 3)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state |= {f"heads.target.{k}": v for k, v in head.state_dict().items()}
    path = tmp_path / "last.ckpt"
    dcp.save({"state_dict": state}, checkpoint_id=path, no_dist=True)
    torch.save({"epoch": 0, "global_step": 2}, path / "meta.pt")
    assert is_sharded_checkpoint(path)
    return path


def test_a_sharded_checkpoint_is_a_source_backbone(sharded):
    """``backbone=source_checkpoint`` rejected the directory as missing (it asked for a file)."""
    saved = torch.load(readable_checkpoint(sharded), weights_only=True)["state_dict"]
    backbone = from_checkpoint(str(sharded), small_cnn())
    head = backbone.pop_source_head()
    assert all(torch.equal(v, saved[f"backbone.{k}"]) for k, v in backbone.state_dict().items())
    assert torch.equal(head[1].weight, saved["heads.target.1.weight"])


def test_resuming_a_sharded_checkpoint_without_sharding_is_refused(make_cfg, sharded):
    """It passed ``check_config`` and stopped in ``torch.load`` with ``IsADirectoryError``."""
    with pytest.raises(ValueError, match=r"ckpt_path=.* is a sharded checkpoint .*trainer=fsdp\|fsdp_cpu"):
        check_config(make_cfg("trainer=cpu", f"ckpt_path={sharded}"))
    check_config(make_cfg("trainer=fsdp_cpu", f"ckpt_path={sharded}"))  # what resumes it


@pytest.fixture
def read_only(sharded):
    """``sharded`` made immutable (``chattr +i``: root writes through a plain ``chmod``)."""
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(sharded)]).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a filesystem with attributes)")
    yield sharded
    subprocess.run(["chattr", "-i", str(sharded)], check=True)


def test_a_read_only_sharded_checkpoint_is_consolidated_in_the_cache(read_only, tmp_path, monkeypatch):
    """The consolidated file was written inside the directory only: a read-only copy could not be read."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    readable = readable_checkpoint(read_only)
    assert readable.parent == tmp_path / "cache" / "tl_lightning"
    assert torch.load(readable, weights_only=True)["global_step"] == 2
    assert readable_checkpoint(read_only) == readable  # cached: not rebuilt
    backbone = from_checkpoint(str(read_only), small_cnn())  # and what reads through it works
    assert backbone.pop_source_head() is not None
