"""Generation under prefix/prompt tuning follows the forward training uses (virtual tokens included).

Under transformers 5 PEFT's own ``generate`` loses a prefix (it passes it as ``past_key_values``: a
Llama's first logits were the base model's) and drifts from the training forward after the first step
under prompt tuning (up to 0.09 apart in the tiny Llama's logits, 0.5 in GPT-2's), so ``val/acc`` and
``predict.py`` scored another model than the one trained. The tiny models' adapters are pushed away from
their init so the learned prompt changes the tokens.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from test_hf_decoder import tiny_gpt2  # noqa: F401 (a fixture)

from tl_lightning.adapters import prefix_tuning, prompt_tuning
from tl_lightning.data.lm_text import lm_collate
from tl_lightning.modules.causal_lm import CausalLMModule, causal_language_model

PROMPTS = ["Review: a joy from start to end. Is it fresh or rotten?", "Tell me about the sea."]
NEW_TOKENS = 8
CASES = [(model, adapter) for model in ("tiny_llama", "tiny_gpt2") for adapter in ("prefix", "prompt")]


def _module(folder, adapter: str) -> CausalLMModule:
    """The tiny decoder as a ``CausalLMModule`` with 4 virtual tokens, moved well away from their init.

    Noise on the frozen weights too: at their init the tiny models echo their last token whatever came
    before it, which hides what the virtual tokens change.
    """
    wrap = {"prefix": prefix_tuning, "prompt": prompt_tuning}[adapter]
    module = CausalLMModule(
        wrap(causal_language_model(str(folder)), num_virtual_tokens=4), partial(torch.optim.AdamW, lr=1e-3)
    ).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            scale = 2.0 if parameter.requires_grad else 0.3
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


def _prompts(module: CausalLMModule) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The unpadded prompts, and the left-padded batch of them ``generate`` takes."""
    ids = [torch.tensor(module.tokenizer(p)["input_ids"]) for p in PROMPTS]
    batch = lm_collate([{"input_ids": i, "labels": i, "prompt_ids": i, "answer": -1} for i in ids], 0)
    return ids, batch


def _forward_greedy(module: CausalLMModule, ids: torch.Tensor) -> list[int]:
    """Greedy decoding by hand: the argmax of the training forward's last position, no cache."""
    tokens = ids[None]
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            token = module({"input_ids": tokens, "attention_mask": torch.ones_like(tokens)})[0, -1].argmax()
            tokens = torch.cat([tokens, token.view(1, 1)], 1)
    return tokens[0, len(ids) :].tolist()


def _rows(new: torch.Tensor) -> list[list[int]]:
    return [row[:NEW_TOKENS].tolist() for row in new]


@pytest.mark.parametrize(("model", "adapter"), CASES)
def test_greedy_generation_is_the_training_forward_not_the_base_model(request, model, adapter):
    module = _module(request.getfixturevalue(model), adapter)
    ids, batch = _prompts(module)
    new = module.generate(batch["prompt_ids"], batch["prompt_mask"], NEW_TOKENS)
    assert new.shape == (len(PROMPTS), NEW_TOKENS)  # the random model never says EOS in 8 tokens
    assert _rows(new) == [_forward_greedy(module, i) for i in ids]
    base = module.backbone.model.get_base_model()
    without_prompt = [
        base.generate(input_ids=i[None], max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(i) :].tolist()
        for i in ids
    ]
    assert _rows(new) != without_prompt  # the learned virtual tokens change the answer


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_prompt_tuning_generates_what_the_base_model_generates_after_the_virtual_embeddings(request, model):
    """An independent reference: transformers' cached ``generate`` on the virtual + word embeddings."""
    module = _module(request.getfixturevalue(model), "prompt")
    ids, batch = _prompts(module)
    peft = module.backbone.model
    virtual = peft.prompt_encoder["default"].embedding.weight
    base = peft.get_base_model()
    with torch.no_grad():
        expected = []
        for i in ids:
            embeds = torch.cat([virtual, base.get_input_embeddings()(i)])[None]
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            out = base.generate(
                inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False
            )
            expected.append(out[0, -NEW_TOKENS:].tolist())
    assert _rows(module.generate(batch["prompt_ids"], batch["prompt_mask"], NEW_TOKENS)) == expected


@pytest.mark.parametrize("adapter", ["prefix", "prompt"])
def test_seeded_sampling_repeats_and_other_generate_options_are_refused(tiny_llama, adapter):
    module = _module(tiny_llama, adapter)
    _, batch = _prompts(module)
    args = (batch["prompt_ids"], batch["prompt_mask"], NEW_TOKENS, True)

    def sampled(seed: int, **options) -> list[list[int]]:
        torch.manual_seed(seed)
        return _rows(module.generate(*args, **options))

    assert sampled(3, temperature=0.7, top_p=0.9) == sampled(3, temperature=0.7, top_p=0.9)
    assert sampled(3) != sampled(4)
    greedy = _rows(module.generate(*args[:3]))
    assert sampled(3, temperature=1e-4) == greedy  # all mass on the argmax: sampling reads the same logits
    for option in ({"top_k": 5}, {"num_beams": 2}, {"repetition_penalty": 1.3}):
        with pytest.raises(ValueError, match=f"{next(iter(option))}.*prefix/prompt tuning"):
            module.generate(*args, **option)


def test_generation_config_settings_the_forward_decoding_cannot_apply_are_refused(tiny_llama):
    module = _module(tiny_llama, "prompt")
    _, batch = _prompts(module)
    config = module.backbone.model.generation_config
    config.repetition_penalty = 1.0  # neutral: decoded as before
    module.generate(batch["prompt_ids"], batch["prompt_mask"], 2)
    config.no_repeat_ngram_size = 1  # generate would forbid repeats; the forward decoding would not
    with pytest.raises(ValueError, match="no_repeat_ngram_size.*prefix/prompt tuning"):
        module.generate(batch["prompt_ids"], batch["prompt_mask"], 2)
