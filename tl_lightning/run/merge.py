"""Task arithmetic on ``train.py`` checkpoints: fine-tunes merged, written back as evaluable checkpoints.

The weight-space arithmetic lives in :mod:`tl_lightning.adapters.merging`; this module reads the runs'
checkpoints, rebuilds the pretrained base each recorded config names, and writes one evaluable
checkpoint per kept head (``scripts/merge.py``).

Example::

    merged = merge_checkpoints(["a/last.ckpt", "b/last.ckpt"], weights=[0.5, 0.5])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from tl_lightning.adapters.merging import (
    apply_task_vector,
    merge_task_vectors,
    state_fingerprint,
    task_vector,
)
from tl_lightning.run.checkpointing import METADATA_KEY, load_checkpoint

BACKBONE_PREFIX = "backbone."


def backbone_state(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The backbone's weights in a ``TransferModule`` checkpoint, without the ``backbone.`` prefix.

    Raises:
        ValueError: If the checkpoint holds no backbone weights.
    """
    state = {
        k.removeprefix(BACKBONE_PREFIX): v
        for k, v in checkpoint.get("state_dict", {}).items()
        if k.startswith(BACKBONE_PREFIX)
    }
    if not state:
        raise ValueError("the checkpoint holds no 'backbone.*' weights")
    return state


def finetuned_backbone_state(checkpoint: Mapping, path: str) -> dict[str, torch.Tensor]:
    """The fine-tuned backbone of a ``train.py`` checkpoint as plain weights (names of the unwrapped model).

    A full fine-tune's checkpoint holds them; a ``strategy=lora|ia3`` checkpoint holds adapters only,
    so the model is rebuilt (pretrained base + adapters) and the adapters are folded in with PEFT's
    ``merge_and_unload`` (:func:`tl_lightning.run.inference.load_trained`): the task vector of a LoRA run is
    PEFT's merged weights minus the base, non-zero on the adapted layers only.

    Raises:
        ValueError: If the checkpoint is of a prefix- or prompt-tuning run: its virtual tokens are not
            weights of the backbone, so it has no task vector.
    """
    refuse_virtual_tokens(checkpoint, path)
    if ((checkpoint.get(METADATA_KEY) or {}).get("config") or {}).get("adapter") is None:
        return backbone_state(checkpoint)
    from tl_lightning.run.inference import load_trained

    backbone = load_trained(path).module.backbone
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def refuse_virtual_tokens(checkpoint: Mapping, path: str) -> None:
    """Stop on the checkpoint of a prefix- or prompt-tuning run, told by its recorded ``adapter._target_``.

    Such a run learned virtual tokens that PEFT cannot fold into the backbone's weights: it has no task
    vector, and a merged plain backbone put in place of its own would drop what it learned (the result
    loads cleanly but is not that run). Checked for ``vector_paths`` and ``head_paths`` alike.

    Raises:
        ValueError: If the recorded adapter is ``tl_lightning.adapters.prefix_tuning|prompt_tuning``, or
            the weights hold PEFT's virtual-token encoder (a user's own wrapper of either).
    """
    from hydra.utils import get_object

    from tl_lightning.adapters import prefix_tuning, prompt_tuning

    adapter = ((checkpoint.get(METADATA_KEY) or {}).get("config") or {}).get("adapter")
    target = adapter.get("_target_") if isinstance(adapter, Mapping) else None
    named = target is not None and get_object(target) in (prefix_tuning, prompt_tuning)
    if named or any(".prompt_encoder." in key for key in checkpoint.get("state_dict", {})):
        raise ValueError(
            f"{str(path)!r} is a prefix/prompt-tuning run: it learned virtual tokens, not backbone weights, "
            "so it has no task vector to merge, and a merged backbone would drop its virtual tokens; merge "
            "and keep the heads of full fine-tuning or strategy=lora|ia3 runs"
        )


class CheckpointBases:
    """The pretrained backbone state of each ``train.py`` checkpoint, built once per recorded backbone config.

    The base of a fine-tune is what its recorded ``backbone`` node builds (``pretrained=true`` reads the
    packaged weights, ``from_checkpoint`` its source checkpoint), see
    :func:`tl_lightning.run.pipeline.pretrained_backbone`.
    """

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, checkpoint: Mapping, path: str) -> dict[str, torch.Tensor]:
        """The base state of ``checkpoint`` (read from ``path``, named in errors).

        Raises:
            ValueError: If the checkpoint lacks the ``tl_lightning`` run config, or its backbone started
                from a random init (``pretrained=false``).
        """
        from tl_lightning.run.pipeline import pretrained_backbone

        config = (checkpoint.get(METADATA_KEY) or {}).get("config")
        if not isinstance(config, dict) or not isinstance(config.get("backbone"), dict):
            raise ValueError(
                f"{path!r} has no {METADATA_KEY!r} run config with a backbone node: it was not written by "
                "train.py, so its pretrained base cannot be rebuilt"
            )
        if config["backbone"].get("pretrained") is False:
            raise ValueError(
                f"{path!r} was trained from a random init (backbone.pretrained=false): there is no "
                "pretrained base to take a task vector against"
            )
        key = repr(sorted(config["backbone"].items()))
        if key not in self._states:
            self._states[key] = {
                k: v.detach().clone() for k, v in pretrained_backbone(config).state_dict().items()
            }
        return self._states[key]


def merge_checkpoints(
    vector_paths: Sequence[str],
    weights: Sequence[float],
    head_paths: Sequence[str] | None = None,
    method: str = "task_arithmetic",
    density: float = 1.0,
    majority_sign_method: str = "total",
    seed: int = 0,
    bn_stats: str = "merge",
) -> list[dict]:
    """Merge the backbones of fine-tuned ``train.py`` checkpoints; one evaluable checkpoint per kept head.

    Each task vector is a checkpoint's backbone minus the pretrained backbone its recorded config
    builds. The merged backbone (``theta_pre + merge(tau_i, w_i)``, see :func:`merge_task_vectors`) goes
    into a copy of every checkpoint of ``head_paths``, whose heads, run metadata and loop state are kept,
    so ``load_trained``/``predict.py``/``export.py``, Lightning's test loop and ``train.py
    ckpt_path=...`` (a finished run: fit does nothing, the test runs) evaluate it with that head. The
    ``ModelCheckpoint`` states are dropped (they name the fine-tune's files, which the test after a
    resumed fit would otherwise load), and ``checkpoint["tl_lightning"]["merge"]`` records the recipe.

    Checkpoints of ``strategy=lora|ia3`` runs give the vector of PEFT's merged weights (see
    :func:`finetuned_backbone_state`); a kept head of such a run gets a plain-weights checkpoint (the
    config's ``adapter`` set to null, the adapters' optimizer state dropped) for ``load_trained`` and
    the test loop, not for resuming.

    Args:
        vector_paths: Fine-tuned checkpoints (full or LoRA/IA3) whose task vectors are merged.
        weights: One coefficient per vector (negative to subtract a task).
        head_paths: Checkpoints whose heads are kept (default: ``vector_paths``); e.g. task A's
            checkpoint when ``-tau_B`` is applied.
        method, density, majority_sign_method, seed: As :func:`merge_task_vectors`.
        bn_stats: As :func:`task_vector`.

    Raises:
        ValueError: If a checkpoint lacks the run config, is of a prefix- or prompt-tuning run (in
            ``vector_paths`` or ``head_paths``: see :func:`refuse_virtual_tokens`), or the checkpoints
            were fine-tuned from different pretrained weights or architectures (naming both files), or
            as :func:`merge_task_vectors`.
        FileNotFoundError: If a file does not exist.
    """
    head_paths = list(vector_paths if head_paths is None else head_paths)
    head_checkpoints = [load_checkpoint(path) for path in head_paths]
    for path, checkpoint in zip(head_paths, head_checkpoints, strict=True):
        refuse_virtual_tokens(checkpoint, path)
    bases = CheckpointBases()
    fingerprints: dict[str, str] = {}
    vectors = []
    for path in vector_paths:
        checkpoint = load_checkpoint(path)
        base = bases(checkpoint, str(path))
        try:
            vectors.append(task_vector(finetuned_backbone_state(checkpoint, path), base, bn_stats))
        except ValueError as error:
            raise ValueError(f"{str(path)!r}: {error}") from error
        fingerprints[str(path)] = vectors[-1].base_fingerprint
    heads = []
    for path, checkpoint in zip(head_paths, head_checkpoints, strict=True):
        base = bases(checkpoint, str(path))
        fingerprints[str(path)] = state_fingerprint(base)
        heads.append((path, checkpoint, base))
    _check_same_bases(fingerprints)
    merged_vector = merge_task_vectors(vectors, weights, method, density, majority_sign_method, seed)
    merged_backbone = apply_task_vector(heads[0][2], merged_vector)
    recipe = {
        "method": method,
        "weights": [float(w) for w in weights],
        "density": density,
        "majority_sign_method": majority_sign_method,
        "seed": seed,
        "bn_stats": bn_stats,
        "vectors": [str(p) for p in vector_paths],
        "base_fingerprint": merged_vector.base_fingerprint,
    }
    merged = []
    for path, checkpoint, _ in heads:
        state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(BACKBONE_PREFIX)}
        state |= {BACKBONE_PREFIX + k: v for k, v in merged_backbone.items()}
        checkpoint["state_dict"] = state
        checkpoint["callbacks"] = {
            k: v for k, v in checkpoint.get("callbacks", {}).items() if not k.startswith("ModelCheckpoint")
        }
        metadata = dict(checkpoint[METADATA_KEY]) | {"merge": recipe | {"head": str(path)}}
        if metadata["config"].get("adapter") is not None:  # the merged backbone is plain weights
            metadata["config"] = metadata["config"] | {"adapter": None}
            for key in ("optimizer_states", "lr_schedulers"):  # they belong to the adapters, not restorable
                checkpoint.pop(key, None)
        checkpoint[METADATA_KEY] = metadata
        merged.append(checkpoint)
    return merged


def _check_same_bases(fingerprints: Mapping[str, str]) -> None:
    """Stop unless all checkpoints were fine-tuned from the same base weights, naming two that differ."""
    (first, expected), *rest = fingerprints.items()
    for path, fingerprint in rest:
        if fingerprint != expected:
            raise ValueError(
                f"{first!r} and {path!r} were fine-tuned from different pretrained weights (base "
                f"fingerprints {expected[:12]}... and {fingerprint[:12]}...): their recorded backbone "
                "configs build different bases; only fine-tunes of the same base can be merged"
            )
