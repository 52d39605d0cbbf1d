"""The package's callbacks under Lightning's own CLI: a small CNN on the bundled digits, from a YAML file.

``tl_lightning.callbacks`` are plain Lightning callbacks, so a ``LightningCLI`` takes them by
``class_path`` under ``trainer.callbacks`` and checks their arguments against the signatures
(``unit: epochs`` is named with the allowed ``'epoch'`` and ``'step'``)::

    pip install -e ".[cli]"
    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml --trainer.max_epochs=5
    python examples/lightning_cli.py fit --print_config   # every argument, with its default

Nothing is downloaded: the digits ship inside scikit-learn and ``small_cnn`` starts from random weights.
"""

from __future__ import annotations

from functools import partial

import torch
from lightning.pytorch.cli import LightningCLI

from tl_lightning.backbones import small_cnn
from tl_lightning.data import DigitsDataModule
from tl_lightning.modules.heads import LinearHead
from tl_lightning.modules.transfer import TransferModule


class DigitsCNN(TransferModule):
    """A ``TransferModule`` over ``small_cnn`` and a linear head, with arguments a CLI can read.

    Args:
        channels: Output channels of each conv block of ``small_cnn`` (one layer group each,
            ``backbone.model.0`` ...).
        num_classes: Number of classes.
        lr: SGD learning rate (momentum 0.9).
        weight_decay: Decoupled weight decay of the module's parameter groups.

    Example::

        module = DigitsCNN(channels=(8, 16), lr=0.05)
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (8, 16),
        num_classes: int = 10,
        lr: float = 0.05,
        weight_decay: float = 0.0,
    ) -> None:
        backbone = small_cnn(tuple(channels))
        super().__init__(
            backbone,
            LinearHead(backbone.num_features, num_classes),
            num_classes,
            partial(torch.optim.SGD, lr=lr, momentum=0.9),
            weight_decay=weight_decay,
        )


def main(args: list[str] | None = None) -> LightningCLI:
    """Run ``LightningCLI(DigitsCNN, DigitsDataModule)`` on ``args`` (default: the command line).

    Returns:
        The CLI, holding the ``trainer`` and ``model`` it ran.

    Example::

        cli = main(["fit", "--config", "examples/lightning_cli.yaml", "--trainer.max_epochs=1"])
    """
    return LightningCLI(DigitsCNN, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
