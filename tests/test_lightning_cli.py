"""``examples/lightning_cli.py``: the callbacks configured by ``class_path`` under Lightning's own CLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tl_lightning.callbacks import GradualUnfreeze

pytest.importorskip("jsonargparse", reason="the `cli` extra (pip install -e '.[cli]')")
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIG = EXAMPLES / "lightning_cli.yaml"


def _example():
    spec = importlib.util.spec_from_file_location("lightning_cli_example", EXAMPLES / "lightning_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _short(tmp_path: Path) -> list[str]:
    return [
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]


@pytest.mark.filterwarnings("ignore:.*milestone 2 \\(epoch\\) is never reached")
def test_the_yaml_config_unfreezes_on_schedule(tmp_path):
    cli = _example().main(["fit", "--config", str(CONFIG), "--trainer.max_epochs=2", *_short(tmp_path)])
    assert cli.trainer.global_step == 4
    unfreeze = next(c for c in cli.trainer.callbacks if isinstance(c, GradualUnfreeze))
    assert (unfreeze.unit, unfreeze.milestones, unfreeze.stage) == ("epoch", [1, 2], 1)
    blocks = {
        name: [p.requires_grad for n, p in cli.model.backbone.named_parameters() if n.startswith(name)]
        for name in ("model.0.", "model.1.")
    }
    assert blocks == {"model.0.": [False] * 3, "model.1.": [True] * 3}  # conv weight, BN weight and bias
    lrs = {g["name"]: g["lr"] for g in cli.trainer.optimizers[0].param_groups}  # LayerwiseLR's groups
    assert lrs == pytest.approx(
        {
            f"{group}{kind}": lr
            for group, lr in [("heads.target", 0.05), ("backbone.block1", 0.04), ("backbone.block0", 0.032)]
            for kind in ("", "/no_decay")
        }
    )
    first = cli.model.backbone.model[0][0].weight
    torch.manual_seed(0)  # the model's own seed (seed_everything: 0) builds the same starting weights
    assert torch.equal(first, _example().DigitsCNN().backbone.model[0][0].weight), "frozen block untouched"


def test_a_callback_argument_outside_its_choices_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("unit: epoch  # or step", "unit: epochs"))
    with pytest.raises(SystemExit) as stopped:
        _example().main(["fit", "--config", str(bad), *_short(tmp_path)])
    assert stopped.value.code != 0
    err = capsys.readouterr().err
    assert 'Parser key "unit"' in err and "Literal['epoch', 'step']" in err and "Got value: epochs" in err
