"""Shared fixtures: compose the real Hydra config and shrink it for a fast CPU run."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "+trainer.enable_progress_bar=false",
    "callbacks.rich_progress_bar=null",
    "data.image_size=32",
    "data.batch_size=16",
    "allow_short_schedule=true",  # one epoch is too short for most strategies' milestones, on purpose
]


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides, run="name")``: the real config, shrunk, written to ``tmp_path/run``."""

    def _make(*overrides: str, fast: bool = True, run: str = "run") -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(
                "train",
                overrides=[*(FAST if fast else []), f"paths.output_dir={tmp_path / run}", *overrides],
            )

    return _make


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer random BERT (hidden 32, with pooler, seed 0) saved with the MiniLM tokenizer: a text
    backbone that builds offline in a second (``backbone=hf_encoder backbone.model_name=<it>``)."""
    import torch
    from transformers import BertConfig, BertModel

    from tl_lightning.backbones import TextConfig
    from tl_lightning.backbones.hf import MINILM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(path)
    TextConfig(MINILM, 256, "mean").load_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 32, grouped-query attention, embeddings tied to the LM head,
    seed 0) saved with SmolLM2's tokenizer: a decoder that builds offline in a second
    (``load_causal_lm(<it>)``, ``backbone=hf_decoder backbone.model_name=<it>``)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tl_lightning.backbones.hf_decoder import smollm2_gguf

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(path)
    return path
