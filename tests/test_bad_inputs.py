"""Bad-input battery: each bad config, data, checkpoint or fault case stops before training with a
message naming the key or file, and loses nothing (files that existed are untouched, no checkpoint
or ``metrics.json`` is written).

Most cases run in-process through ``train(cfg)`` on the composed config; the ``cli`` cases run
``python train.py`` (slow: a fresh interpreter each) and check the exit status and the last line.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from tl_lightning.modules import MLPHead
from tl_lightning.run.config_checks import check_config
from tl_lightning.run.lock import LOCK_NAME, RunDirectoryLocked
from tl_lightning.run.pipeline import rebuild_module, train

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    """``overrides`` may hold ``{tmp}`` (the test's tmp dir); ``prepare(tmp)`` creates input files."""

    overrides: list[str]
    error: type[BaseException]
    message: str
    prepare: Callable[[Path], None] = field(default=lambda tmp: None)


def _truncated_checkpoint(tmp: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 0}, tmp / "good.ckpt")
    (tmp / "cut.ckpt").write_bytes((tmp / "good.ckpt").read_bytes()[:-500])


class _Payload:
    def __reduce__(self):
        return (print, ("this checkpoint ran code",))


def _pickle_checkpoint(tmp: Path) -> None:
    torch.save({"state_dict": {}, "payload": _Payload()}, tmp / "evil.ckpt")


def _text_files(tmp: Path) -> None:
    (tmp / "notes.ckpt").write_text("not a checkpoint\n")
    (tmp / "fisher.safetensors").write_text("not a safetensors file\n")


def _locked_run_dir(tmp: Path) -> None:
    run = tmp / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"from": "the other run"}')
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "earlier"}
    (run / LOCK_NAME).write_text(json.dumps(holder))


CONFIG = {
    "lr_string": Case(["module.optimizer.lr=abc"], ValueError, r"module\.optimizer\.lr must be a number > 0"),
    "lr_negative": Case(["module.optimizer.lr=-0.1"], ValueError, r"module\.optimizer\.lr"),
    "max_epochs_string": Case(
        ["trainer.max_epochs=x"], ValueError, r"trainer\.max_epochs must be an integer"
    ),
    "max_epochs_zero": Case(["trainer.max_epochs=0"], ValueError, r"trainer\.max_epochs.*untrained model"),
    "head_hidden_string": Case(["head=mlp", "head.hidden=a"], ValueError, r"head\.hidden must be an integer"),
    "head_hidden_list": Case(["head=mlp", "head.hidden=[64,b]"], ValueError, r"head\.hidden.*\[64, 'b'\]"),
    "seed_negative": Case(["seed=-1"], ValueError, r"seed must be an integer in \[0, 4294967295\], got -1"),
    "batch_size_zero": Case(["data.batch_size=0"], ValueError, r"data\.batch_size must be an integer >= 1"),
    "label_smoothing_one": Case(["module.label_smoothing=1.0"], ValueError, r"module\.label_smoothing"),
    "two_weight_decays": Case(
        ["+module.optimizer.weight_decay=0.1"],
        ValueError,
        r"module\.optimizer\.weight_decay.*module\.weight_decay",
    ),
    "monitor_typo": Case(["monitor=val/accuracy"], ValueError, r"monitor='val/accuracy'.*'val/acc'"),
    "monitor_mode_worst": Case(
        ["monitor=val/loss", "monitor_mode=max"], ValueError, r"worst.*monitor_mode=min"
    ),
    "monitor_mode_unknown": Case(["monitor_mode=highest"], ValueError, r"monitor_mode='highest'.*'auto'"),
    "gradual_unfreeze_short": Case(
        ["strategy=gradual_unfreeze", "trainer.max_epochs=3", "allow_short_schedule=false"],
        ValueError,
        r"callbacks\.gradual_unfreeze\.milestones=\[1, 2, 3\].*trainer\.max_epochs=3.*allow_short_schedule",
    ),
    "lp_ft_short": Case(
        ["strategy=lp_ft", "trainer.max_epochs=2", "allow_short_schedule=false"],
        ValueError,
        r"milestones=\[2\].*trainer\.max_epochs=2.*strategy=lp_ft",
    ),
    "fisher_missing": Case(
        ["strategy=ewc", "+callbacks.ewc.fisher_path={tmp}/missing.safetensors"],
        FileNotFoundError,
        r"callbacks\.ewc\.fisher_path=.*missing\.safetensors",
    ),
    "fisher_corrupt": Case(
        ["strategy=ewc", "+callbacks.ewc.fisher_path={tmp}/fisher.safetensors"],
        ValueError,
        r"callbacks\.ewc\.fisher_path=.*fisher\.safetensors.*not a readable safetensors",
        _text_files,
    ),
    "no_target": Case(["+callbacks.broken.patience=3"], ValueError, r"callbacks\.broken has no _target_"),
    "head_mismatch": Case(["+head.in_features=77"], ValueError, r"head\.in_features=77"),
}
DATA = {
    "missing_dir": Case(["data=image_folder", "data.root={tmp}/no_images"], FileNotFoundError, r"data\.root"),
    "too_few_examples": Case(["data.train_per_class=1000"], ValueError, r"data\.train_per_class=1000"),
}
CHECKPOINT = {
    "missing": Case(["ckpt_path={tmp}/none.ckpt"], FileNotFoundError, r"ckpt_path=.*none\.ckpt"),
    "truncated": Case(
        ["ckpt_path={tmp}/cut.ckpt"], ValueError, r"cut\.ckpt.*truncated", _truncated_checkpoint
    ),
    "text_file": Case(["ckpt_path={tmp}/notes.ckpt"], ValueError, r"notes\.ckpt", _text_files),
    "pickle_payload": Case(
        ["ckpt_path={tmp}/evil.ckpt"], ValueError, r"evil\.ckpt.*refusing", _pickle_checkpoint
    ),
    "other_model": Case(
        ["ckpt_path={tmp}/good.ckpt"], ValueError, r"good\.ckpt.*another model", _truncated_checkpoint
    ),
}
FAULT = {
    "locked_run_dir": Case(
        [], RunDirectoryLocked, r"run'? is in use by another run \(pid \d+", _locked_run_dir
    ),
}
CASES = {
    f"{kind}-{name}": case
    for kind, group in (("config", CONFIG), ("data", DATA), ("checkpoint", CHECKPOINT), ("fault", FAULT))
    for name, case in group.items()
}


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _assert_nothing_lost(tmp: Path, before: dict[str, str]) -> None:
    after = _snapshot(tmp)
    assert {k: after.get(k) for k in before} == before, "a file that existed was changed or deleted"
    created = sorted(set(after) - set(before))
    assert not [p for p in created if p.endswith((".ckpt", "metrics.json"))], created


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_stops_before_training(make_cfg, tmp_path, case):
    case.prepare(tmp_path)
    cfg = make_cfg(*(o.format(tmp=tmp_path) for o in case.overrides))
    before = _snapshot(tmp_path)
    with pytest.raises((case.error, InstantiationException), match=case.message) as raised:
        train(cfg)
    assert isinstance(raised.value, case.error) or case.error.__name__ in str(raised.value)
    _assert_nothing_lost(tmp_path, before)
    if case is not FAULT["locked_run_dir"]:
        assert not (tmp_path / "run" / LOCK_NAME).exists(), "the lock is released"


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory that cannot be written: a read-only tmpfs as root (permissions do not bind root),
    else a ``chmod 555`` directory."""
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(directory)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_read_only_output_dir_says_so(make_cfg, read_only_dir):
    cfg = make_cfg(f"paths.output_dir={read_only_dir / 'run'}")
    with pytest.raises(PermissionError, match=r"paths\.output_dir=.*ro/run.*(read-only|not writable)"):
        train(cfg)


def _cli(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "backbone=small_cnn", "callbacks.rich_progress_bar=null", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.slow
def test_cli_read_only_output_dir_says_so_in_the_last_line(read_only_dir):
    result = _cli(f"hydra.run.dir={read_only_dir / 'run'}")
    assert result.returncode != 0
    assert "read-only" in _last_line(result) and "hydra.run.dir" in _last_line(result), _last_line(result)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["module.optimizer.lr=abc"], "module.optimizer.lr"), (["seed=-1"], "seed must be")],
    ids=["lr_string", "seed_negative"],
)
def test_cli_bad_value_exits_non_zero_naming_the_key(tmp_path, overrides, message):
    result = _cli(f"hydra.run.dir={tmp_path / 'run'}", *overrides)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("hidden", ["7", "[7]", "[7,5]", "0", "[0]", "[]", "2.5", "true", "[7,x]"])
def test_every_head_hidden_the_config_check_allows_builds_that_head(make_cfg, hidden):
    """``head.hidden`` takes what its check says ("an integer >= 1 (or a list of them)"): a scalar is one
    hidden layer; a form refused is refused by the check and by ``MLPHead`` alike, naming the key."""
    cfg = make_cfg("backbone=small_cnn", "head=mlp", f"head.hidden={hidden}")
    value = OmegaConf.to_container(cfg, resolve=True)["head"]["hidden"]
    try:
        check_config(cfg)
    except ValueError as error:
        assert "head.hidden" in str(error)
        with pytest.raises(ValueError, match=r"head\.hidden must be a positive integer .* got"):
            MLPHead(16, 3, hidden=value)
        return
    head = rebuild_module(OmegaConf.to_container(cfg, resolve=True), num_classes=3).heads["target"]
    widths = [layer.out_features for layer in head if isinstance(layer, torch.nn.Linear)]
    assert widths == [*([value] if isinstance(value, int) else value), 3]


def test_a_scalar_head_hidden_trains(make_cfg, tmp_path):
    train(make_cfg("backbone=small_cnn", "strategy=full_finetune", "head=mlp", "head.hidden=7"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
