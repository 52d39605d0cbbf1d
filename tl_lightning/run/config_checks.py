"""Checks of a composed training config that need no built object: they run before anything is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors import safe_open

from tl_lightning.run.checkpointing import moved_path
from tl_lightning.run.sharding import check_sharding, is_sharded_checkpoint


def check_config(cfg: DictConfig) -> None:
    """Reject values that would only fail (or silently misbehave) after training started.

    Runs on the composed config before anything is built: ``_target_`` paths that moved in 0.2.0,
    numeric keys (kind and range), the one weight-decay knob, ``monitor_mode``, strategy milestones
    against the run's length, EWC ``fisher_path`` files and ``ckpt_path``.

    Args:
        cfg: The composed config (``conf/train.yaml``).

    Raises:
        ValueError: Naming the key, the value given and what is allowed.
        FileNotFoundError: On a missing ``ckpt_path`` or ``fisher_path``.
    """
    _check_moved_targets(cfg)
    _check_numbers(cfg)
    _check_task(cfg)
    if "weight_decay" in cfg.module.optimizer:
        raise ValueError(
            f"module.optimizer.weight_decay={cfg.module.optimizer.weight_decay} would be ignored: every "
            f"parameter group sets its own decay from module.weight_decay (norms and biases get none); "
            f"set module.weight_decay instead and remove module.optimizer.weight_decay"
        )
    if cfg.monitor_mode not in ("auto", "min", "max"):
        raise ValueError(f"monitor_mode={cfg.monitor_mode!r} is not one of ['auto', 'min', 'max']")
    _check_schedule(cfg)
    _check_fisher_paths(cfg)
    check_sharding(cfg)
    if cfg.ckpt_path and not (Path(cfg.ckpt_path).is_file() or is_sharded_checkpoint(cfg.ckpt_path)):
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist")


SWEEP_DIRECTIONS = {"min": "minimize", "max": "maximize"}


def sweep_direction(monitor: str, monitor_mode: str) -> str:
    """The Optuna study direction that optimises ``monitor`` the way the best checkpoint is chosen.

    ``monitor_mode=min|max`` is taken as given; ``auto`` follows the metric's name as the modules'
    ``monitor_modes()`` and ``train()`` do: a loss (``val/loss``, ``val/source_loss``, ``val/<task>/loss``)
    is better low, an accuracy or F1 (``acc``, ``f1``) high. Registered as the OmegaConf resolver
    ``tl.sweep_direction`` when this module is imported (``train.py`` imports it before Hydra composes),
    for ``conf/hparams_search/optuna.yaml``'s ``hydra.sweeper.direction``.

    Args:
        monitor: The monitored metric (``monitor``).
        monitor_mode: ``auto``, ``min`` or ``max`` (``monitor_mode``).

    Returns:
        ``"minimize"`` or ``"maximize"``.

    Raises:
        ValueError: On another ``monitor_mode``, or on ``auto`` with a metric whose name is neither a loss
            nor an accuracy or F1 (naming the metric and the ``monitor_mode`` to set).

    Example::

        hydra:
          sweeper:
            direction: ${tl.sweep_direction:${monitor},${monitor_mode}}
    """
    if monitor_mode == "auto":
        name = str(monitor).rsplit("/", 1)[-1].rsplit("_", 1)[-1]
        monitor_mode = {"loss": "min", "acc": "max", "f1": "max"}.get(name, monitor_mode)
        if monitor_mode == "auto":
            raise ValueError(
                f"hydra.sweeper.direction: monitor_mode=auto cannot tell whether monitor={monitor} is better "
                f"high or low (only loss, acc and f1 are known); set monitor_mode=min or monitor_mode=max"
            )
    if monitor_mode not in SWEEP_DIRECTIONS:
        raise ValueError(f"monitor_mode={monitor_mode!r} is not one of ['auto', 'min', 'max']")
    return SWEEP_DIRECTIONS[monitor_mode]


OmegaConf.register_new_resolver("tl.sweep_direction", sweep_direction, replace=True)


def _check_moved_targets(cfg: DictConfig) -> None:
    """A config of the user's own that names a 0.1.0 import path fails here, naming today's path.

    Raises:
        ValueError: Naming the key, the old path and the new one.
    """

    def walk(node: object, key: str) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if isinstance(target, str) and moved_path(target) is not None:
                raise ValueError(
                    f"{key}._target_={target!r} moved when tl_lightning was regrouped into rooms (0.2.0): "
                    f"use {moved_path(target)!r}"
                )
            for name, value in node.items():
                walk(value, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{key}[{i}]")

    walk(OmegaConf.to_container(cfg, resolve=False), "")


@dataclass(frozen=True)
class _Number:
    """An allowed numeric value: ``kind`` (int or float), bounds, and whether a list of them is allowed."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    many: bool = False

    def accepts(self, value) -> bool:
        kinds = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        name = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{name} in {left}{self.low}, {self.high}{right}"
        elif self.low is not None:
            text = f"{name} {'>' if self.low_open else '>='} {self.low}"
        else:
            text = name
        return f"{text} (or a list of them)" if self.many else text


# Numeric keys checked before anything is built (only where the key is set and not null).
_NUMBERS = {
    "seed": _Number(int, 0, 2**32 - 1),
    "trainer.max_epochs": _Number(int, 1),
    "module.optimizer.lr": _Number(float, 0, low_open=True),
    "module.weight_decay": _Number(float, 0),
    "module.label_smoothing": _Number(float, 0, 1, high_open=True),
    "head.hidden": _Number(int, 1, many=True),
    "head.dropout": _Number(float, 0, 1, high_open=True),
    "data.batch_size": _Number(int, 1),
    "data.image_size": _Number(int, 1),
    "data.num_workers": _Number(int, 0),
}


def _check_numbers(cfg: DictConfig) -> None:
    """Every key of ``_NUMBERS`` that is set holds a number of the right kind and range.

    Raises:
        ValueError: Naming the key, the value given and what is allowed.
    """
    for key, allowed in _NUMBERS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or (key == "trainer.max_epochs" and value == -1 and _max_steps(cfg) is not None):
            continue  # -1: Lightning's "no epoch limit", allowed when trainer.max_steps ends the run
        values = list(value) if allowed.many and isinstance(value, ListConfig) else [value]
        if not values or not all(allowed.accepts(v) for v in values):
            given = list(value) if isinstance(value, ListConfig) else value
            hint = (
                "; trainer.max_epochs=0 would test an untrained model, -1 (no limit) needs trainer.max_steps"
                if key == "trainer.max_epochs"
                else ""
            )
            raise ValueError(f"{key} must be {allowed.describe()}, got {given!r}{hint}")


def _check_schedule(cfg: DictConfig) -> None:
    """Stop when a callback's ``milestones`` lie beyond the run's end (a strategy silently cut short).

    Milestones in steps are checked against ``trainer.max_steps`` when it is set. Milestones in epochs
    are refused when only ``trainer.max_steps`` bounds the run (``trainer.max_epochs=-1``): an equal step
    budget makes an epoch 2 steps at one data size and 300 at another, so an epoch milestone would move
    with the data size instead of sitting at a fixed share of the budget.

    Raises:
        ValueError: Naming the milestones, the trainer limit and the ``allow_short_schedule`` opt-out,
            or, for epoch milestones under a step-only budget, the ``unit: step`` remedy.
    """
    for name, node in (cfg.callbacks or {}).items():
        milestones = node.get("milestones") if isinstance(node, DictConfig) else None
        if not isinstance(milestones, ListConfig | list):  # a resolver (oc.select) returns a plain list
            continue
        unit = node.get("unit", "epoch")
        if unit == "epoch" and cfg.trainer.get("max_epochs") in (-1, None) and _max_steps(cfg) is not None:
            raise ValueError(
                f"callbacks.{name}.milestones={list(milestones)} are epochs, but only "
                f"trainer.max_steps={_max_steps(cfg)} bounds the run (trainer.max_epochs="
                f"{cfg.trainer.get('max_epochs')}): an epoch's length in steps depends on the data size, so "
                f"strategy={cfg.strategy_name} would unfreeze at a different share of the budget at every "
                f"size. Give the milestones in steps (callbacks.{name}.unit=step, as "
                f"conf/experiment/sample_efficiency.yaml does through schedule.*) or set trainer.max_epochs"
            )
        if cfg.allow_short_schedule:
            continue
        key = "trainer.max_epochs" if unit == "epoch" else "trainer.max_steps"
        limit = OmegaConf.select(cfg, key, default=None)
        if not isinstance(limit, int) or limit < 0:
            continue
        late = [m for m in milestones if isinstance(m, int) and m >= limit]
        if late:
            raise ValueError(
                f"callbacks.{name}.milestones={list(milestones)} ({unit}s) include {late}, but {key}={limit} "
                f"ends the run after {unit} {limit - 1}: strategy={cfg.strategy_name} would silently stop "
                f"part-way. Raise {key} to at least {max(late) + 1}, or set allow_short_schedule=true if "
                f"you mean to cut the schedule short"
            )


# what fine-tunes a language model with its own LM head: no new head, no frozen backbone, one data set
CAUSAL_LM_STRATEGIES = (
    "full_finetune",
    "lora",
    "ia3",
    "qlora",
    "prefix_tuning",
    "prompt_tuning",
    "l2sp",
    "ewc",
    "discriminative_lr",
    "gradual_unfreeze",
    "scratch",
)


def _check_task(cfg: DictConfig) -> None:
    """The module's task (``classification``, or ``causal_lm``: ``CausalLMModule.task``) fits the data's,
    the backbone and the head: a language model with its LM head and no new head for ``causal_lm``.

    Raises:
        ValueError: Naming the mismatched keys and the ``task=...`` choice that fits, or a ``strategy``
            that cannot train a language model (linear probes, domain adaptation, multi-task), listing
            :data:`CAUSAL_LM_STRATEGIES`.
    """
    from hydra.utils import get_class, get_object

    from tl_lightning.modules.causal_lm import LanguageModel, language_model_head

    task = getattr(get_class(cfg.module._target_), "task", "classification")
    data_task = getattr(get_class(cfg.data._target_), "task", "classification")
    factory = get_object(cfg.backbone._target_)
    language_model = _returns(factory, LanguageModel)
    strategy = cfg.get("strategy_name")
    if (data_task == "causal_lm" or language_model) and strategy not in CAUSAL_LM_STRATEGIES:
        raise ValueError(
            f"strategy={strategy} does not apply to task=causal_lm (it needs a new head, a frozen backbone, "
            f"or paired/multi-task data); use one of strategy={'|'.join(CAUSAL_LM_STRATEGIES)}"
        )
    if data_task != task:
        raise ValueError(
            f"data._target_={cfg.data._target_} is {data_task} data but "
            f"module._target_={cfg.module._target_} trains {task}: use task={data_task} "
            "(or data=rotten_tomatoes_instruct|instructions|lm_text|"
            f"rotten_tomatoes_text for task=causal_lm)"
        )
    if task == "causal_lm" and not language_model:
        raise ValueError(
            "task=causal_lm fine-tunes a language model with its LM head: "
            f"backbone._target_={cfg.backbone._target_} is not one; use backbone=causal_lm"
        )
    if task != "causal_lm" and language_model:
        raise ValueError(
            f"backbone._target_={cfg.backbone._target_} is a language model with its LM head: train it with "
            "task=causal_lm, or classify with backbone=hf_decoder"
        )
    if task == "causal_lm" and get_object(cfg.head._target_) is not language_model_head:
        raise ValueError(
            "task=causal_lm trains the language model's own LM head: "
            f"head._target_={cfg.head._target_} would add a new one; use head=language_model"
        )


def _returns(factory, kind: type) -> bool:
    """Whether ``factory`` is ``kind`` or a function annotated to return ``kind`` (or a subclass)."""
    import typing

    if isinstance(factory, type):
        return issubclass(factory, kind)
    try:
        returned = typing.get_type_hints(factory).get("return")
    except (NameError, TypeError):  # annotations that do not resolve here: not ours
        return False
    return isinstance(returned, type) and issubclass(returned, kind)


def _max_steps(cfg: DictConfig) -> int | None:
    """``trainer.max_steps`` when it limits the run (an integer >= 1), else ``None`` (unset or -1)."""
    value = OmegaConf.select(cfg, "trainer.max_steps", default=None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _check_fisher_paths(cfg: DictConfig) -> None:
    """A callback's ``fisher_path`` must be a readable safetensors file before any model is built.

    Raises:
        FileNotFoundError: If the file is missing, naming the key.
        ValueError: If it is not a safetensors file, naming the key.
    """
    for name, node in (cfg.callbacks or {}).items():
        path = node.get("fisher_path") if isinstance(node, DictConfig) else None
        if path is None:
            continue
        key = f"callbacks.{name}.fisher_path"
        if not Path(path).is_file():
            raise FileNotFoundError(f"{key}={path!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as error:  # safetensors raises its own error type for every kind of bad file
            raise ValueError(f"{key}={path!r} is not a readable safetensors file ({error})") from error
