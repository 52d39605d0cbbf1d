"""Task arithmetic: task vectors of fine-tunes, combined in weight space and added back to the base.

A *task vector* is what fine-tuning changed, ``tau = theta_ft - theta_pre``, per floating-point
tensor of the backbone's state dict. Vectors of fine-tunes of the **same** pretrained weights can
be combined with per-vector coefficients (``theta_pre + sum_i w_i tau_i``), negated (``theta_pre -
w tau``: unlearning a task), or merged with TIES or DARE through PEFT's merging utilities
(``peft.utils.merge_utils``).

What a vector covers:

* Floating-point parameters, and by default BatchNorm running statistics (``bn_stats="merge"``):
  merged like weights, which needs no data and gives back a fine-tune exactly at coefficient 1. A
  sum with larger coefficients or a negation can drive a running variance below zero; that is an
  error (:func:`apply_task_vector`), not a NaN model. With ``bn_stats="base"`` the statistics stay
  out of the vector and a merged model keeps the pretrained ones, to be re-estimated on unlabelled
  images of the merged tasks (``torch.optim.swa_utils.update_bn``), which is what works on the
  digits experiment (``docs/results/merging``): Lite0 merged from digits 0-4 and 5-9 reaches 0.96 /
  0.93 validation accuracy with re-estimated statistics, 0.69 / 0.52 with pretrained ones.
* Integer buffers (``num_batches_tracked``) are never part of a vector; they come from the base.
* Every vector records a fingerprint (SHA-256 over names, dtypes, shapes and bytes) of the pretrained
  state it was taken against. Combining vectors of different bases, or adding a vector to another
  base, is an error that names what differs (keys, shapes or fingerprints).

LoRA fine-tunes give task vectors too: :func:`lora_task_vector` takes PEFT's own delta of every
wrapped layer (``scale * B @ A``, reshaped for convolutions), the weights ``merge_and_unload``
would add to the base.

Example::

    tau_a = task_vector(finetuned_a, pretrained)
    tau_b = task_vector(finetuned_b, pretrained)
    merged = apply_task_vector(pretrained, merge_task_vectors([tau_a, tau_b], [0.5, 0.5]))
    forget_b = apply_task_vector(pretrained, -0.5 * tau_b)
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from peft.utils import merge_utils
from torch import nn

BN_STATS_SUFFIXES = (".running_mean", ".running_var")
BN_STATS_MODES = ("merge", "base")
# method -> (PEFT function, whether it takes a density, whether it takes a majority-sign method)
METHODS = {
    "task_arithmetic": (merge_utils.task_arithmetic, False, False),
    "magnitude_prune": (merge_utils.magnitude_prune, True, False),
    "ties": (merge_utils.ties, True, True),
    "dare_linear": (merge_utils.dare_linear, True, False),
    "dare_ties": (merge_utils.dare_ties, True, True),
}
MAJORITY_SIGN_METHODS = ("total", "frequency")

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TaskVector:
    """Per-tensor differences to a pretrained state, with that state's fingerprint.

    Args:
        deltas: Tensor name -> ``theta_ft - theta_pre`` (floating point, CPU).
        base_fingerprint: :func:`state_fingerprint` of the pretrained state.

    Supports ``-tau``, ``c * tau`` and ``tau_a + tau_b`` (same base and keys only).
    """

    deltas: dict[str, torch.Tensor]
    base_fingerprint: str

    def __neg__(self) -> TaskVector:
        return self * -1.0

    def __mul__(self, coefficient: float) -> TaskVector:
        return TaskVector({k: v * coefficient for k, v in self.deltas.items()}, self.base_fingerprint)

    __rmul__ = __mul__

    def __add__(self, other: TaskVector) -> TaskVector:
        check_compatible([self, other])
        return TaskVector({k: v + other.deltas[k] for k, v in self.deltas.items()}, self.base_fingerprint)


def state_fingerprint(state: State) -> str:
    """SHA-256 over the sorted names, dtypes, shapes and bytes of every tensor of ``state`` (hex)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vector_keys(state: State, bn_stats: str = "merge") -> list[str]:
    """Names of ``state`` a task vector covers: floating-point tensors, BatchNorm statistics per ``bn_stats``.

    Raises:
        ValueError: If ``bn_stats`` is not one of ``"merge"``, ``"base"``.
    """
    if bn_stats not in BN_STATS_MODES:
        raise ValueError(f"bn_stats={bn_stats!r} is not one of {list(BN_STATS_MODES)}")
    return sorted(
        k
        for k, v in state.items()
        if v.is_floating_point() and (bn_stats == "merge" or not k.endswith(BN_STATS_SUFFIXES))
    )


def _check_same_layout(first: State, second: State, what: str) -> None:
    missing, extra = sorted(set(first) - set(second)), sorted(set(second) - set(first))
    shapes = sorted(k for k in set(first) & set(second) if first[k].shape != second[k].shape)
    if missing or extra or shapes:
        raise ValueError(
            f"{what}: different architectures - keys only in the first: {missing[:3]} "
            f"({len(missing)}), only in the second: {extra[:3]} ({len(extra)}), "
            f"shape mismatch: {[(k, tuple(first[k].shape), tuple(second[k].shape)) for k in shapes[:3]]}"
        )


def task_vector(finetuned: State, pretrained: State, bn_stats: str = "merge") -> TaskVector:
    """``theta_ft - theta_pre`` over the floating-point tensors of two state dicts of one architecture.

    Args:
        finetuned: State dict after fine-tuning (e.g. a backbone's ``state_dict()``).
        pretrained: State dict the fine-tune started from.
        bn_stats: ``"merge"``: BatchNorm running statistics are part of the vector and merged like
            weights; ``"base"``: they are left out (a merged model keeps the pretrained ones).

    Raises:
        ValueError: If the two states differ in keys or shapes (naming them), or ``bn_stats`` is unknown.
    """
    _check_same_layout(pretrained, finetuned, "task_vector(finetuned, pretrained)")
    keys = vector_keys(pretrained, bn_stats)
    deltas = {k: finetuned[k].detach().cpu() - pretrained[k].detach().cpu() for k in keys}
    return TaskVector(deltas, state_fingerprint(pretrained))


def check_compatible(vectors: Sequence[TaskVector]) -> None:
    """Stop unless every vector was taken against the same pretrained state, over the same tensors.

    Raises:
        ValueError: Naming the first vector that differs (its position) and how: keys, shapes or base
            fingerprint.
    """
    if not vectors:
        raise ValueError("no task vectors given; pass at least one")
    first = vectors[0]
    for i, vector in enumerate(vectors[1:], start=1):
        _check_same_layout(first.deltas, vector.deltas, f"task vectors 0 and {i}")
        if vector.base_fingerprint != first.base_fingerprint:
            raise ValueError(
                f"task vectors 0 and {i} were taken against different pretrained weights "
                f"(base fingerprints {first.base_fingerprint[:12]}... and "
                f"{vector.base_fingerprint[:12]}...); "
                "only fine-tunes of the same base can be merged"
            )


def merge_task_vectors(
    vectors: Sequence[TaskVector],
    weights: Sequence[float],
    method: str = "task_arithmetic",
    density: float = 1.0,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> TaskVector:
    """Combine task vectors tensor by tensor with PEFT's merging utilities.

    * ``task_arithmetic``: ``sum_i w_i tau_i``.
    * ``magnitude_prune``: each ``tau_i`` keeps its ``density`` largest-magnitude entries, then the sum.
    * ``ties``: magnitude pruning, a sign elected per entry (``majority_sign_method``), then the mean
      of the weighted entries that agree with it (TIES-merging's disjoint mean: a weight of 1 for two
      vectors averages, it does not add; scale the result with ``c * tau``).
    * ``dare_linear`` / ``dare_ties``: entries dropped at random (kept with probability ``density``,
      rescaled by ``1 / density``), then the sum / the TIES sign election and disjoint mean.

    Args:
        vectors: Task vectors of one base (see :func:`check_compatible`).
        weights: One coefficient per vector (negative to subtract a task).
        method: One of :data:`METHODS`.
        density: Share of entries kept, in ``(0, 1]`` (pruning methods only; 1 keeps all).
        majority_sign_method: ``"total"`` (sign of the sum) or ``"frequency"`` (most common sign).
        seed: Seed of DARE's random drop (the result does not depend on the order of the tensors).

    Raises:
        ValueError: On incompatible vectors, a weight count that does not match, an unknown method or
            sign method, or a density outside ``(0, 1]``, naming the value and the allowed ones.
    """
    check_compatible(vectors)
    if len(weights) != len(vectors):
        raise ValueError(f"got {len(weights)} weights for {len(vectors)} task vectors; give one per vector")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1]")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(
            f"majority_sign_method={majority_sign_method!r} is not one of {list(MAJORITY_SIGN_METHODS)}"
        )
    function, takes_density, takes_sign = METHODS[method]
    kwargs = {"density": density} if takes_density else {}
    if takes_sign:
        kwargs["majority_sign_method"] = majority_sign_method
    merged = {}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        torch.manual_seed(seed)
        for key in sorted(vectors[0].deltas):
            tensors = [v.deltas[key] for v in vectors]
            coefficients = torch.tensor(list(weights), dtype=tensors[0].dtype)
            merged[key] = function(tensors, coefficients, **kwargs)
    return TaskVector(merged, vectors[0].base_fingerprint)


def apply_task_vector(pretrained: State, vector: TaskVector) -> dict[str, torch.Tensor]:
    """``theta_pre + tau``: a new state dict; tensors the vector does not cover are copied from the base.

    Raises:
        ValueError: If ``vector`` was taken against other pretrained weights (fingerprints differ),
            names tensors the base lacks or shapes it does not have, or makes a BatchNorm running
            variance negative (statistics merged like weights; see ``bn_stats``).
    """
    fingerprint = state_fingerprint(pretrained)
    if fingerprint != vector.base_fingerprint:
        raise ValueError(
            f"the task vector was taken against other pretrained weights (base fingerprint "
            f"{vector.base_fingerprint[:12]}...), not these ({fingerprint[:12]}...)"
        )
    _check_same_layout(
        {k: pretrained[k] for k in vector.deltas if k in pretrained}, vector.deltas, "base and vector"
    )
    merged = {k: v.detach().cpu().clone() for k, v in pretrained.items()}
    for key, delta in vector.deltas.items():
        merged[key] = (merged[key] + delta).to(merged[key].dtype)
    negative = sorted(k for k in vector.deltas if k.endswith(".running_var") and (merged[k] < 0).any())
    if negative:
        raise ValueError(
            f"the merged BatchNorm running variances of {negative[:3]} ({len(negative)} layers) are "
            "negative: statistics merged like weights do not survive this combination; take the vectors "
            "with bn_stats='base' and re-estimate the statistics on data (torch.optim.swa_utils.update_bn)"
        )
    return merged


def lora_task_vector(
    peft_model: nn.Module, pretrained: State, adapter_name: str = "default", bn_stats: str = "merge"
) -> TaskVector:
    """The task vector of a LoRA fine-tune: PEFT's delta weight of every LoRA-wrapped layer.

    The delta of a wrapped layer is ``layer.get_delta_weight(adapter_name)`` (``scale * B @ A``,
    reshaped for convolutions), exactly what ``merge_and_unload`` adds to the base weight; every other
    tensor :func:`vector_keys` selects gets a zero delta, so LoRA and full fine-tuning vectors of the
    same base combine.

    Args:
        peft_model: A ``peft.PeftModel`` (or a model ``peft.inject_adapter_in_model`` wrapped).
        pretrained: State dict of the unwrapped base model (names without PEFT's prefixes).
        adapter_name: The adapter to read.
        bn_stats: As in :func:`task_vector`.

    Raises:
        ValueError: If the model holds no LoRA layer with ``adapter_name``, or a wrapped layer's base
            weight differs from ``pretrained`` (the adapter was trained on another base), naming it.
    """
    from peft.tuners.lora import LoraLayer

    root = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    deltas = {k: torch.zeros_like(pretrained[k]).cpu() for k in vector_keys(pretrained, bn_stats)}
    wrapped = [
        (name, module)
        for name, module in root.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    ]
    if not wrapped:
        raise ValueError(f"the model holds no LoRA layer with adapter {adapter_name!r}")
    for name, module in wrapped:
        key = f"{name}.weight"
        base_weight = module.get_base_layer().weight
        if key not in pretrained or pretrained[key].shape != base_weight.shape:
            raise ValueError(f"LoRA layer {name!r} has no weight of that shape in the pretrained state")
        if not torch.equal(base_weight.detach().cpu(), pretrained[key].detach().cpu()):
            raise ValueError(
                f"LoRA layer {name!r} wraps a base weight that differs from the pretrained state's "
                f"{key!r}: the adapter was trained on another base"
            )
        with torch.no_grad():
            deltas[key] = module.get_delta_weight(adapter_name).detach().cpu().to(pretrained[key].dtype)
    return TaskVector(deltas, state_fingerprint(pretrained))
