"""Measure what a fine-tuned language model forgets: perplexity on held-out general text."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler
from typing_extensions import override

from tl_lightning._modes import eval_mode


class LMRetention(Callback):
    """Log the perplexity of general text (the source task's stand-in) at every validation and test end.

    For each named probe set of token batches (dicts with ``input_ids``, ``attention_mask`` and
    ``labels``, ``-100`` where no loss is taken), the mean next-token cross-entropy over all labelled
    tokens is computed with the module in eval mode, without gradients, and logged as
    ``<prefix>/<name>_ppl``, with ``<prefix>/<name>_ppl_change``: the relative change from the
    perplexity of the model when the first fit started (``0.1`` = 10% higher, i.e. forgotten). That
    starting value is measured once and kept in checkpoints, so a resumed run reports changes from the
    same start. Every rank evaluates the whole probe set, so values need no synchronisation.

    Args:
        probe_data: ``{name: iterable of token batches}`` in a fixed order; ``None`` asks the trainer's
            datamodule for ``retention_dataloaders()`` in ``setup``.
        logits_forward: Method of the LightningModule mapping a token batch to logits ``(B, L, V)``.
        prefix: Metric names are ``<prefix>/...``; it also keys the checkpoint state.

    Raises:
        ValueError: If ``prefix`` is empty or a probe loader shuffles.
        AttributeError: In ``setup``, if the module lacks ``logits_forward`` or (with ``probe_data=None``)
            the datamodule lacks ``retention_dataloaders``.

    Example::

        probes = {"python": DataLoader(blocks, batch_size=8, collate_fn=collate)}
        trainer = Trainer(callbacks=[LMRetention(probes)])
    """

    def __init__(
        self,
        probe_data: Mapping[str, Iterable[Mapping[str, Tensor]]] | None = None,
        logits_forward: str = "forward",
        prefix: str = "source",
    ) -> None:
        super().__init__()
        if not prefix:
            raise ValueError("`prefix` must be a non-empty string, e.g. 'source'")
        _check_fixed_order(probe_data)
        self.probe_data = None if probe_data is None else dict(probe_data)
        self.logits_forward = logits_forward
        self.prefix = prefix
        self.start: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, self.logits_forward, None)):
            raise AttributeError(
                f"LMRetention(logits_forward={self.logits_forward!r}): {type(pl_module).__name__} "
                "has no such method"
            )
        if self.probe_data is None:
            datamodule = trainer.datamodule
            if not callable(getattr(datamodule, "retention_dataloaders", None)):
                raise AttributeError(
                    "LMRetention(probe_data=None) needs a datamodule with retention_dataloaders(); "
                    f"got {type(datamodule).__name__}"
                )
            self.probe_data = dict(datamodule.retention_dataloaders())
            _check_fixed_order(self.probe_data)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.start:
            self.start = {name: nll for name, nll in self.evaluate(pl_module).items()}

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(pl_module)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(pl_module)

    def _log(self, pl_module: LightningModule) -> None:
        for name, nll in self.evaluate(pl_module).items():
            values = {f"{self.prefix}/{name}_ppl": math.exp(nll)}
            if name in self.start:
                values[f"{self.prefix}/{name}_ppl_change"] = math.exp(nll - self.start[name]) - 1.0
            # identical on every rank already; syncing only keeps Lightning's DDP epoch-logging contract
            pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=True)

    def evaluate(self, pl_module: LightningModule) -> dict[str, float]:
        """``{name: mean token cross-entropy}`` of every probe set under the current weights."""
        forward = getattr(pl_module, self.logits_forward)
        results = {}
        with eval_mode(pl_module), torch.no_grad():
            for name, batches in (self.probe_data or {}).items():
                total, count = 0.0, 0
                for batch in batches:
                    batch = {k: v.to(pl_module.device) for k, v in batch.items() if isinstance(v, Tensor)}
                    logits = forward(batch)[:, :-1].float()
                    labels = batch["labels"][:, 1:]
                    total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
                    count += int((labels != -100).sum())
                if count == 0:
                    raise ValueError(f"the general text {name!r} has no labelled token to score")
                results[name] = total / count
        return results

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start": dict(self.start)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start = dict(state_dict.get("start") or {})


def _check_fixed_order(probe_data: Mapping[str, Iterable[Any]] | None) -> None:
    for name, loader in (probe_data or {}).items():
        if isinstance(loader, DataLoader) and isinstance(loader.sampler, RandomSampler):
            raise ValueError(
                f"probe_data[{name!r}] must iterate in a fixed order: build it with shuffle=False"
            )
