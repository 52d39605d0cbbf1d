"""Prefix/prompt-tuning runs through predict.py and export.py keep their learned virtual tokens.

PEFT prompt learning cannot be merged into plain weights: ``load_trained`` keeps the PEFT model, and a
``format=safetensors`` export holds the virtual tokens with the adapter config, so loading it back
computes what the trained module does (not the base model's outputs); ``format=hf`` stops, naming the
strategy and what to use instead.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from test_causal_lm import _cfg as _lm_cfg
from test_causal_lm import _lm_overrides, pairs_file  # noqa: F401 (a fixture)
from test_hf_decoder import BAD, GOOD, reviews  # noqa: F401 (a fixture)
from test_hf_decoder import _cfg as _classifier_cfg

from tl_lightning.data.lm_text import lm_collate
from tl_lightning.modules.rebuild import load_run_checkpoint
from tl_lightning.run.inference import (
    export_checkpoint,
    load_trained,
    predict,
    predict_to_file,
    prepare_texts,
)
from tl_lightning.run.merge import merge_checkpoints
from tl_lightning.run.pipeline import train

STRATEGIES = ["prompt_tuning", "prefix_tuning"]
PROMPTS = ["Review: a joy\nIs it fresh or rotten?", "Tell me about the sea, in one long sentence."]
SAMPLED = {"max_new_tokens": 6, "do_sample": True, "seed": 3}


def _trained(cfg) -> Path:
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module", params=STRATEGIES)
def lm_run(request, tiny_llama, pairs_file, tmp_path_factory) -> tuple[str, Path]:  # noqa: F811
    """``(strategy, checkpoint)`` of a ``task=causal_lm`` prefix/prompt-tuning run on the tiny decoder."""
    overrides = [f"strategy={request.param}", "adapter.num_virtual_tokens=4", "module.optimizer.lr=0.5"]
    lm = [*_lm_overrides(tiny_llama, pairs_file), "callbacks.lm_retention=null"]
    return request.param, _trained(_lm_cfg(tmp_path_factory.mktemp(request.param), *lm, *overrides))


def _lm_logits(module, tokenizer) -> torch.Tensor:
    ids = [torch.tensor(tokenizer(p)["input_ids"]) for p in PROMPTS]
    batch = lm_collate([{"input_ids": i, "labels": i} for i in ids], tokenizer.pad_token_id)
    with torch.no_grad():
        return module({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})


def _generations(path: Path, output: Path) -> list[dict]:
    return list(csv.DictReader(predict_to_file(path, None, output, texts=PROMPTS, generation=SAMPLED).open()))


def test_causal_lm_checkpoint_and_safetensors_export_keep_the_virtual_tokens(lm_run, tmp_path):
    strategy, lm_checkpoint = lm_run
    trained, _ = load_run_checkpoint(lm_checkpoint)  # the trained module, its PEFT model as in training
    expected = _lm_logits(trained, trained.tokenizer)
    base = load_trained(lm_checkpoint).module
    base.backbone.model = base.backbone.model.get_base_model()  # the same weights without the virtual tokens
    assert (_lm_logits(base, trained.tokenizer) - expected).abs().max() > 0.1  # the learned prompt matters

    loaded = load_trained(lm_checkpoint)
    torch.testing.assert_close(_lm_logits(loaded.module, trained.tokenizer), expected, rtol=0, atol=0)
    exported = export_checkpoint(lm_checkpoint, "safetensors", tmp_path / "model.safetensors")
    again = load_trained(exported)  # the base rebuilt from its pretrained weights, the virtual tokens loaded
    torch.testing.assert_close(_lm_logits(again.module, trained.tokenizer), expected, rtol=0, atol=0)
    assert _generations(exported, tmp_path / "a.csv") == _generations(lm_checkpoint, tmp_path / "b.csv")
    with pytest.raises(ValueError, match=f"strategy={strategy} learns virtual tokens.*format=safetensors"):
        export_checkpoint(lm_checkpoint, "hf", tmp_path / "lm")
    assert not (tmp_path / "lm").exists()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hf_decoder_classifier_export_keeps_the_virtual_tokens(strategy, tiny_llama, reviews, tmp_path):  # noqa: F811
    overrides = [f"strategy={strategy}", "adapter.num_virtual_tokens=4", "module.optimizer.lr=0.5"]
    checkpoint = _trained(_classifier_cfg(tmp_path, tiny_llama, reviews, *overrides))
    trained, _ = load_run_checkpoint(checkpoint)
    model = load_trained(export_checkpoint(checkpoint, "safetensors", tmp_path / "model.safetensors"))
    with torch.no_grad():
        for tokens, _ in prepare_texts(model, GOOD + BAD):
            torch.testing.assert_close(model.module(tokens), trained(tokens), rtol=0, atol=0)
    assert json.dumps(predict(model, GOOD + BAD, device="cpu")) == json.dumps(
        predict(load_trained(checkpoint), GOOD + BAD, device="cpu")
    )
    for format in ("hf", "onnx"):
        with pytest.raises(ValueError, match=f"format={format}: strategy={strategy} learns virtual tokens"):
            export_checkpoint(checkpoint, format, tmp_path / f"model.{format}")
    with pytest.raises(ValueError, match="prefix/prompt-tuning run.*no task vector"):
        merge_checkpoints([str(checkpoint)], [1.0])
    # as a kept head, the merged plain backbone would replace its virtual tokens (it loaded cleanly, the
    # adapter set to null: not that run any more)
    full = _trained(_classifier_cfg(tmp_path, tiny_llama, reviews, "strategy=full_finetune", run="full"))
    with pytest.raises(
        ValueError, match=f"{re.escape(str(checkpoint))}'.*prefix/prompt-tuning run.*drop its virtual tokens"
    ):
        merge_checkpoints([str(full)], [1.0], head_paths=[str(checkpoint)])


def test_merge_refuses_virtual_tokens_under_any_adapter_name():
    from tl_lightning.run.merge import refuse_virtual_tokens

    wrapped = {  # a user's own wrapper around prompt_tuning: its target names neither PEFT function
        "tl_lightning": {"config": {"adapter": {"_target_": "builtins.dict"}}},
        "state_dict": {"backbone.model.prompt_encoder.default.embedding.weight": torch.zeros(4, 8)},
    }
    with pytest.raises(ValueError, match="prefix/prompt-tuning run"):
        refuse_virtual_tokens(wrapped, "wrapped.ckpt")
    lora = {**wrapped, "state_dict": {"backbone.model.lora_A.weight": torch.zeros(1)}}
    refuse_virtual_tokens(lora, "lora.ckpt")  # no virtual tokens: passes
