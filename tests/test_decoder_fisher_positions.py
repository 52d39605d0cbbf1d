"""EWC's Fisher on decoders sees the forward training uses, also on left-padded prompts (GPT-2 positions).

``CausalLMModule.source_logits`` reads the answer-start distribution from the *left-padded* prompts of an
instruction batch, while training reads the same position from the right-padded ``input_ids``. A model
with absolute position embeddings (GPT-2) gives both the same logits only when position ids skip the
padding; Llama's rotary positions are shift-invariant, so the tiny GPT-2 is the case that tells.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from test_causal_lm import pairs_file  # noqa: F401 (a fixture)
from test_hf_decoder import tiny_gpt2  # noqa: F401 (a fixture)
from torch.nn import functional as F

from tl_lightning.backbones import hf_decoder
from tl_lightning.data.instruction import InstructionFilesDataModule
from tl_lightning.data.lm_text import lm_collate
from tl_lightning.fisher import fisher_diagonal
from tl_lightning.modules import LinearHead, TransferModule
from tl_lightning.modules.causal_lm import CausalLMModule, causal_language_model

LABELS = torch.tensor([100, 200, 300, 400])  # any tokens: the empirical Fisher of fixed labels


def _lm_samples(folder, pairs_file) -> tuple[CausalLMModule, list[dict], int]:  # noqa: F811
    """The tiny decoder as a ``CausalLMModule``, 4 instruction samples (prompt lengths differ), pad id."""
    lm = causal_language_model(str(folder))
    module = CausalLMModule(lm, partial(torch.optim.AdamW, lr=1e-3)).eval()
    data = InstructionFilesDataModule(lm.data_config, str(pairs_file), batch_size=4, max_length=64)
    data.setup("fit")
    samples = [data.train_set[i] for i in range(4)]
    assert len({len(s["prompt_ids"]) for s in samples}) > 1  # a batch of them left-pads some prompts
    return module, samples, data.tokenizer.pad_token_id


def _reference_fisher(module, inputs: list, names: list[str], method: str) -> dict[str, torch.Tensor]:
    """Mean squared gradient of ``-log p(label)``, one unpadded sample per backward pass."""
    params = dict(module.named_parameters())
    reference = {name: torch.zeros_like(params[name]) for name in names}
    for x, label in zip(inputs, LABELS, strict=True):
        module.zero_grad()
        F.cross_entropy(getattr(module, method)(x), label[None]).backward()
        for name in names:
            if params[name].grad is not None:
                reference[name] += params[name].grad ** 2 / len(inputs)
    return reference


def _assert_fisher_close(fisher: dict, reference: dict) -> None:
    error = sum((fisher[n] - reference[n]).abs().sum() for n in reference)
    # relative L1 error 0.51 with GPT-2's positions shifted by the left padding
    assert error / sum(r.abs().sum() for r in reference.values()) < 1e-5


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_source_logits_are_the_training_forward_at_the_answer_start(request, model, pairs_file):  # noqa: F811
    module, samples, pad = _lm_samples(request.getfixturevalue(model), pairs_file)
    batch = lm_collate(samples, pad)
    with torch.no_grad():
        training = module(batch)  # right-padded prompt + response
        at_answer = torch.stack([training[i, len(s["prompt_ids"]) - 1] for i, s in enumerate(samples)])
        alone = torch.cat([module.source_logits(lm_collate([s], pad)) for s in samples])  # no padding
        # GPT-2 before position ids followed the mask: 0.56 apart on the padded rows
        torch.testing.assert_close(module.source_logits(batch), at_answer, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(at_answer, alone, rtol=1e-5, atol=1e-5)


def test_causal_lm_fisher_equals_the_per_sample_reference_under_left_padding(tiny_gpt2, pairs_file):  # noqa: F811
    module, samples, pad = _lm_samples(tiny_gpt2, pairs_file)
    names = [n for n, _ in module.named_parameters() if n.startswith("backbone.")]
    fisher = fisher_diagonal(
        module, [(lm_collate(samples, pad), LABELS)], mode="empirical", params=names, method="source_logits"
    )
    reference = _reference_fisher(module, [lm_collate([s], pad) for s in samples], names, "source_logits")
    _assert_fisher_close(fisher, reference)


def test_hf_decoder_fisher_equals_the_per_sample_reference_under_left_padding(tiny_gpt2):  # noqa: F811
    backbone = hf_decoder(str(tiny_gpt2), padding_side="left")
    module = TransferModule(backbone, LinearHead(32, 2), 2, torch.optim.SGD).eval()
    tokenizer = backbone.data_config.load_tokenizer()
    texts = ["a joy", "dull and far too long", "sharp, funny and warm at every turn", "a tired mess"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    assert (batch["attention_mask"][:, 0] == 0).any()
    names = [n for n, _ in module.named_parameters() if n.startswith("backbone.")]
    fisher = fisher_diagonal(
        module, [(batch, LABELS)], mode="empirical", params=names, method="source_logits"
    )
    alone = [dict(tokenizer([t], return_tensors="pt")) for t in texts]
    _assert_fisher_close(fisher, _reference_fisher(module, alone, names, "source_logits"))
