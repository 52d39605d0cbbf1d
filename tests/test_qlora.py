"""strategy=qlora|prefix_tuning|prompt_tuning: 4-bit decoders with LoRA, and the decoder-only refusals."""

from __future__ import annotations

import pytest
import torch

from tl_lightning.adapters import prefix_tuning, prompt_tuning, qlora
from tl_lightning.backbones import hf_decoder, hf_encoder, small_cnn


def test_qlora_quantises_the_decoder_to_4_bits_and_trains_lora_only(tiny_llama):
    bnb = pytest.importorskip("bitsandbytes")  # the dev extra installs it; CI runs this test
    backbone = qlora(hf_decoder(str(tiny_llama)), r=4)
    linear = backbone.model.base_model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(linear, bnb.nn.Linear4bit) and linear.weight.quant_state.quant_type == "nf4"
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert list(backbone.layer_groups()) == ["embed_tokens", "layers.0", "layers.1", "norm"]
    tokens = backbone.data_config.load_tokenizer()(["a fine film", "dull"], padding=True, return_tensors="pt")
    features = backbone(tokens)
    features.square().sum().backward()
    lora_b = [p for n, p in backbone.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None for p in lora_b)
    # the base is really quantised: close to the float decoder's features, not equal (no dropout in Llama)
    plain = hf_decoder(str(tiny_llama))
    with torch.no_grad():
        gap = (backbone(tokens) - plain(tokens)).abs().max() / plain(tokens).abs().max()
    assert 0 < gap < 0.5


@pytest.mark.parametrize("adapter", [prefix_tuning, prompt_tuning, qlora])
def test_decoder_only_adapters_refuse_encoders_and_images(tiny_bert, adapter):
    with pytest.raises(ValueError, match=r"BERT encoders in transformers 5.x lack.*strategy=lora\|ia3"):
        adapter(hf_encoder(str(tiny_bert)))
    with pytest.raises(ValueError, match=r"is not a language model"):
        adapter(small_cnn())


@pytest.mark.parametrize("adapter", [prefix_tuning, prompt_tuning])
def test_prompt_learning_trains_only_virtual_tokens_and_pads_right(tiny_llama, adapter):
    backbone = adapter(hf_decoder(str(tiny_llama), padding_side="left"), num_virtual_tokens=4)
    assert backbone.data_config.padding_side == "right"
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"model.prompt_encoder.default.embedding.weight"}
    assert backbone._group_of["prompt_encoder.default.embedding.weight"] == "embed_tokens"
    tokens = backbone.data_config.load_tokenizer()(["a fine film", "dull"], padding=True, return_tensors="pt")
    backbone(tokens).square().sum().backward()
    grad = backbone.model.prompt_encoder.default.embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the virtual tokens reach the features
