"""A task=causal_lm run predict.py generates; export.py format=hf generates our tokens in transformers."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_causal_lm import _cfg, _lm_overrides, pairs_file  # noqa: F401 (a fixture)

from tl_lightning.modules.causal_lm import CausalLMModule, causal_language_model
from tl_lightning.modules.rebuild import load_run_checkpoint
from tl_lightning.run.formats import export_causal_lm
from tl_lightning.run.inference import export_checkpoint, predict_to_file
from tl_lightning.run.pipeline import train

PROMPTS = ["Review: a joy\nIs it fresh or rotten?", "Tell me about the sea.", "Why?"]


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_llama, pairs_file, tmp_path_factory) -> Path:  # noqa: F811
    """A LoRA run on the tiny decoder whose adapters moved (a high LR), as ``checkpoints/last.ckpt``."""
    tmp = tmp_path_factory.mktemp("lora_lm")
    cfg = _cfg(
        tmp,
        *_lm_overrides(tiny_llama, pairs_file),
        "strategy=lora",
        "module.optimizer.lr=0.05",
        "callbacks.lm_retention=null",
    )
    train(cfg)
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(path, weights_only=True)["state_dict"]
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())  # the adapters trained
    return path


def _transformers_greedy(folder: Path, prompt: str, new_tokens: int) -> tuple[list[int], str]:
    """What a plain transformers user gets: the chat template, greedy decoding, the new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**chat, max_new_tokens=new_tokens, do_sample=False)[0, chat["input_ids"].shape[1] :]
    return out.tolist(), tokenizer.decode(out, skip_special_tokens=True)


def test_exported_tokenizer_pads_left_so_batched_generation_equals_one_at_a_time(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = CausalLMModule(
        causal_language_model(str(tiny_llama)), partial(torch.optim.AdamW, lr=1e-3)
    ).eval()
    folder = export_causal_lm(module, {}, tmp_path / "lm")
    assert module.tokenizer.padding_side == "right"  # the run's own tokenizer is left as it was
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert tokenizer.padding_side == "left"
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in PROMPTS
    ]
    with torch.no_grad():
        single = [
            model.generate(**tokenizer(t, return_tensors="pt", add_special_tokens=False), max_new_tokens=6)[
                0, -6:
            ]
            for t in texts
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batched = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, -6:]
    assert batched.tolist() == [s.tolist() for s in single]


@pytest.mark.slow
def test_export_hf_merges_the_adapters_and_generates_our_tokens(lora_checkpoint, tmp_path):
    folder = export_checkpoint(lora_checkpoint, "hf", tmp_path / "lm")
    weights = load_file(str(folder / "model.safetensors"))
    assert not any("lora" in key for key in weights)  # merged: a plain LlamaForCausalLM
    adapted, _ = load_run_checkpoint(lora_checkpoint)  # the trained module with its adapters, unmerged
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    for prompt in PROMPTS:
        theirs, _ = _transformers_greedy(folder, prompt, 12)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        ours = adapted.generate(ids, torch.ones_like(ids), 12)[0].tolist()
        assert ours == theirs, prompt


@pytest.mark.slow
def test_predict_generates_with_the_runs_chat_template(lora_checkpoint, tmp_path):
    output = predict_to_file(
        lora_checkpoint, None, tmp_path / "generations.csv", texts=PROMPTS, generation={"max_new_tokens": 6}
    )
    rows = list(csv.DictReader(output.open()))
    assert [r["prompt"] for r in rows] == PROMPTS
    folder = export_checkpoint(lora_checkpoint, "hf", tmp_path / "lm")
    for row in rows:
        assert row["generation"] == _transformers_greedy(folder, row["prompt"], 6)[1]
    sampled = [
        list(
            csv.DictReader(
                predict_to_file(
                    lora_checkpoint,
                    None,
                    tmp_path / f"s{i}.csv",
                    texts=PROMPTS,
                    generation={"max_new_tokens": 6, "do_sample": True, "seed": 3},
                ).open()
            )
        )
        for i in range(2)
    ]
    assert sampled[0] == sampled[1]  # seeded sampling repeats
    with pytest.raises(ValueError, match="temperature"):
        predict_to_file(
            lora_checkpoint,
            None,
            tmp_path / "x.csv",
            texts=PROMPTS,
            generation={"do_sample": True, "temperature": 0.0},
        )


@pytest.mark.slow
def test_ddp_ranks_agree_and_validation_sums_equal_one_process(tiny_llama, pairs_file, tmp_path):  # noqa: F811
    """Two gloo processes train the same adapters, and their summed validation metrics are the whole set's."""
    import json
    import subprocess
    import sys

    from causal_lm_ddp_script import overrides
    from hydra import compose, initialize_config_dir
    from test_causal_lm import CONF_DIR

    script = Path(__file__).with_name("causal_lm_ddp_script.py")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(script), str(out), str(tiny_llama), str(pairs_file)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    weights = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys() and any("lora_B" in k for k in weights[0])
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    logged = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert logged[0] == logged[1]
    # one process validates the saved weights on the whole validation set: the same loss, ppl and accuracy
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides(str(out), str(tiny_llama), str(pairs_file)))
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from tl_lightning.run.pipeline import rebuild_module

    checkpoint = torch.load(out / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    module = rebuild_module(
        checkpoint["tl_lightning"]["config"], 2, checkpoint["tl_lightning"]["data_config"]
    )
    module.load_state_dict(checkpoint["state_dict"])
    data = instantiate(cfg.data, data_config=module.backbone.data_config)
    (single,) = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(
        module, datamodule=data
    )
    for key in ("val/loss", "val/ppl", "val/acc"):
        assert single[key] == pytest.approx(logged[0][key], rel=1e-5), key
