"""Measure how much of the source task a fine-tuned model still knows (catastrophic forgetting)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler
from typing_extensions import override

from tl_lightning._modes import eval_mode
from tl_lightning.callbacks._source import source_method


class SourceRetention(Callback):
    """Evaluate the source head on a fixed probe set at the end of every validation epoch.

    With ``has_labels=True`` the probe carries real source labels and ``<prefix>/acc`` is logged.
    Otherwise the reference is the *original* model: its source logits on the probe set are captured
    once, at the start of the first fit (or given as ``reference``), and kept in checkpoints; then
    ``<prefix>/agreement`` (top-1 agreement with the original predictions) and ``<prefix>/kl``
    (``KL(p_original || p_current)``, averaged over probe samples) are logged. The probe runs in eval
    mode without gradients; each sub-module's training flag is restored afterwards. Every rank
    evaluates the whole probe set, so the values need no synchronisation.

    Args:
        probe_data: Iterable of ``x`` or ``(x, y, ...)`` batches in a fixed order (no shuffling);
            ``None`` asks the trainer's datamodule for its ``probe_dataloader()`` in ``setup``, so a
            data module can build the probe with the same preprocessing as its other splits.
        source_forward: Method of the LightningModule that returns the source task's logits.
        has_labels: Whether the batches' second element holds source-task labels.
        reference: The original model's source logits ``[N, C]`` on the probe set, in probe order;
            captured at fit start when ``None``. Unused with ``has_labels=True``.
        prefix: Metric names are ``<prefix>/<metric>``; it also keys the instance's checkpoint state,
            so several instances (one per probe set or source head) need different prefixes.

    Raises:
        ValueError: If ``probe_data`` shuffles, ``reference`` is not a 2-D tensor, or ``prefix`` is empty.
        AttributeError: In ``setup``, if the module has no ``source_forward`` method, or
            ``probe_data`` is ``None`` and the datamodule has no ``probe_dataloader``.
        TypeError: While probing, if ``has_labels=True`` but a batch has no labels.

    Example::

        probe = DataLoader(target_val_images, batch_size=64)
        trainer = Trainer(callbacks=[SourceRetention(probe, source_forward="source_logits")])
    """

    def __init__(
        self,
        probe_data: Iterable[Any] | None = None,
        source_forward: str = "source_logits",
        has_labels: bool = False,
        reference: Tensor | None = None,
        prefix: str = "source",
    ) -> None:
        super().__init__()
        _check_fixed_order(probe_data)
        if not prefix:
            raise ValueError("`prefix` must be a non-empty string, e.g. 'source'")
        if reference is not None and reference.dim() != 2:
            raise ValueError(
                f"`reference` must be logits of shape [N, C], got shape {tuple(reference.shape)}"
            )
        self.probe_data = probe_data
        self.source_forward = source_forward
        self.has_labels = has_labels
        self.prefix = prefix
        self._reference = None if reference is None else reference.detach().float().cpu()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        source_method(pl_module, self.source_forward, type(self).__name__)
        if self.probe_data is None:
            datamodule = trainer.datamodule
            if not callable(getattr(datamodule, "probe_dataloader", None)):
                raise AttributeError(
                    f"SourceRetention(probe_data=None) needs a datamodule with probe_dataloader(); "
                    f"got {type(datamodule).__name__}"
                )
            self.probe_data = datamodule.probe_dataloader()
            _check_fixed_order(self.probe_data)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.has_labels and self._reference is None:
            self._reference = torch.cat([logits.float().cpu() for logits, _ in self._probe(pl_module)])

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (not self.has_labels and self._reference is None):
            return
        for name, value in self.evaluate(pl_module).items():
            # identical on every rank already; syncing only keeps Lightning's DDP epoch-logging contract
            pl_module.log(f"{self.prefix}/{name}", value, on_step=False, on_epoch=True, sync_dist=True)

    def evaluate(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """``{"acc": ...}`` with labels, else ``{"agreement": ..., "kl": ...}`` against the reference.

        Raises:
            ValueError: If there is no reference yet, or the probe set does not match its size.
        """
        outputs = self._probe(pl_module)
        if self.has_labels:
            correct = sum((logits.argmax(-1) == y.to(logits.device)).sum() for logits, y in outputs)
            return {"acc": correct / sum(len(y) for _, y in outputs)}
        if self._reference is None:
            raise ValueError("no reference logits yet: pass `reference`, or fit first to capture them")
        logits = torch.cat([out for out, _ in outputs]).float()
        if len(logits) != len(self._reference):
            raise ValueError(f"the probe set has {len(logits)} samples, the reference {len(self._reference)}")
        reference = self._reference.to(logits.device)
        kl = F.kl_div(
            logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"
        )
        return {"agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean(), "kl": kl}

    def _probe(self, pl_module: LightningModule) -> list[tuple[Tensor, Tensor | None]]:
        """``(source logits, labels or None)`` per probe batch, in eval mode, without gradients."""
        forward = source_method(pl_module, self.source_forward, type(self).__name__)
        with eval_mode(pl_module), torch.no_grad():
            return [
                (forward(x.to(pl_module.device)), y)
                for x, y in (_split(batch, self.has_labels) for batch in self.probe_data)
            ]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self._reference is None else {"reference": self._reference}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "reference" in state_dict:
            self._reference = state_dict["reference"]


def _check_fixed_order(probe_data: Iterable[Any] | None) -> None:
    if isinstance(probe_data, DataLoader) and isinstance(probe_data.sampler, RandomSampler):
        raise ValueError(
            "`probe_data` must iterate in a fixed order: build its DataLoader with shuffle=False"
        )


def _split(batch: Any, has_labels: bool) -> tuple[Tensor, Tensor | None]:
    x = batch if isinstance(batch, Tensor) else batch[0]
    if not has_labels:
        return x, None
    if isinstance(batch, Tensor) or len(batch) < 2:
        raise TypeError("`has_labels=True` needs (x, y) probe batches")
    return x, batch[1]
