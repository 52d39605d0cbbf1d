"""Classification heads placed on top of a backbone's pooled features.

The pipeline supplies ``in_features`` (the backbone's feature size) and ``num_classes`` (the
data's class count), so head configs only hold the head's own choices.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def _check_sizes(in_features: int, num_classes: int) -> None:
    if in_features <= 0 or num_classes <= 1:
        raise ValueError(
            f"a head needs in_features > 0 and num_classes > 1, got {in_features}, {num_classes}"
        )


class LinearHead(nn.Sequential):
    """Dropout followed by one linear layer (a linear probe when the backbone is frozen).

    Args:
        in_features: Size of the backbone's features.
        num_classes: Number of target classes.
        dropout: Dropout probability on the features.

    Raises:
        ValueError: If a size is not positive or ``dropout`` is outside ``[0, 1)``.

    Example::

        head = LinearHead(in_features=1280, num_classes=10)
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        _check_sizes(in_features, num_classes)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head.dropout must be in [0, 1), got {dropout}")
        super().__init__(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


class MLPHead(nn.Sequential):
    """A multi-layer perceptron: ``[Linear -> GELU -> Dropout] * len(hidden) -> Linear``.

    Args:
        in_features: Size of the backbone's features.
        num_classes: Number of target classes.
        hidden: Width of each hidden layer; one integer is one hidden layer (``512`` = ``[512]``).
        dropout: Dropout probability after each hidden layer.

    Raises:
        ValueError: If ``hidden`` is not a positive integer or a non-empty list of them, or
            ``dropout`` is outside ``[0, 1)``.

    Example::

        head = MLPHead(in_features=1280, num_classes=10, hidden=(512,), dropout=0.2)
    """

    def __init__(
        self, in_features: int, num_classes: int, hidden: int | Sequence[int] = (512,), dropout: float = 0.2
    ) -> None:
        _check_sizes(in_features, num_classes)
        widths = list(hidden) if isinstance(hidden, Sequence) else [hidden]
        if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
            raise ValueError(
                f"head.hidden must be a positive integer (one hidden layer) or a non-empty list of them "
                f"(one layer each), e.g. head.hidden=512 or head.hidden=[512,256]; got {hidden!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head.dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_features
        for size in widths:
            layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        super().__init__(*layers, nn.Linear(width, num_classes))
