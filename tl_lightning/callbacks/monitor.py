"""Visibility into fine-tuning: how much is trainable, and how far each layer group moved."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from tl_lightning.callbacks._select import (
    ModuleSelector,
    as_layer_groups_arg,
    as_selector_list,
    layer_groups,
    parameters_by_name,
)
from tl_lightning.callbacks._sharded import full_from_local, is_sharded, local, sum_over_shards


class TrainableParamsMonitor(Callback):
    r"""Log ``trainable_params``, the number of parameter elements that require grad.

    Logged after the first training batch of every epoch and after any batch where the count
    changed (e.g. a :class:`~tl_lightning.callbacks.GradualUnfreeze` milestone), so each stage shows,
    whatever the order of the callbacks.

    Example::

        trainer = Trainer(callbacks=[GradualUnfreeze(milestones=[1, 2]), TrainableParamsMonitor()])
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: int | None = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        count = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if batch_idx == 0 or count != self._last:
            pl_module.log("trainable_params", float(count), on_step=True, on_epoch=False, batch_size=1)
        self._last = count


class LayerDriftMonitor(Callback):
    r"""Log each layer group's relative drift from where fine-tuning started, at every training epoch end.

    ``drift/<group> = ||θ - θ₀|| / ||θ₀||`` over the group's parameters, with ``θ₀`` the selected
    parameters at the start of the first fit. A group whose initial norm is zero logs the absolute
    distance. ``θ₀`` lives on the CPU (one copy of the selected parameters); the cost is one
    device-to-host copy of them per epoch.

    Checkpoints hold no copy of ``θ₀``, only its fingerprint (a BLAKE2b hash of the names, dtypes,
    shapes and bytes). On resume ``θ₀`` is recomputed: it is the weights the module holds just before
    Lightning loads the checkpoint into it, i.e. the module built the way the original run built it
    (the same pretrained weights, or the same seed), and the fingerprint proves it, so a resumed run
    logs the same drift as an uninterrupted one. Checkpoints written before this change, which hold
    ``θ₀`` itself, still resume.

    Args:
        modules: Attribute path, regex or list of them selecting the modules to watch.
        layer_groups: ``{group name: [parameter/module paths or regexes]}`` ordered input -> output,
            overriding the modules' own ``layer_groups()`` / children order.

    Raises:
        AttributeError: In ``setup()``, if a selector matches no module.
        ValueError: In ``on_fit_start()`` of a resumed fit (before any step), if the module's weights
            before the checkpoint was loaded are not those the checkpoint's run started from.

    Example::

        trainer = Trainer(callbacks=[LayerDriftMonitor(modules="backbone")])
    """

    def __init__(
        self, modules: ModuleSelector = "backbone", layer_groups: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        super().__init__()
        self.modules = as_selector_list(modules)
        self.layer_groups = as_layer_groups_arg(layer_groups)
        self._groups: dict[str, list[str]] = {}
        self._initial: dict[str, torch.Tensor] = {}
        self._fingerprint: str | None = None
        self._restored: str | None = None  # the checkpoint's fingerprint, until on_fit_start checks it
        self._before_load: dict[str, torch.Tensor] = {}
        self._hook: RemovableHandle | None = None
        self._drift: dict[str, float] | None = None  # measured after the epoch's last step, logged at its end

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._groups = layer_groups(pl_module, self.modules, self.layer_groups)
        self._initial, self._fingerprint, self._restored, self._before_load = {}, None, None, {}
        # what the module holds when Lightning loads a checkpoint into it: a resumed fit's θ₀ if rebuilt alike
        self._hook = pl_module.register_load_state_dict_pre_hook(self._keep_weights_before_load)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self._fingerprint}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "initial" in state_dict:  # a checkpoint that carries θ₀ itself (written before fingerprints)
            self._initial = dict(state_dict["initial"])
            self._fingerprint = _fingerprint(self._initial)
        else:
            self._restored = state_dict["fingerprint"]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored is None and not self._initial:
            self._initial = self._selected(pl_module)
            self._fingerprint = self._fingerprint_of(self._initial, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after every strategy restored the checkpoint (FSDP2's ModelParallelStrategy: after on_fit_start)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._restored is not None:
            self._initial = self._reference_for(self._restored, pl_module)
        self._fingerprint = self._fingerprint_of(self._initial, pl_module)
        self._restored, self._before_load = None, {}

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the epoch's drift, measured after its last step: under FSDP2 the shards' sums are all-reduced,
        # and here every rank is in step (at the epoch end, a progress bar listed first syncs the epoch's
        # metrics on rank 0 alone, and the two ranks' collectives would pair up wrongly: a hang)
        if _epoch_ends_after_this_batch(trainer):
            self._drift = self._measure(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        drift = self._drift if self._drift is not None else self._measure(pl_module)
        self._drift = None
        pl_module.log_dict(drift, on_step=False, on_epoch=True, batch_size=1)

    def _measure(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """``{drift/<group>: value}`` for the weights the module holds now."""
        params = parameters_by_name(pl_module, [n for names in self._groups.values() for n in names])
        drift = {}
        for group, names in self._groups.items():
            sums = torch.zeros(2, dtype=torch.float64)  # moved, initial: over local shards under FSDP2
            for name in names:
                start = self._initial[name].double()
                sums[0] += (local(params[name].detach()).cpu().double() - start).square().sum()
                sums[1] += start.square().sum()
            moved, initial = self._complete(sums, [params[n] for n in names]).tolist()
            drift[f"drift/{group}"] = (moved / initial) ** 0.5 if initial > 0 else moved**0.5
        return drift

    @staticmethod
    def _complete(sums: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        """Sums over local shards made whole (all-reduced on the parameters' device when sharded)."""
        if not any(is_sharded(p) for p in params):
            return sums
        return sum_over_shards(sums.to(local(params[0]).device), params).cpu()

    def _selected(self, pl_module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """CPU copies of the watched parameters (this rank's shards under FSDP2), by name."""
        names = [name for names in self._groups.values() for name in names]
        return {
            name: local(p.detach()).to("cpu", copy=True)
            for name, p in parameters_by_name(pl_module, names).items()
        }

    def _fingerprint_of(self, tensors: Mapping[str, torch.Tensor], pl_module: torch.nn.Module) -> str:
        """The fingerprint of the whole tensors: shards are gathered one at a time under FSDP2."""
        params = parameters_by_name(pl_module, list(tensors))
        return _fingerprint({n: full_from_local(t, params[n]) for n, t in tensors.items()})

    def _keep_weights_before_load(self, module: torch.nn.Module, *args: Any) -> None:
        """``load_state_dict`` pre-hook: the last weights before a load are the resumed fit's θ₀."""
        self._before_load = self._selected(module)

    def _reference_for(self, fingerprint: str, pl_module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The weights held before the checkpoint was loaded, if they are the run's θ₀.

        Lightning loads a checkpoint before its precision plugin converts the module (``bf16-true``,
        ``16-true``), while the original run took θ₀ after the conversion: the weights held before the
        load are also compared in the dtypes the module has now.

        Raises:
            ValueError: If they are missing or have another fingerprint.
        """
        now = {n: p.dtype for n, p in parameters_by_name(pl_module, list(self._before_load)).items()}
        converted = {n: t.to(now.get(n, t.dtype)) for n, t in self._before_load.items()}
        for candidate in (self._before_load, converted):
            if candidate and self._fingerprint_of(candidate, pl_module) == fingerprint:
                return candidate
        found = self._fingerprint_of(self._before_load, pl_module) if self._before_load else None
        held = f"weights with fingerprint {found}" if found else "no weights (not loaded by load_state_dict)"
        raise ValueError(
            f"{type(self).__name__}({self.modules}) cannot resume its drift: the checkpoint's run "
            f"started from weights with fingerprint {fingerprint}, but the module held {held} before the "
            "checkpoint was loaded. Build the module as the original run did (the same pretrained "
            "weights or seed), or leave LayerDriftMonitor out (train.py: callbacks.layer_drift=null)"
        )


def _epoch_ends_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether the training epoch ends after the batch that just ran (its last batch, ``limit_train_batches``
    or ``max_steps`` reached, or a stop requested), the condition Lightning's epoch loop stops on."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return (
        progress.is_last_batch
        or progress.current.ready == trainer.num_training_batches
        or 0 <= trainer.max_steps <= trainer.global_step
        or trainer.should_stop
    )


def _fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """BLAKE2b (128-bit, hex) of the names, dtypes, shapes and bytes of ``tensors``, in name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
