"""Parameter-efficient fine-tuning through Hugging Face PEFT (``strategy=lora|ia3|qlora|prefix_tuning|...``).

:func:`lora` and :func:`ia3` (any backbone), :func:`qlora` (a 4-bit decoder plus LoRA) and
:func:`prefix_tuning` / :func:`prompt_tuning` (decoder language models only) wrap a
:class:`~tl_lightning.backbones.Backbone`'s model in a
``peft.PeftModel`` (``get_peft_model``): only the adapter weights of the backbone train, every base
weight is frozen; the new target head (outside the backbone) trains in full and the source head stays
frozen. The adapters attach to the backbone's own ``peft_targets`` (EfficientNet-Lite: the pointwise
1x1 convolutions and ``conv_head``; Hugging Face encoders: the attention query/value projections)
unless ``adapter.target_modules`` names others. Layer groups keep working: PEFT renames
``blocks.3.0.conv_pw.weight`` to ``base_model.model.blocks.3.0.conv_pw.base_layer.weight``, and the
wrapped backbone maps those names, and the adapter weights of a module, to the module's group.

Normalisation layers with running statistics (BatchNorm) in the frozen base always run in eval mode
(their statistics stay the pretrained ones, as with ``Freeze(train_bn=False)``).

**Adapter checkpoints** (:func:`keep_changed_only`): the module's ``state_dict()`` - and so every
Lightning checkpoint, ``checkpoint["state_dict"]`` - holds only what training changes: the adapter
tensors, under ``backbone.model.base_model.model.<module path>.lora_A.default.weight`` /
``lora_B.default.weight`` (LoRA; ``ia3_l.default`` for IA3), and the target head, ``heads.target.*``.
The frozen base and the source head are left out: they are rebuilt from their source, the pretrained
weights that ``checkpoint["tl_lightning"]["config"]["backbone"]`` describes, with the adapter settings
in ``config["adapter"]``. A frozen tensor those weights do not provide (the backbone's
``not_pretrained``: a pooler the file lacks, which ``transformers`` draws at random on every build)
is kept in the checkpoint. ``load_state_dict`` fills the left-out tensors from the module's own
(rebuilt) weights, so resuming and ``trainer.test(ckpt_path=...)`` work unchanged. :func:`merge_adapter` folds
the adapters into plain weights (``merge_and_unload``) for inference and export.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from tl_lightning.backbones import Backbone, TextBackbone, TextConfig
from tl_lightning.callbacks import Freeze
from tl_lightning.callbacks.freeze import changes_trainability

_PEFT_PREFIX = "base_model.model."
_PROMPT_PREFIX = "base_model."  # prompt learning wraps the model itself, without a tuner layer between
_BASE_LAYER = ".base_layer"
_HOOKS = "_adapter_state_hooks"


def lora(
    backbone: Backbone,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
) -> Backbone:
    """Wrap ``backbone`` with LoRA adapters (``peft.LoraConfig``): ``W x + (alpha / r) B A x``.

    Args:
        backbone: The pretrained backbone; its ``model`` is replaced by the ``PeftModel``.
        r: Rank of the update ``B A``.
        alpha: Scale numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter's input.
        target_modules: Module names (a module matches when its path is or ends with ``.<name>``)
            or one regex matched in full against module paths; ``None``: ``backbone.peft_targets``.

    Raises:
        ValueError: On a non-positive ``r`` or ``alpha``, a ``dropout`` outside ``[0, 1)``, or a
            target that matches no module (the message lists module names to choose from).

    Example::

        backbone = lora(efficientnet_lite0(), r=8, alpha=16)
    """
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(
            f"adapter: r must be >= 1, alpha > 0 and dropout in [0, 1); got {r}, {alpha}, {dropout}"
        )
    targets = _targets(backbone, target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return wrap_backbone(backbone, config)


def ia3(backbone: Backbone, target_modules: Sequence[str] | str | None = None) -> Backbone:
    """Wrap ``backbone`` with IA3 adapters (``peft.IA3Config``): learned per-channel output scales.

    Each target module's output is multiplied by a learned vector (initialised to ones, so training
    starts from the pretrained function).

    Args:
        backbone: The pretrained backbone; its ``model`` is replaced by the ``PeftModel``.
        target_modules: As for :func:`lora`; ``None``: ``backbone.peft_targets``.

    Raises:
        ValueError: If a target matches no module (listing module names to choose from).
    """
    targets = _targets(backbone, target_modules)
    return wrap_backbone(backbone, IA3Config(target_modules=targets, feedforward_modules=[]))


def prefix_tuning(backbone: Backbone, num_virtual_tokens: int = 16) -> Backbone:
    """Wrap a decoder with prefix tuning (``peft.PrefixTuningConfig``): learned keys and values per layer.

    ``num_virtual_tokens`` key/value pairs per attention layer are prepended to every sequence through
    the model's ``past_key_values``; the base stays frozen. Works for ``backbone=hf_decoder``
    (classification) and causal language models alike (the PEFT task type follows the model: a model
    with an LM head is ``CAUSAL_LM``, a decoder stack ``FEATURE_EXTRACTION``). Batches are padded on
    the right (PEFT drops position ids, so positions count from the first token).

    Args:
        backbone: A decoder backbone; its ``model`` is replaced by the ``PeftModel``.
        num_virtual_tokens: Length of the learned prefix.

    Raises:
        ValueError: For an encoder or image backbone (see :func:`check_decoder`), or
            ``num_virtual_tokens < 1``.

    Example::

        backbone = prefix_tuning(hf_decoder(), num_virtual_tokens=16)
    """
    check_decoder(backbone, "prefix_tuning")
    if num_virtual_tokens < 1:
        raise ValueError(f"adapter.num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
    config = PrefixTuningConfig(task_type=_task_type(backbone), num_virtual_tokens=num_virtual_tokens)
    return _right_padded(wrap_backbone(backbone, config))


def prompt_tuning(backbone: Backbone, num_virtual_tokens: int = 16, init_text: str | None = None) -> Backbone:
    """Wrap a decoder with prompt tuning (``peft.PromptTuningConfig``): learned input embeddings.

    ``num_virtual_tokens`` embedding vectors are prepended to every sequence's token embeddings (the
    model's outputs grow by as many positions, in front); the base stays frozen. Decoders only, and
    right padding, as for :func:`prefix_tuning`.

    Args:
        backbone: A decoder backbone; its ``model`` is replaced by the ``PeftModel``.
        num_virtual_tokens: Number of learned embeddings.
        init_text: Start from the embeddings of this text's tokens (PEFT's ``TEXT`` init, read with the
            backbone's tokenizer); ``None``: random vectors drawn from the vocabulary's embeddings.

    Raises:
        ValueError: For an encoder or image backbone, or ``num_virtual_tokens < 1``.
    """
    check_decoder(backbone, "prompt_tuning")
    if num_virtual_tokens < 1:
        raise ValueError(f"adapter.num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
    text = {} if init_text is None else {
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": init_text,
        "tokenizer_name_or_path": backbone.data_config.tokenizer,
    }  # fmt: skip
    config = PromptTuningConfig(task_type=_task_type(backbone), num_virtual_tokens=num_virtual_tokens, **text)
    return _right_padded(wrap_backbone(backbone, config))


def qlora(
    backbone: Backbone,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
    quant_type: str = "nf4",
    double_quant: bool = False,
) -> Backbone:
    """QLoRA: the decoder's linear layers in 4 bits (bitsandbytes), LoRA adapters on top.

    The base is loaded again from the model's folder (``backbone.data_config.tokenizer``: decoders keep
    tokenizer and weights together) through ``transformers``' ``BitsAndBytesConfig``
    (``load_in_4bit``, ``quant_type``, float32 compute), prepared with PEFT's
    ``prepare_model_for_kbit_training`` (every base weight frozen, norms in float32), and wrapped with
    :func:`lora`. bitsandbytes 0.50 runs 4-bit layers on x86-64 CPUs as well as on CUDA. Checkpoints
    hold the adapters and the head; the quantised base is rebuilt from the pretrained weights (NF4
    quantisation is deterministic).

    Args:
        backbone: A decoder backbone built from pretrained weights (``backbone=hf_decoder`` or a causal LM).
        r: Rank of the LoRA update (as for :func:`lora`).
        alpha: LoRA scale numerator.
        dropout: Dropout on the adapters' input.
        target_modules: As for :func:`lora`; ``None``: ``backbone.peft_targets``.
        quant_type: ``nf4`` (normal float, QLoRA's) or ``fp4``.
        double_quant: Quantise the quantisation constants too (QLoRA's double quantisation).

    Raises:
        ValueError: For an encoder or image backbone, or a ``quant_type`` other than nf4/fp4.
        RuntimeError: If bitsandbytes is missing or cannot quantise here, with its reason (before training).

    Example::

        backbone = qlora(hf_decoder(), r=8)  # 4-bit SmolLM2 decoder stack + LoRA on q_proj/v_proj
    """
    check_decoder(backbone, "qlora")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"adapter.quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401  (transformers needs it for BitsAndBytesConfig)

        settings = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.float32,
        )
        quantized = AutoModelForCausalLM.from_pretrained(
            backbone.data_config.tokenizer, quantization_config=settings
        )
    except (ImportError, RuntimeError, ValueError) as error:
        raise RuntimeError(
            f"strategy=qlora: bitsandbytes cannot load a 4-bit model here ({type(error).__name__}: {error}); "
            "install it with `pip install 'tl-lightning[qlora]'`, or use strategy=lora"
        ) from error
    has_head = backbone.model.get_output_embeddings() is not None
    model = quantized if has_head else quantized.base_model
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False).train()
    names = {name for name, _ in model.named_parameters()}
    if names != set(backbone._group_of):
        raise ValueError(
            f"strategy=qlora: the 4-bit reload of {backbone.data_config.tokenizer!r} has other parameters "
            f"than backbone {backbone.name!r}: {sorted(names ^ set(backbone._group_of))[:6]}"
        )
    backbone.model = model
    return lora(backbone, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)


def check_decoder(backbone: Backbone, strategy: str) -> None:
    """Stop before training unless ``backbone`` is a decoder language model (prefix/prompt tuning, QLoRA).

    Raises:
        ValueError: For a Hugging Face encoder (BERT family: in ``transformers`` 5.x its attention
            takes no ``past_key_values``, so PEFT's prefix would be ignored - its gradient is zero -
            and prompt tuning is offered with prefix tuning, for decoders) or an image backbone.
    """
    model = getattr(backbone, "model", None)
    decoder = isinstance(getattr(backbone, "data_config", None), TextConfig) and not isinstance(
        backbone, TextBackbone
    )
    if not decoder or not hasattr(getattr(model, "config", None), "num_hidden_layers"):
        kind = "a Hugging Face encoder" if isinstance(backbone, TextBackbone) else "not a language model"
        raise ValueError(
            f"strategy={strategy} adapts decoder language models (backbone=hf_decoder or a causal LM); "
            f"backbone {getattr(backbone, 'name', type(backbone).__name__)!r} is {kind}: PEFT prefix tuning "
            "needs past_key_values, which BERT encoders in transformers 5.x lack (the prefix would be "
            "silently ignored); use strategy=lora|ia3 there"
        )


def _task_type(backbone: Backbone) -> TaskType:
    """``CAUSAL_LM`` for a model with an LM head (its generation works), else ``FEATURE_EXTRACTION``."""
    has_head = backbone.model.get_output_embeddings() is not None
    return TaskType.CAUSAL_LM if has_head else TaskType.FEATURE_EXTRACTION


def _right_padded(backbone: Backbone) -> Backbone:
    """Prompt learning ignores position ids: text data must pad on the right (positions from the start)."""
    backbone.data_config = dataclasses.replace(backbone.data_config, padding_side="right")
    return backbone


def wrap_backbone(backbone: Backbone, config: PeftConfig) -> Backbone:
    """Replace ``backbone.model`` by ``get_peft_model(backbone.model, config)``, in place.

    The layer groups are carried over to PEFT's names (an adapter weight joins the group of the
    module it adapts), and the norm layers of the frozen base are held in eval mode.

    Returns:
        ``backbone`` itself.
    """
    groups = _prefix_groups(backbone._group_of)
    wrapped = get_peft_model(backbone.model, config)
    backbone.model = wrapped
    backbone._group_of = {name: _group_of_peft_name(name, groups) for name, _ in wrapped.named_parameters()}
    for module in wrapped.modules():
        if isinstance(module, _NormBase) and not any(p.requires_grad for p in module.parameters()):
            module.register_forward_pre_hook(_hold_running_statistics)
    return backbone


def _targets(backbone: Backbone, target_modules: Sequence[str] | str | None) -> list[str] | str:
    """The checked PEFT ``target_modules``: the given ones, else the backbone's own."""
    if target_modules is None:
        if not backbone.peft_targets:
            raise ValueError(
                f"backbone {backbone.name!r} declares no PEFT targets: set adapter.target_modules=[...], "
                f"e.g. from its modules {_module_names(backbone.model)}"
            )
        target_modules = backbone.peft_targets
    targets = target_modules if isinstance(target_modules, str) else [str(t) for t in target_modules]
    paths = [name for name, _ in backbone.model.named_modules() if name]
    for target in [targets] if isinstance(targets, str) else targets:
        if isinstance(targets, str):
            matched = any(re.fullmatch(target, path) for path in paths)
        else:
            matched = any(path == target or path.endswith("." + target) for path in paths)
        if not matched:
            raise ValueError(
                f"adapter.target_modules: {target!r} matches no module of backbone {backbone.name!r}; "
                f"its weight-bearing modules include {_module_names(backbone.model)}"
            )
    return targets


def _module_names(model: nn.Module, limit: int = 12) -> list[str]:
    """Distinct leaf names of the modules holding weights directly (Linear, Conv, ...), in model order."""
    names = [name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and m._parameters]
    return list(dict.fromkeys(names))[:limit]


def _prefix_groups(group_of: dict[str, str]) -> dict[str, str]:
    """``{parameter name or module path: layer group}``; a module path takes its first parameter's group."""
    groups: dict[str, str] = {}
    for name, group in group_of.items():
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            groups.setdefault(".".join(parts[:end]), group)
    return groups


def _plain_name(name: str) -> str:
    """A ``PeftModel`` parameter or state name as in the unwrapped model (PEFT's prefix and
    ``.base_layer`` removed)."""
    prefix = _PEFT_PREFIX if name.startswith(_PEFT_PREFIX) else _PROMPT_PREFIX
    return name.removeprefix(prefix).replace(_BASE_LAYER, "")


def _group_of_peft_name(name: str, groups: dict[str, str]) -> str:
    """The layer group of a parameter of the ``PeftModel``, from the groups of the unwrapped model.

    Prompt-learning parameters (``prompt_encoder.*``: virtual token embeddings, per-layer prefixes)
    act at the input: they join the first (input-side) group.
    """
    if not name.startswith(_PROMPT_PREFIX):
        return next(iter(groups.values()))
    # a prompt-learning wrapper of a causal LM holds it right under base_model.: its "model." is its own
    for plain in (_plain_name(name), name.removeprefix(_PROMPT_PREFIX).replace(_BASE_LAYER, "")):
        parts = plain.split(".")
        for end in range(len(parts), 0, -1):
            group = groups.get(".".join(parts[:end]))
            if group is not None:
                return group
    raise KeyError(f"PEFT parameter {name!r} belongs to no layer group of the unwrapped model")


def _hold_running_statistics(module: nn.Module, args) -> None:
    """Forward pre-hook: a frozen norm layer normalises with its running statistics and never updates them."""
    module.training = False


def is_adapted(backbone: nn.Module) -> bool:
    """Whether ``backbone`` (a :class:`Backbone`) holds a PEFT-wrapped model."""
    return isinstance(getattr(backbone, "model", None), PeftModel)


def keep_changed_only(module: nn.Module, backbone: str = "backbone") -> list[str]:
    """Leave the frozen tensors of an adapted module out of its ``state_dict`` and refill them on load.

    Left out: every frozen parameter (the PEFT base, the source head), what it stores beside itself
    (a 4-bit weight's quantisation state, ``strategy=qlora``) and the buffers of the backbone
    (running statistics held fixed by eval mode). They are the pretrained weights, which the module
    was built from and a rebuild reads again; those the pretrained weights did not provide (the
    backbone's ``not_pretrained`` names, randomly initialised on every build) stay in.
    ``load_state_dict`` takes a state without them (it uses the module's current values) or with
    them (a full checkpoint loads as usual).

    Args:
        module: The ``LightningModule`` (or any module) whose ``backbone`` attribute is adapted.
        backbone: Attribute path of the adapted backbone in ``module``.

    Returns:
        The left-out state keys (relative to ``module``).

    Raises:
        ValueError: If ``module.<backbone>`` is not adapted (see :func:`is_adapted`).
    """
    adapted = module.get_submodule(backbone)
    if not is_adapted(adapted):
        raise ValueError(
            f"{type(module).__name__}.{backbone} holds no PEFT model: wrap it with lora()/ia3() first"
        )
    frozen = {id(p) for p in module.parameters() if not p.requires_grad}
    buffers = {id(b) for b in adapted.buffers()}
    state = module.state_dict(keep_vars=True)
    drawn = _not_pretrained_keys(state, adapted, backbone)  # random on every build: must be stored
    omitted = {k for k, v in state.items() if (id(v) in frozen or id(v) in buffers) and k not in drawn}
    # what a frozen weight stores beside itself: bitsandbytes' 4-bit quantisation state (``<weight>.absmax``,
    # ``.quant_map``, ...), rebuilt with the quantised base
    omitted |= {k for k in state if _under(k, omitted)}
    omitted = sorted(omitted)
    keys = frozenset(omitted)
    handles = [
        module.register_state_dict_post_hook(functools.partial(_drop_keys, keys=keys)),
        module.register_load_state_dict_pre_hook(functools.partial(_fill_keys, keys=keys)),
    ]
    object.__setattr__(module, _HOOKS, handles)
    return omitted


def _under(key: str, keys: set[str]) -> bool:
    """Whether a proper dotted prefix of ``key`` is one of ``keys``."""
    parts = key.split(".")
    return any(".".join(parts[:end]) in keys for end in range(1, len(parts)))


def _not_pretrained_keys(state: dict, adapted: nn.Module, backbone: str) -> set[str]:
    """The keys of ``state`` whose backbone tensor the pretrained weights did not provide.

    ``adapted.not_pretrained`` names them as in the unwrapped model; PEFT's prefix and ``.base_layer``
    are removed from the state keys to compare.
    """
    names = set(getattr(adapted, "not_pretrained", ()))
    prefix = f"{backbone}.model."
    return {key for key in state if key.startswith(prefix) and _plain_name(key.removeprefix(prefix)) in names}


def _drop_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata, *, keys: frozenset) -> None:
    for key in keys:
        state_dict.pop(prefix + key, None)


def _fill_keys(module: nn.Module, state_dict: dict, prefix: str, *args, keys: frozenset) -> None:
    # every name of a shared tensor (PEFT prompt learning keeps the embeddings also as word_embeddings)
    current = dict(module.named_parameters(remove_duplicate=False)) | dict(
        module.named_buffers(remove_duplicate=False)
    )
    for key in keys:
        if key in current:  # quantisation state is no tensor of the module: the rebuilt base keeps its own
            state_dict.setdefault(prefix + key, current[key])


def merge_adapter(module: nn.Module, backbone: str = "backbone") -> bool:
    """Fold the adapters of ``module.<backbone>`` into plain weights (PEFT ``merge_and_unload``), in place.

    The backbone's model becomes the original architecture again (no adapter modules, no extra
    inference cost), its layer groups the original names, and ``module.state_dict()`` holds every
    weight again.

    A 4-bit base (``strategy=qlora``) is dequantised into float weights and the LoRA update added in
    float, never re-quantised: the merged model is a float model that computes what the trained
    4-bit model did, up to float rounding.

    Prompt-learning adapters (prefix and prompt tuning) have no weights to fold in: they stay, and
    the module keeps running through PEFT.

    Returns:
        Whether an adapter was merged.
    """
    adapted = module.get_submodule(backbone)
    if not is_adapted(adapted) or adapted.model.active_peft_config.is_prompt_learning:
        return False
    for handle in getattr(module, _HOOKS, []):
        handle.remove()
    if hasattr(module, _HOOKS):
        object.__delattr__(module, _HOOKS)
    plain = {_plain_name(name): group for name, group in adapted._group_of.items()}
    quantized = any(_is_4bit(layer) for layer in adapted.model.modules())
    adapted.model = _merge_in_float(adapted.model) if quantized else adapted.model.merge_and_unload()
    adapted._group_of = {name: plain[name] for name, _ in adapted.model.named_parameters()}
    return True


def _is_4bit(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes 4-bit linear layer (``strategy=qlora``'s base)."""
    linear4bit = getattr(sys.modules.get("bitsandbytes"), "nn", None)
    return linear4bit is not None and isinstance(layer, linear4bit.Linear4bit)


def _merge_in_float(model: PeftModel) -> nn.Module:
    """A 4-bit base with LoRA as one float model: the base dequantised, the LoRA update added in float.

    PEFT's own merge re-quantises ``base + update`` to 4 bits, an error larger than the update itself;
    here every 4-bit layer becomes a float ``nn.Linear`` holding exactly the weights the 4-bit forward
    used, and the adapters' update is added to it, so the merged model computes what the trained one
    did up to float rounding.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    deltas = {
        name: sum(layer.get_delta_weight(adapter) for adapter in layer.active_adapters)
        for name, layer in model.base_model.model.named_modules()
        if isinstance(layer, LoraLayer)
    }
    base = model.unload()
    for name, layer in [(n, m) for n, m in base.named_modules() if _is_4bit(m)]:
        data, state = layer.weight.data, layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by a CPU inference forward: undo
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
        dtype = layer.compute_dtype or torch.float32  # what the 4-bit forward multiplies in
        weight = bnb.functional.dequantize_4bit(data, state).to(dtype)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
        base.set_submodule(name, linear)
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = base.get_submodule(name).weight
            weight += delta.to(weight.dtype)
    for attribute in ("hf_quantizer", "is_loaded_in_4bit", "is_quantized", "quantization_method"):
        if attribute in vars(base):
            delattr(base, attribute)
    if hasattr(base, "config") and hasattr(base.config, "quantization_config"):
        del base.config.quantization_config  # saved as a plain float model
    return base


def check_adapter_callbacks(callbacks: Sequence[pl.Callback], strategy: str) -> None:
    """Stop before training when a callback would change what an adapter strategy trains.

    ``Freeze`` on the backbone would freeze the adapters too, and ``GradualUnfreeze`` (any callback
    declaring ``changes_trainability``) would unfreeze the base weights PEFT froze.

    Raises:
        ValueError: Naming the callbacks and how to switch them off.
    """
    clashing = [type(c).__name__ for c in callbacks if isinstance(c, Freeze) or changes_trainability(c)]
    if clashing:
        raise ValueError(
            f"strategy={strategy} trains the adapters and the target head, the base stays frozen; "
            f"{clashing} would change what trains: remove them (callbacks.<name>=null) or change strategy"
        )
