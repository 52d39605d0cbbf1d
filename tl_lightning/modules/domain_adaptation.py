"""``DomainAdaptationModule``: a ``TransferModule`` trained on labelled source and unlabelled target data."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tl_lightning.modules.transfer import TransferModule
from tl_lightning.objectives.domain import DEFAULT_SCALES, dann_coefficient, gaussian_mmd, grad_reverse

ADAPTATIONS = ("none", "dann", "mmd")


class DomainAdaptationModule(TransferModule):
    """Source cross-entropy plus an adaptation term on the pooled backbone features.

    Training batches are ``{"source": (images, labels), "target": images}``
    (:class:`~tl_lightning.data.DomainPairDataModule`); target labels never enter a training step.
    The loss is ``CE(source) + weight * term``:

    * ``none``: no term, and the target images are not even forwarded (the source-only baseline).
    * ``dann``: binary cross-entropy of a domain classifier (``heads["domain"]``, an MLP on the
      features) behind a gradient-reversal layer whose coefficient follows
      :func:`~tl_lightning.objectives.domain.dann_coefficient` of the training progress.
    * ``mmd``: the multi-kernel Gaussian MMD between source and target features
      (:func:`~tl_lightning.objectives.domain.gaussian_mmd`, bandwidths ``scales`` x mean squared distance).

    Source and target images go through the backbone as one batch (``dann``, ``mmd``), so BatchNorm
    normalises both domains together. Validation and test take two loaders: ``0`` the target
    domain, logged as ``val/acc`` etc., ``1`` the source domain, logged as ``val/source_acc`` etc.

    Args:
        *args: :class:`~tl_lightning.modules.transfer.TransferModule`'s arguments (backbone, head,
            num_classes, optimizer, scheduler, label_smoothing, weight_decay), positionally.
        **kwargs: The same arguments by name.
        adaptation: ``none`` | ``dann`` | ``mmd``.
        weight: Weight of the adaptation term, ``>= 0``.
        domain_hidden: Hidden width of the DANN domain classifier.
        mmd_scales: Bandwidth multipliers of the MMD kernels.

    Raises:
        ValueError: On an unknown ``adaptation`` (listing the allowed ones) or a negative ``weight``;
            in ``training_step``, on a batch that does not pair a source and a target domain.

    Example::

        head = LinearHead(1280, 10)
        module = DomainAdaptationModule(efficientnet_lite0(), head, 10, optimizer, adaptation="dann")
    """

    def __init__(
        self,
        *args: Any,
        adaptation: str = "none",
        weight: float = 1.0,
        domain_hidden: int = 256,
        mmd_scales: tuple[float, ...] = DEFAULT_SCALES,
        **kwargs: Any,
    ) -> None:
        if adaptation not in ADAPTATIONS:
            raise ValueError(f"module.adaptation must be one of {list(ADAPTATIONS)}, got {adaptation!r}")
        if not weight >= 0:
            raise ValueError(f"module.weight must be >= 0, got {weight}")
        super().__init__(*args, **kwargs)
        self.hparams.update({"adaptation": adaptation, "weight": weight, "mmd_scales": tuple(mmd_scales)})
        if adaptation == "dann":
            self.heads["domain"] = nn.Sequential(
                nn.Linear(self.backbone.num_features, domain_hidden), nn.ReLU(), nn.Linear(domain_hidden, 1)
            )
        self.source_val_metrics = self.val_metrics.clone(prefix="val/source_")
        self.source_test_metrics = self.test_metrics.clone(prefix="test/source_")

    @staticmethod
    def monitor_modes() -> dict[str, str]:
        """``TransferModule``'s metrics (target domain) plus ``val/source_{loss,acc,f1}``."""
        source = {f"val/source_{n}": "min" if n == "loss" else "max" for n in ("loss", "acc", "f1")}
        return TransferModule.monitor_modes() | source

    def progress(self) -> float:
        """Share of the optimizer steps done, in ``[0, 1]``."""
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return min(self.global_step / total, 1.0)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if not (isinstance(batch, dict) and {"source", "target"} <= set(batch)):
            raise ValueError(
                f"module.adaptation={self.hparams.adaptation} needs batches pairing a labelled source and "
                "an unlabelled target domain: use data=mnist5k_to_digits|digits_to_mnist5k "
                "(DomainPairDataModule)"
            )
        (x_source, y_source), x_target = batch["source"], batch["target"]
        n = len(y_source)
        if self.hparams.adaptation == "none":
            features, target_features = self.backbone(x_source), None
        else:
            joint = self.backbone(torch.cat([x_source, x_target]))
            features, target_features = joint[:n], joint[n:]
        logits = self.heads["target"](features)
        loss = F.cross_entropy(logits, y_source, label_smoothing=self.hparams.label_smoothing)
        self.train_metrics.update(logits.detach(), y_source)
        self.log("train/cls_loss", loss, batch_size=n)
        if target_features is not None:
            loss = loss + self.hparams.weight * self._adaptation_term(features, target_features)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def _adaptation_term(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hparams.adaptation == "mmd":
            mmd = gaussian_mmd(source, target, scales=self.hparams.mmd_scales)
            self.log("train/mmd", mmd, batch_size=len(source))
            return mmd
        coeff = dann_coefficient(self.progress())
        logits = self.heads["domain"](grad_reverse(torch.cat([source, target]), coeff)).squeeze(1)
        is_target = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(logits)
        domain_loss = F.binary_cross_entropy_with_logits(logits, is_target)
        domain_acc = ((logits > 0).to(is_target) == is_target).float().mean()
        self.log_dict(
            {"train/domain_loss": domain_loss, "train/domain_acc": domain_acc, "train/grl_coeff": coeff},
            batch_size=len(source),
        )
        return domain_loss

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self._evaluate(batch, self.val_metrics, "val/loss")
        else:
            self._evaluate(batch, self.source_val_metrics, "val/source_loss")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self._evaluate(batch, self.test_metrics, "test/loss")
        else:
            self._evaluate(batch, self.source_test_metrics, "test/source_loss")

    def _evaluate(self, batch, metrics, loss_name: str) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metrics.update(logits, y)
        size = len(y)
        self.log(loss_name, loss, sync_dist=True, add_dataloader_idx=False, batch_size=size)
        self.log_dict(metrics, on_step=False, on_epoch=True, add_dataloader_idx=False, batch_size=size)
