"""task=causal_lm on tiny random Llama decoders: loss masking, packing, metrics, strategies, resume."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.nn import functional as F

from tl_lightning.callbacks import LMRetention
from tl_lightning.data.instruction import InstructionFilesDataModule
from tl_lightning.data.lm_text import LMTextDataModule, lm_collate, pack_blocks
from tl_lightning.modules.causal_lm import CausalLMModule, causal_language_model, first_choice, token_nll
from tl_lightning.run.config_checks import check_config
from tl_lightning.run.pipeline import train

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "+trainer.enable_progress_bar=false",
    "callbacks.rich_progress_bar=null",
    "logger=none",
    "allow_short_schedule=true",
    "data.batch_size=4",
]
REVIEWS = ["a joy from start to finish", "dull and far too long", "sharp, funny and warm", "a tired mess"]


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """40 review -> fresh/rotten pairs as JSONL (a label set: generated answers are scored)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [
        {
            "prompt": f"Review: {REVIEWS[i % 4]} {i}\nIs it fresh or rotten?",
            "response": ["fresh", "rotten"][i % 2],
        }
        for i in range(40)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _cfg(tmp_path: Path, *overrides: str, run: str = "run"):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*FAST, f"paths.output_dir={tmp_path / run}", *overrides])


def _lm_overrides(tiny_llama: Path, pairs_file: Path) -> list[str]:
    return [
        "task=causal_lm",
        f"backbone.model_name={tiny_llama}",
        "data=instructions",
        f"data.train_file={pairs_file}",
        "data.max_length=64",
        "data.retention_tokens=64",
        "data.retention_block=32",
    ]


def test_labels_mask_the_prompt_and_the_padding_exactly(tiny_llama, pairs_file):
    lm = causal_language_model(str(tiny_llama))
    data = InstructionFilesDataModule(lm.data_config, str(pairs_file), batch_size=3, max_length=64)
    data.setup("fit")
    tokenizer = data.tokenizer
    samples = [data.train_set[i] for i in range(3)]
    batch = lm_collate(samples, tokenizer.pad_token_id)
    prompts, responses = data.load_pairs()["train"]
    for row, sample in enumerate(samples):
        prompt_text = next(
            p
            for p in prompts
            if tokenizer(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                ),
                add_special_tokens=False,
            )["input_ids"]
            == sample["prompt_ids"].tolist()
        )
        response = responses[prompts.index(prompt_text)]
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_text}, {"role": "assistant", "content": response}],
            tokenize=False,
        )
        assert tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()]) == rendered
        n_prompt, n = len(sample["prompt_ids"]), len(sample["input_ids"])
        labels = batch["labels"][row]
        assert (labels[:n_prompt] == -100).all() and (labels[n:] == -100).all()  # prompt, then padding
        assert torch.equal(labels[n_prompt:n], batch["input_ids"][row, n_prompt:n])  # response: all targets
        assert tokenizer.decode(labels[n_prompt:n]) == f"{response}<|im_end|>\n"
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]  # left-padded
        assert torch.equal(prompt, batch["input_ids"][row, :n_prompt])
        assert batch["prompt_mask"][row, -1] == 1
        assert batch["answer"][row] == data.class_names.index(response)
    assert data.class_names == ["fresh", "rotten"]


def _write_pairs(path: Path, prompts: list[str], responses: list[str]) -> str:
    rows = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_val_answers_the_train_split_never_gives_stop_setup(tiny_llama, pairs_file, tmp_path):
    lm = causal_language_model(str(tiny_llama))
    val = _write_pairs(tmp_path / "val.jsonl", ["v1", "v2", "v3"], ["fresh", "maybe", "unsure"])
    data = InstructionFilesDataModule(lm.data_config, str(pairs_file), val_file=val, max_length=64)
    with pytest.raises(
        ValueError, match=r"the val split has answers the train split never gives: \['maybe', 'unsure'\]"
    ):
        data.setup("fit")


def test_a_long_prompt_is_cut_inside_the_user_text_keeping_the_answer_cue(tiny_llama, pairs_file, tmp_path):
    lm = causal_language_model(str(tiny_llama))
    long = "Review: " + "word " * 200 + "\nIs it fresh or rotten?"
    val = _write_pairs(
        tmp_path / "val.jsonl", [long, "Review: fine\nIs it fresh or rotten?"], ["rotten", "fresh"]
    )
    data = InstructionFilesDataModule(lm.data_config, str(pairs_file), val_file=val, max_length=64)
    data.setup("fit")
    cue = "<|im_end|>\n<|im_start|>assistant\n"
    for sample in (data.val_set[0], data.prompt_samples([long])[0]):
        prompt = data.tokenizer.decode(sample["prompt_ids"])
        assert len(sample["prompt_ids"]) <= 64 and prompt.endswith(cue), prompt[-60:]
        assert prompt.startswith(
            data.tokenizer.decode(data.val_set[1]["prompt_ids"])[:40]
        )  # the template's start
    sample = data.val_set[0]
    assert len(sample["input_ids"]) <= 64
    assert data.tokenizer.decode(sample["input_ids"]).endswith(f"{cue}rotten<|im_end|>\n")
    assert data.tokenizer.decode(sample["labels"][sample["labels"] != -100]) == "rotten<|im_end|>\n"


def test_loss_is_the_mean_over_response_tokens_of_the_next_token_nll(tiny_llama, pairs_file):
    lm = causal_language_model(str(tiny_llama))
    data = InstructionFilesDataModule(lm.data_config, str(pairs_file), batch_size=4, max_length=64)
    data.setup("fit")
    module = CausalLMModule(lm, partial(torch.optim.AdamW, lr=1e-3)).eval()
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        nll, count = token_nll(module(batch), batch["labels"])
        total, tokens = 0.0, 0
        for row in range(len(batch["input_ids"])):  # brute force: each pair alone, unpadded
            n = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row, :n]
            logits = lm.model(input_ids=ids[None]).logits[0].log_softmax(-1)
            for t in range(1, n):
                if batch["labels"][row, t] != -100:
                    total -= logits[t - 1, ids[t]].item()
                    tokens += 1
    assert count == tokens > 0
    assert nll.item() == pytest.approx(total, rel=1e-5)


def test_packing_makes_every_token_a_target_and_splits_by_document(tiny_llama, tmp_path):
    blocks = pack_blocks([[5, 6, 7], [8, 9], [10]], block_size=3, eos=2)
    assert [b["input_ids"].tolist() for b in blocks] == [[5, 6, 7], [2, 8, 9], [2, 10, 2]]
    assert all(torch.equal(b["labels"], b["input_ids"]) for b in blocks)
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(f"document number {i} says {'la ' * (i % 5)}" for i in range(50)))
    lm = causal_language_model(str(tiny_llama))
    data = LMTextDataModule(lm.data_config, str(docs), block_size=8, val_fraction=0.2, test_fraction=0.2)
    data.setup("fit")
    assert all(len(b["input_ids"]) == 8 for s in (data.train_set, data.val_set) for b in s)
    batch = next(iter(data.train_dataloader()))
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].all()
    seen = {}
    for split in ("train", "val", "test"):
        text = data.tokenizer.decode(torch.cat([b["input_ids"] for b in getattr(data, f"{split}_set")]))
        seen[split] = {int(n) for n in __import__("re").findall(r"number (\d+)", text)}
    assert (
        not (seen["train"] & seen["val"])
        and not (seen["train"] & seen["test"])
        and not (seen["val"] & seen["test"])
    )


def test_first_choice_counts_only_an_answer_that_opens_with_exactly_one_choice():
    choices = ["fresh", "rotten"]
    assert first_choice("Fresh: a fine film", choices) == 0
    assert first_choice(" ROTTEN.", choices) == 1
    assert first_choice("Fresh, fresh!", choices) == 0
    for wrong in ("Not fresh.", "Fresh? No, rotten.", "It is rotten", "refreshing", "I cannot say", ""):
        assert first_choice(wrong, choices) == -1, wrong
    assert first_choice("very good", ["good", "very good"]) == 1  # a multi-word choice opens it whole


def test_lm_retention_is_the_perplexity_of_the_general_text(tiny_llama):
    lm = causal_language_model(str(tiny_llama))
    module = CausalLMModule(lm, partial(torch.optim.AdamW, lr=1e-3))
    ids = torch.arange(100, 164).view(4, 16)
    probe = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    callback = LMRetention({"code": probe})
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert callback.evaluate(module)["code"] == pytest.approx(expected, rel=1e-5)
    callback.start = {"code": expected - math.log(2)}  # the start was half as perplexed
    restored = LMRetention({"code": probe})
    restored.load_state_dict(callback.state_dict())
    assert restored.start == callback.start


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=causal_lm", "backbone=efficientnet_lite0"], "use backbone=causal_lm"),
        (["task=causal_lm", "data=rotten_tomatoes"], "use task=classification"),
        (["data=lm_text", "data.train_file=x.txt"], "use task=causal_lm"),
        (["backbone=causal_lm"], "train it with task=causal_lm"),
        (["task=causal_lm", "head=linear"], "use head=language_model"),
        *(
            (
                ["task=causal_lm", f"strategy={s}"],
                f"strategy={s} does not apply to task=causal_lm.*full_finetune\\|lora",
            )
            for s in (
                "linear_probe",
                "linear_probe_lbfgs",
                "lp_ft",
                "source_only",
                "dann",
                "mmd",
                "multitask",
            )
        ),
    ],
)
def test_mixed_tasks_stop_before_anything_is_built(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(_cfg(tmp_path, *overrides))


@pytest.mark.slow
def test_every_head_free_strategy_trains_a_language_model(tiny_llama, pairs_file, tmp_path):
    strategies = {
        "lora": [],
        "ia3": [],
        "l2sp": [],
        "ewc": ["callbacks.ewc.fisher_samples=8"],
        "prefix_tuning": ["adapter.num_virtual_tokens=4"],
        "prompt_tuning": ["adapter.num_virtual_tokens=4"],
        "discriminative_lr": [],
        "gradual_unfreeze": [
            "callbacks.gradual_unfreeze.milestones=[0,1]",
            "callbacks.gradual_unfreeze.unit=step",
        ],
    }
    for strategy, extra in strategies.items():
        cfg = _cfg(
            tmp_path, *_lm_overrides(tiny_llama, pairs_file), f"strategy={strategy}", *extra, run=strategy
        )
        train(cfg)
        metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
        assert metrics["global_step"] == 2, strategy
        for key in (
            "test/loss",
            "test/ppl",
            "test/acc",
            "source/python_stdlib_ppl_change",
            "source/python_docs_ppl",
        ):
            assert math.isfinite(metrics["test"][key]), (strategy, key)
        assert metrics["test"]["test/ppl"] == pytest.approx(math.exp(metrics["test"]["test/loss"]), rel=1e-5)


@pytest.mark.slow
def test_resumed_run_equals_the_straight_run(tiny_llama, pairs_file, tmp_path):
    from resume_helpers import last_weights

    base = [
        *_lm_overrides(tiny_llama, pairs_file),
        "strategy=full_finetune",
        "trainer.max_epochs=2",
        "module.optimizer.lr=1e-2",
    ]
    straight = _cfg(tmp_path, *base, run="straight")
    train(straight)
    stopped = _cfg(
        tmp_path,
        *base,
        "+callbacks.stop._target_=resume_helpers.StopAfterEpoch",
        "+callbacks.stop.epoch=0",
        run="resumed",
    )
    train(stopped)
    last = Path(stopped.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = _cfg(tmp_path, *base, f"ckpt_path={last}", run="resumed")
    train(resumed)
    a, b = last_weights(straight), last_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    first = json.loads((Path(straight.paths.output_dir) / "metrics.json").read_text())
    second = json.loads((Path(resumed.paths.output_dir) / "metrics.json").read_text())
    assert first["test"] == second["test"]  # the retention start survived the resume too
