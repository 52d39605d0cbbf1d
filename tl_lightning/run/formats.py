"""Export a trained model to its ecosystem's formats: Hugging Face / sentence-transformers, timm, text ONNX.

Each exporter takes the rebuilt, weights-loaded ``TransferModule`` (eval mode, adapters merged) and
``checkpoint["tl_lightning"]`` (config, class names, preprocessing), writes what the ecosystem's own
loader reads, loads it back with that loader and compares its logits with the module's on sample
inputs: an export that would compute another model stops with an error instead of being handed out.

* :func:`export_hf`: a text run as a folder ``transformers.AutoModelForSequenceClassification`` loads
  when the run pooled as that class does (``[CLS]`` through the encoder's pooler, one linear head);
  every other pooling (``mean``, ``max``, ``lasttoken``, ``cls`` without a pooler) and MLP heads as a
  sentence-transformers folder (``Transformer`` -> ``Pooling`` -> ``Dense`` layers, the last one with
  identity activation) whose ``SentenceTransformer(folder).encode(texts)`` returns the logits.
* :func:`export_timm`: an image run on a timm backbone as a folder timm reads
  (``timm.create_model("local-dir:<folder>")``, or ``timm.create_model(architecture,
  num_classes=N, checkpoint_path="<folder>/model.safetensors")``) with its preprocessing and labels.
* :func:`export_text_onnx`: a text run as an ONNX graph over token tensors, dynamic batch and length.
* :func:`export_causal_lm` (``format=hf`` of a ``task=causal_lm`` run): the fine-tuned language model as
  a folder ``AutoModelForCausalLM``/``AutoTokenizer`` load (adapters merged; the chat template and the
  padding token travel with the tokenizer), checked by greedy generation: the folder must produce the
  module's tokens on :data:`CHECK_PROMPTS`.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import get_class
from torch import nn

from tl_lightning._modes import eval_mode
from tl_lightning.backbones.hf import TextBackbone
from tl_lightning.data.grayscale import GrayscaleDataModule

log = logging.getLogger(__name__)
ATOL = 1e-4  # largest absolute logit difference an export may show against the module
# texts of different lengths the exports are checked on (padding, truncation and batching exercised)
CHECK_TEXTS = (
    "fine",
    "a moving, funny and wise film",
    "dull, slow and far too long; the plot makes no sense at all and the cast is wasted on it, "
    "scene after scene, until the very last minute of a film that never finds its footing",
)
# prompts a language-model export is checked on (greedy generation must give the module's tokens)
CHECK_PROMPTS = (
    "What is the capital of France?",
    "Review: a moving, funny and wise film\nIs it fresh or rotten?",
    "Write one sentence about the sea.",
)
CHECK_NEW_TOKENS = 16
_ACTIVATIONS = (nn.GELU, nn.ReLU, nn.Tanh, nn.SiLU, nn.Sigmoid, nn.Identity)
# sentence-transformers Pooling modes of this project's text poolings (tl_lightning.backbones.hf.POOLINGS)
_SENTENCE_MODES = {"cls": "cls", "mean": "mean", "max": "max", "lasttoken": "lasttoken"}


def export_hf(module: nn.Module, metadata: dict, output: str | Path) -> Path:
    """Write a text run as a Hugging Face folder: transformers where it fits, else sentence-transformers.

    * ``pooling=cls`` with the encoder's pooler and a linear head (``head=linear``): what
      ``AutoModelForSequenceClassification`` computes. ``AutoModelForSequenceClassification.from_pretrained(
      output)`` loads it, with ``id2label``/``label2id`` from the class names and the tokenizer alongside.
    * Every other text run (``mean``, ``max``, ``lasttoken``, ``cls`` without a pooler, an architecture
      whose sequence-classification head is not pooler -> linear, ``head=mlp``): a sentence-transformers
      folder: ``Transformer`` (encoder, tokenizer, the run's maximum length), ``Pooling`` (the run's
      mode), a ``Dense`` with ``Tanh`` for a ``[CLS]`` pooler, then one ``Dense`` per linear layer of the
      head (an MLP head's hidden layers keep their activation; the last has identity), so
      ``SentenceTransformer(output).encode(texts)`` returns the logits. Its ``config.json`` holds
      ``id2label``/``label2id``.

    The folder is loaded back with its library and its logits compared with ``module``'s on texts of
    different lengths.

    Args:
        module: The trained ``TransferModule`` of a ``backbone=hf_encoder`` run (eval mode, adapters merged).
        metadata: ``checkpoint["tl_lightning"]`` (``config``, ``class_names``, ``data_config``).
        output: The folder to write (created; files of the same names are replaced).

    Returns:
        ``output``.

    Raises:
        ValueError: If the run is not a text run, still holds PEFT adapters, its head has a layer
            other than linear, dropout and activations, ``output`` is a file, or the ``[CLS]`` pooler
            is not dense -> tanh (sentence-transformers cannot carry it); the message names the reason.
        RuntimeError: If the written folder's logits differ from ``module``'s by more than ``1e-4``.

    Example::

        export_hf(model.module, model.metadata, "outputs/export/model.hf")
        AutoModelForSequenceClassification.from_pretrained("outputs/export/model.hf")  # cls + pooler runs
        SentenceTransformer("outputs/export/model.hf").encode(["a fine film"])  # the others: logits
    """
    from tl_lightning.run.generation import is_language_model

    if is_language_model(module):
        return export_causal_lm(module, metadata, output)
    backbone, head = _parts(module, "hf")
    if not isinstance(backbone, TextBackbone):
        raise ValueError(
            f"format=hf takes text runs (backbone=hf_encoder); this run's backbone is {backbone.name!r} "
            f"({_backbone_target(metadata)}): export it with format=timm (timm backbones), onnx or "
            "safetensors"
        )
    output = _folder(output)
    class_names = list(metadata["class_names"])
    layers = _head_layers(head, "hf")
    tokenizer = backbone.data_config.load_tokenizer()
    tokenizer.model_max_length = _text_max_length(backbone, metadata)
    encoder = backbone.model
    pooler = getattr(encoder, "pooler", None)
    if backbone.pooling == "cls" and pooler is not None and len(layers) == 1:
        classifier = _sequence_classification(encoder, layers[0][0], class_names)
        if classifier is not None:
            classifier.save_pretrained(output)
            tokenizer.save_pretrained(output)
            _check_close(module, _transformers_logits(output), tokenizer, output, "transformers")
            log.info(
                "format=hf: AutoModelForSequenceClassification.from_pretrained(%r) loads it", str(output)
            )
            return output
    _save_sentence_transformer(backbone, layers, tokenizer, class_names, output)
    _check_close(module, _sentence_logits(output), tokenizer, output, "sentence-transformers")
    log.info(
        "format=hf: pooling=%s%s: a sentence-transformers folder; SentenceTransformer(%r).encode(texts) "
        "returns the logits",
        backbone.pooling,
        f", head with {len(layers)} linear layers" if len(layers) > 1 else "",
        str(output),
    )
    return output


def export_causal_lm(module: nn.Module, metadata: dict, output: str | Path) -> Path:
    """Write a ``task=causal_lm`` run as a folder ``transformers`` loads and generates from as we do.

    The language model (adapters already merged: ``load_trained`` does it) is saved with
    ``save_pretrained`` (safetensors, tied embeddings kept tied) next to its tokenizer (chat template,
    the padding token training used, padding on the left so that batched generation equals one prompt
    at a time) and a ``generation_config`` with that padding token. The folder
    is then loaded with ``AutoModelForCausalLM``/``AutoTokenizer`` and must generate, greedily, exactly
    the module's tokens after each of :data:`CHECK_PROMPTS` (rendered with the chat template when the
    tokenizer has one).

    Args:
        module: The trained ``CausalLMModule`` (eval mode, adapters merged).
        metadata: ``checkpoint["tl_lightning"]``.
        output: The folder to write.

    Returns:
        ``output``.

    Raises:
        ValueError: If the language model still holds PEFT adapters, or ``output`` is a file.
        RuntimeError: If the loaded folder generates other tokens than the module, naming the prompt.

    Example::

        export_causal_lm(model.module, model.metadata, "outputs/export/lm")
        AutoModelForCausalLM.from_pretrained("outputs/export/lm")
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_unadapted(module.backbone, "hf")
    output = _folder(output)
    tokenizer = module.tokenizer
    model = module.backbone.model
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    # saved again padding on the left: batched generation continues each prompt right after its last token
    theirs_tokenizer = AutoTokenizer.from_pretrained(output, padding_side="left")
    theirs_tokenizer.save_pretrained(output)
    loaded = AutoModelForCausalLM.from_pretrained(output).eval()
    for prompt in CHECK_PROMPTS:
        ids = _rendered(theirs_tokenizer, prompt)
        mask = torch.ones_like(ids)
        ours = module.generate(ids, mask, CHECK_NEW_TOKENS)
        with torch.no_grad():
            theirs = loaded.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=CHECK_NEW_TOKENS, do_sample=False
            )[:, ids.shape[1] :]
        if not torch.equal(ours, theirs):
            raise RuntimeError(
                f"format=hf: the exported folder {str(output)!r} generates {theirs.tolist()} after "
                f"{prompt!r}, the trained model {ours.tolist()}; the export is not the trained model"
            )
    log.info(
        "format=hf: AutoModelForCausalLM.from_pretrained(%r) loads it (chat template included)", str(output)
    )
    return output


def _rendered(tokenizer, prompt: str) -> torch.Tensor:
    """``(1, L)`` ids of a user turn through the chat template and generation prompt, or of the text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    return torch.tensor([tokenizer(prompt)["input_ids"]])


def export_timm(module: nn.Module, metadata: dict, output: str | Path) -> Path:
    """Write an image run on a timm backbone as a timm folder: ``model.safetensors`` + ``config.json``.

    timm's own writer (``timm.models.save_for_hf``) stores the weights with the linear head as the
    model's classifier, and ``config.json`` with the timm ``architecture`` (EfficientNet-Lite0 is
    ``tf_efficientnet_lite0``, TF "same" padding), ``num_classes``, ``label_names`` (the class names),
    the construction arguments and the preprocessing the run evaluated with (``input_size`` at
    ``data.image_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``; the grayscale data modules
    upsample the whole image, ``crop_pct=1``, and copy grey levels to 3 channels, as
    ``config.json``'s ``tl_lightning.grayscale`` says; timm's own transform does not reproduce that
    preprocessing - luma of a file, torch's bicubic on grey levels - so such a model's files are
    predicted with ``predict.py``, not through timm's transform). Both
    ``timm.create_model("local-dir:<output>")`` and ``timm.create_model(architecture, num_classes=N,
    checkpoint_path="<output>/model.safetensors")`` load it; the first is checked against ``module``'s logits.

    Args:
        module: The trained ``TransferModule`` (eval mode, adapters merged).
        metadata: ``checkpoint["tl_lightning"]`` (``config``, ``class_names``, ``data_config``).
        output: The folder to write (created; files of the same names are replaced).

    Returns:
        ``output``.

    Raises:
        ValueError: If the backbone is not a whole timm model (``backbone=torchvision|small_cnn``, a
            text encoder, a cut ``backbone.cut_at``), still holds PEFT adapters, the head is not one
            linear layer (``head=mlp``), or ``output`` is a file; the message names what to use instead.
        RuntimeError: If the written model's logits differ from ``module``'s by more than ``1e-4``.

    Example::

        export_timm(model.module, model.metadata, "outputs/export/model.timm")
        timm.create_model("local-dir:outputs/export/model.timm").eval()
    """
    import timm
    from timm.models import save_for_hf

    backbone, head = _parts(module, "timm")
    model = backbone.model
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not (architecture and timm.is_model(architecture) and type(model).__module__.startswith("timm.")):
        cut = getattr(model, "cut_at", None)
        raise ValueError(
            f"format=timm needs a whole timm model as the backbone; this run's backbone is {backbone.name!r} "
            f"({_backbone_target(metadata)}{f', cut at {cut!r} (backbone.cut_at)' if cut else ''}), which "
            "timm cannot build: export it with format=onnx or safetensors"
        )
    layers = _head_layers(head, "timm")
    if len(layers) != 1 or layers[0][1] is not None:
        raise ValueError(
            f"format=timm: a timm classifier is one linear layer, and this run's head "
            f"({type(head).__name__}) has {len(layers)} linear layers with activations (head=mlp): export it "
            "with format=onnx or safetensors, or train with head=linear"
        )
    output = _folder(output)
    class_names = list(metadata["class_names"])
    exported = copy.deepcopy(model).eval()
    exported.reset_classifier(len(class_names))
    classifier = exported.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise ValueError(
            f"format=timm: the classifier of {architecture} is a {type(classifier).__name__}, not a linear "
            "layer the head's weights fit: export it with format=onnx or safetensors"
        )
    classifier.load_state_dict(layers[0][0].state_dict())
    size, data_config, grey = _image_preprocessing(metadata)
    timm_data = {
        "input_size": (data_config["input_size"][0], size, size),
        "mean": tuple(data_config["mean"]),
        "std": tuple(data_config["std"]),
        "interpolation": data_config["interpolation"],
        "crop_pct": 1.0 if grey else data_config["crop_pct"],
        "crop_mode": "center",
    }
    extra = {"data": (metadata["config"].get("data") or {}).get("_target_"), "grayscale": grey}
    model_config = {"label_names": class_names, "tl_lightning": extra}
    save_for_hf(
        exported, str(output), model_config=model_config, safe_serialization=True, data_config=timm_data
    )
    images = torch.randn(3, *timm_data["input_size"], generator=torch.Generator().manual_seed(0))
    loaded = timm.create_model(f"local-dir:{output}", pretrained=True).eval()
    with torch.no_grad(), eval_mode(module):
        ours, theirs = module(images), loaded(images)
    _compare(ours, theirs, output, f"timm.create_model('local-dir:{output}')")
    log.info("format=timm: timm.create_model(%r) loads it", f"local-dir:{output}")
    return output


def export_text_onnx(module: nn.Module, metadata: dict, output: str | Path) -> Path:
    """Write a text run as an ONNX graph: token tensors (``int64``, ``(batch, length)``) -> ``logits``.

    The inputs are those the run's tokenizer produces, in its order (BERT: ``input_ids``,
    ``token_type_ids``, ``attention_mask``); batch and sequence length are dynamic (up to the run's
    maximum length). The graph's metadata properties (JSON) hold ``class_names``, ``data_config``
    (tokenizer, maximum length, pooling) and ``input_names``. The graph is run with ``onnxruntime`` on
    texts of different lengths, padded as one batch, and compared with ``module``'s logits.

    Args:
        module: The trained ``TransferModule`` of a ``backbone=hf_encoder`` run (eval mode, adapters merged).
        metadata: ``checkpoint["tl_lightning"]`` (``config``, ``class_names``, ``data_config``).
        output: The ``.onnx`` file to write.

    Returns:
        ``output``.

    Raises:
        ValueError: If the run is not a text run (image runs: ``tl_lightning.run.inference.export_onnx``)
            or still holds PEFT adapters.
        RuntimeError: If onnxruntime's logits differ from ``module``'s by more than ``1e-4``.

    Example::

        export_text_onnx(model.module, model.metadata, "outputs/export/model.onnx")
        session = onnxruntime.InferenceSession("outputs/export/model.onnx")
        logits = session.run(None, dict(tokenizer(texts, padding=True, return_tensors="np")))[0]
    """
    import onnx

    backbone, _ = _parts(module, "onnx")
    if not isinstance(backbone, TextBackbone):
        raise ValueError(
            f"export_text_onnx takes text runs (backbone=hf_encoder); this run's backbone is "
            f"{backbone.name!r}: image runs export with tl_lightning.run.inference.export_onnx"
        )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = backbone.data_config.load_tokenizer()
    tokenizer.model_max_length = _text_max_length(backbone, metadata)
    example = tokenizer(
        list(CHECK_TEXTS[:2]),
        padding=True,
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    )
    names = list(example)
    graph = _TokensToLogits(module, names).eval()
    length = torch.export.Dim("length", min=2, max=tokenizer.model_max_length)
    batch = torch.export.Dim("batch", min=1)
    with eval_mode(module):
        program = torch.onnx.export(
            graph,
            tuple(example[name] for name in names),
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=(tuple({0: batch, 1: length} for _ in names),),  # forward(*tensors): one tuple
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    properties = {
        "class_names": list(metadata["class_names"]),
        "data_config": {**backbone.data_config.as_dict(), "max_length": tokenizer.model_max_length},
        "input_names": names,
    }
    for key, value in properties.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(proto, str(output))
    _check_close(module, _onnx_logits(output), tokenizer, output, "onnxruntime")
    return output


class _TokensToLogits(nn.Module):
    """Positional token tensors (an ONNX graph's inputs) -> the module's logits."""

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.module = module
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.module(dict(zip(self.names, tensors, strict=True)))


def _parts(module: nn.Module, format: str) -> tuple[nn.Module, nn.Module]:
    """The backbone and target head of a single-task module without PEFT adapters."""
    heads = getattr(module, "heads", None)
    backbone = getattr(module, "backbone", None)
    if backbone is None or heads is None or "target" not in heads:
        raise ValueError(
            f"format={format} takes a tl_lightning.modules.TransferModule with a target head "
            f"(heads.target); got {type(module).__name__} with heads {list(heads or {})}"
        )
    _check_unadapted(backbone, format)
    return backbone, heads["target"]


def _check_unadapted(backbone: nn.Module, format: str) -> None:
    """Stop on a backbone that still holds PEFT adapters, saying what writes or uses the run instead."""
    from tl_lightning.adapters.peft import is_adapted

    if not is_adapted(backbone):
        return
    config = backbone.model.active_peft_config
    if config.is_prompt_learning:
        raise ValueError(
            f"format={format}: strategy={config.peft_type.value.lower()} learns virtual tokens that no "
            "weight of the model can hold, so the run cannot be written as a plain model; use its checkpoint "
            "with predict.py (ckpt_path=<run>/checkpoints/<file>.ckpt), export it with format=safetensors "
            "(the virtual tokens and the run's description; predict.py reads it), or train with "
            "strategy=lora|ia3, whose adapters export.py merges"
        )
    raise ValueError(
        f"format={format}: the backbone still holds PEFT adapters (strategy=lora|ia3); merge them first "
        "(tl_lightning.adapters.peft.merge_adapter, as tl_lightning.run.inference.load_trained does)"
    )


def _head_layers(head: nn.Module, format: str) -> list[tuple[nn.Linear, nn.Module | None]]:
    """``(linear, activation after it or None)`` for each linear layer of a head, in order (dropout skipped).

    ``LinearHead`` gives one layer; ``MLPHead`` one per hidden layer (``GELU``) and the output layer.
    """
    layers: list[tuple[nn.Linear, nn.Module | None]] = []
    for layer in head.children() if isinstance(head, nn.Sequential) else [head]:
        if isinstance(layer, nn.Linear):
            layers.append((layer, None))
        elif isinstance(layer, _ACTIVATIONS) and layers and layers[-1][1] is None:
            layers[-1] = (layers[-1][0], layer)
        elif not isinstance(layer, nn.Dropout):
            raise ValueError(
                f"format={format}: the head ({type(head).__name__}) holds a {type(layer).__name__}; exports "
                "carry linear layers, dropout and activations (head=linear|mlp) only"
            )
    if not layers or layers[-1][1] is not None:
        raise ValueError(f"format={format}: the head ({type(head).__name__}) does not end in a linear layer")
    return layers


def _folder(output: str | Path) -> Path:
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output={str(output)!r} is a file; this format writes a folder")
    output.mkdir(parents=True, exist_ok=True)
    return output


def _backbone_target(metadata: dict) -> str:
    node = metadata["config"].get("backbone") or {}
    while isinstance(node.get("backbone"), dict):  # backbone=source_checkpoint: its inner backbone
        node = node["backbone"]
    return f"backbone._target_={node.get('_target_')}"


def _text_max_length(backbone: TextBackbone, metadata: dict) -> int:
    """The token limit the run trained with: ``data.max_length`` when a number, else the backbone's.

    Raises:
        ValueError: If the run chose its limit from its training texts (``data.max_length=data``) and
            the checkpoint predates recording the number.
    """
    limit = backbone.data_config.max_length
    chosen = (metadata["config"].get("data") or {}).get("max_length")
    if isinstance(chosen, int) and not isinstance(chosen, bool):
        return min(chosen, limit)
    if chosen is not None:  # "data", recorded by checkpoints before the chosen limit was stored
        raise ValueError(
            f"data.max_length={chosen} was chosen from the training texts and this checkpoint does not "
            "record the number: an export would truncate at another length than the run did. Predict with "
            "predict.py (it recomputes the limit), or retrain to record it"
        )
    return limit


def _image_preprocessing(metadata: dict) -> tuple[int, dict, bool]:
    """``(image size, data_config, grayscale data module?)`` of an image run."""
    data_config, data = metadata["data_config"], metadata["config"].get("data") or {}
    size = int(data.get("image_size") or data_config["input_size"][-1])
    try:
        data_class = get_class(data["_target_"]) if data.get("_target_") else None
    except (ImportError, ValueError):
        data_class = None
    grey = isinstance(data_class, type) and issubclass(data_class, GrayscaleDataModule)
    return size, data_config, grey


def _sequence_classification(
    encoder: nn.Module, linear: nn.Linear, class_names: list[str]
) -> nn.Module | None:
    """``AutoModelForSequenceClassification`` holding ``encoder`` and ``linear``, when its head is just that.

    ``None`` when the architecture's sequence-classification model has more than the encoder and one
    linear ``classifier`` (RoBERTa, ELECTRA, DistilBERT: a dense layer of their own before it).
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(encoder.config)
    config.id2label = dict(enumerate(class_names))
    config.label2id = {name: i for i, name in enumerate(class_names)}
    config.problem_type = "single_label_classification"
    model = AutoModelForSequenceClassification.from_config(config)
    prefix = model.base_model_prefix
    own = set(encoder.state_dict())
    expected = {f"{prefix}.{key}" for key in own} | {"classifier.weight", "classifier.bias"}
    classifier = getattr(model, "classifier", None)
    if set(model.state_dict()) != expected or not isinstance(classifier, nn.Linear):
        return None
    getattr(model, prefix).load_state_dict(encoder.state_dict())
    classifier.load_state_dict(linear.state_dict())
    return model.eval()


def _save_sentence_transformer(
    backbone: TextBackbone,
    layers: list[tuple[nn.Linear, nn.Module | None]],
    tokenizer,
    class_names: list[str],
    output: Path,
) -> None:
    SentenceTransformer, (Dense, Pooling, Transformer) = _sentence_transformers()
    encoder = backbone.model
    dense = [_dense(Dense, linear, activation) for linear, activation in layers]
    pooler = getattr(encoder, "pooler", None)
    if backbone.pooling == "cls" and pooler is not None:  # [CLS] through the pooler: dense -> tanh
        pooler_dense, activation = getattr(pooler, "dense", None), getattr(pooler, "activation", None)
        if not (isinstance(pooler_dense, nn.Linear) and isinstance(activation, nn.Tanh)):
            raise ValueError(
                f"format=hf: pooling=cls runs through {type(pooler).__name__}, not dense -> tanh, which "
                "neither AutoModelForSequenceClassification nor sentence-transformers carries: export with "
                "format=onnx or safetensors"
            )
        dense.insert(0, _dense(Dense, pooler_dense, nn.Tanh()))
    with tempfile.TemporaryDirectory() as folder:
        encoder.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        config_file = Path(folder) / "config.json"  # the labels, which the Transformer module keeps
        config = json.loads(config_file.read_text())
        config["id2label"] = {str(i): name for i, name in enumerate(class_names)}
        config["label2id"] = {name: i for i, name in enumerate(class_names)}
        config_file.write_text(json.dumps(config, indent=2))
        transformer = Transformer(folder, max_seq_length=tokenizer.model_max_length)
        # in 0_Transformer/, not the root: a root config.json would let AutoModelForSequenceClassification
        # load the folder with a random classifier and the wrong pooling
        transformer.save_in_root = False
        pooling = Pooling(encoder.config.hidden_size, pooling_mode=_SENTENCE_MODES[backbone.pooling])
        SentenceTransformer(modules=[transformer, pooling, *dense], device="cpu").save(str(output))


def _sentence_transformers() -> tuple[type, tuple[type, type, type]]:
    """``SentenceTransformer`` and its ``Dense``, ``Pooling`` and ``Transformer`` modules (version >= 6).

    Raises:
        ImportError: If sentence-transformers is missing or older than 6, naming the extra to install.
    """
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
    except ImportError as error:
        raise ImportError(
            "format=hf writes this run as a sentence-transformers folder, which needs sentence-transformers "
            f">= 6: pip install -e .[hf-export] ({error})"
        ) from error
    return SentenceTransformer, (Dense, Pooling, Transformer)


def _dense(dense: type, linear: nn.Linear, activation: nn.Module | None):
    layer = dense(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        activation_function=copy.deepcopy(activation) if activation is not None else nn.Identity(),
    )
    layer.linear.load_state_dict(linear.state_dict())
    return layer


def _transformers_logits(folder: Path) -> Callable[[list[str], object], torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    return lambda texts, tokens: model(**tokens).logits


def _sentence_logits(folder: Path) -> Callable[[list[str], object], torch.Tensor]:
    model = _sentence_transformers()[0](str(folder), device="cpu")
    return lambda texts, tokens: model.encode(texts, convert_to_tensor=True)


def _onnx_logits(path: Path) -> Callable[[list[str], object], torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda texts, tokens: torch.from_numpy(session.run(None, {n: tokens[n].numpy() for n in names})[0])


def _check_close(module: nn.Module, theirs: Callable, tokenizer, output: Path, loader: str) -> None:
    """Compare ``module``'s logits on :data:`CHECK_TEXTS` (one padded batch) with the exported model's."""
    texts = list(CHECK_TEXTS)
    tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad(), eval_mode(module):
        _compare(module(dict(tokens)), theirs(texts, tokens), output, loader)


def _compare(ours: torch.Tensor, theirs: torch.Tensor, output: Path, loader: str) -> None:
    difference = (ours.float() - torch.as_tensor(theirs).float().cpu()).abs().max().item()
    log.info("%s: max abs logit difference %.3g against the trained model", loader, difference)
    if not difference <= ATOL:
        raise RuntimeError(
            f"{str(output)!r} loaded with {loader} gives logits {difference:.3g} away from the trained "
            f"model's (allowed {ATOL}): the export does not compute the same model"
        )
