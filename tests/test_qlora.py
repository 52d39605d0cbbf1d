"""strategy=qlora|prefix_tuning|prompt_tuning: 4-bit decoders with LoRA, and the decoder-only refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tl_lightning.adapters import prefix_tuning, prompt_tuning, qlora
from tl_lightning.backbones import hf_decoder, hf_encoder, small_cnn

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


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


@pytest.fixture(scope="module")
def tiny_llama64(tiny_llama, tmp_path_factory) -> Path:
    """A decoder of hidden size 64: bitsandbytes' CPU inference kernel needs rows of at least one 64-value
    quantisation block (the 32-wide tiny_llama only trains)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama64")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_merging_qlora_dequantises_the_base_and_keeps_what_the_trained_model_computes(tiny_llama64, tmp_path):
    """predict.py/export.py merge the adapters: in float, never re-quantised into the 4-bit base (PEFT's
    merge does that, an error as large as the adapters' effect)."""
    bnb = pytest.importorskip("bitsandbytes")
    from functools import partial

    from torch import nn

    from tl_lightning.adapters.peft import merge_adapter
    from tl_lightning.modules.causal_lm import CausalLMModule, causal_language_model
    from tl_lightning.run.formats import export_causal_lm

    for build in (hf_decoder, causal_language_model):
        backbone = qlora(build(str(tiny_llama64)), r=8)
        torch.manual_seed(1)
        with torch.no_grad():  # trained adapters: B no longer zero, an effect well above float rounding
            for name, parameter in backbone.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.5)
        module = (
            CausalLMModule(backbone, partial(torch.optim.AdamW)) if build is causal_language_model else None
        )
        holder = module or nn.Module()
        holder.backbone = backbone
        tokens = dict(
            backbone.data_config.load_tokenizer()(["a fine film", "dull"], padding=True, return_tensors="pt")
        )
        with torch.no_grad():
            trained = backbone(tokens)  # train mode: bitsandbytes' exact dequantise-and-multiply path
            with backbone.model.disable_adapter():
                effect = (trained - backbone(tokens)).abs().max()
            backbone.eval()
            repacked = build is causal_language_model
            if (
                repacked
            ):  # an inference forward repacks the 4-bit weights on CPU (bf16 scales): undone on merge
                backbone(tokens)
            assert merge_adapter(holder)
            merged = backbone(tokens)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in backbone.modules())
        # float rounding of the dequantised base; bitsandbytes' CPU repacking rounds its scales to bf16
        tolerance = 0.02 * effect if repacked else 1e-4
        assert effect > 0.05 and (merged - trained).abs().max() < tolerance, (build.__name__, effect)
    export_causal_lm(module.eval(), {}, tmp_path / "lm")  # a plain float model transformers generates from


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


def test_export_of_a_prompt_tuned_language_model_points_to_predict(tiny_llama, tmp_path):
    from functools import partial

    from tl_lightning.modules.causal_lm import CausalLMModule, causal_language_model
    from tl_lightning.run.formats import export_causal_lm

    backbone = prompt_tuning(causal_language_model(str(tiny_llama)), num_virtual_tokens=4)
    module = CausalLMModule(backbone, partial(torch.optim.AdamW)).eval()
    with pytest.raises(ValueError, match=r"format=hf: strategy=prompt_tuning learns virtual .*predict.py"):
        export_causal_lm(module, {}, tmp_path / "lm")
    assert not (tmp_path / "lm").exists()


@pytest.mark.slow
def test_qlora_trains_through_the_pipeline_and_checkpoints_adapters_only(tiny_llama64, tmp_path):
    """strategy=qlora end to end on ``tiny_llama64``: fit, adapter-only checkpoint, test from it (the 4-bit
    base rebuilt)."""
    pytest.importorskip("bitsandbytes")
    import csv
    import json

    from hydra import compose, initialize_config_dir

    from tl_lightning.run.pipeline import train

    with (tmp_path / "reviews.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("text", "label"))
        for i in range(20):
            writer.writerow((f"a fine film{' truly' * (i % 5)}", "pos"))
            writer.writerow((f"dull{' sadly' * (i % 4)}", "neg"))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "backbone=hf_decoder", f"backbone.model_name={tiny_llama64}", "strategy=qlora",
                "data=text_files", f"data.train_file={tmp_path / 'reviews.csv'}", "data.batch_size=8",
                "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1", "+trainer.enable_progress_bar=false",
                "callbacks.rich_progress_bar=null", "allow_short_schedule=true",
                f"paths.output_dir={tmp_path / 'run'}",
            ],
        )  # fmt: skip
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["test"]["test/acc"] <= 1
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(".lora_" in k or k.startswith("heads.target.") for k in state), sorted(state)[:5]
