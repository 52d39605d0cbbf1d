"""backbone=hf_decoder: decoder language models as text classifiers, on a tiny random Llama.

The tiny Llama (``tiny_llama`` fixture: 2 layers, tied embeddings, SmolLM2's tokenizer) stands in for
SmolLM2-135M in the pipeline tests; ``test_hf_decoder_smollm2.py`` loads the real file.
"""

from __future__ import annotations

import csv
import errno
import json
import threading
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint

from tl_lightning.backbones import DecoderBackbone, hf_decoder
from tl_lightning.data import TextFilesDataModule
from tl_lightning.data.text import pad_batch
from tl_lightning.run.checkpointing import AsyncAtomicCheckpointIO, WaitForCheckpointWrites
from tl_lightning.run.pipeline import train

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
GOOD = ["a moving, funny and wise film", "great acting and a clever script", "a joy from start to finish"]
BAD = ["dull, slow and far too long", "the plot makes no sense at all", "a waste of a fine cast"]


@pytest.fixture
def reviews(tmp_path) -> Path:
    """40 short labelled reviews (20 per class) of varied lengths."""
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("text", "label"))
        for i in range(20):
            writer.writerow((f"{GOOD[i % 3]}{' truly' * (i % 7)}", "pos"))
            writer.writerow((f"{BAD[i % 3]}{' sadly' * (i % 5)}", "neg"))
    return path


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_llama, tmp_path_factory) -> Path:
    """A 2-layer random GPT-2 (learned *absolute* position embeddings, unlike Llama's rotary ones, which
    are shift-invariant) with the same tokenizer: padding on the left shifts its positions."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cfg(tmp_path, tiny_llama, reviews, *overrides, run="run"):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "backbone=hf_decoder",
                f"backbone.model_name={tiny_llama}",
                "data=text_files",
                f"data.train_file={reviews}",
                "data.batch_size=8",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1",
                "+trainer.enable_progress_bar=false",
                "callbacks.rich_progress_bar=null",
                "allow_short_schedule=true",
                f"paths.output_dir={tmp_path / run}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                *overrides,
            ],
        )


def test_layer_groups_and_no_lm_head(tiny_llama):
    backbone = hf_decoder(str(tiny_llama))
    assert isinstance(backbone, DecoderBackbone) and backbone.num_features == 32
    assert list(backbone.layer_groups()) == ["embed_tokens", "layers.0", "layers.1", "norm"]
    names = [n for group in backbone.layer_groups().values() for n in group]
    assert sorted(names) == sorted(n for n, _ in backbone.named_parameters())  # every parameter, once
    assert not any("lm_head" in n for n, _ in backbone.named_parameters(remove_duplicate=False))
    assert backbone.peft_targets == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"backbone.pooling must be one of \['lasttoken', 'mean'\]"):
        hf_decoder(str(tiny_llama), pooling="cls")
    with pytest.raises(ValueError, match=r"backbone.padding_side must be 'right' or 'left'"):
        hf_decoder(str(tiny_llama), padding_side="middle")


@pytest.mark.parametrize(("model", "pooling"), [("tiny_llama", "lasttoken"), ("tiny_gpt2", "mean")])
def test_left_and_right_padding_give_identical_logits(request, reviews, model, pooling):
    """Through the data module's own batches: the tokenizer's padding side, the same features and logits.

    GPT-2's absolute positions make left padding wrong unless position ids skip the padding."""
    folder = request.getfixturevalue(model)
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 2)
    logits, alone = {}, None
    for side in ("right", "left"):
        backbone = hf_decoder(str(folder), pooling=pooling, padding_side=side).eval()
        data = TextFilesDataModule(backbone.data_config, str(reviews), batch_size=8)
        data.setup("fit")
        assert data.tokenizer.padding_side == side
        assert data.tokenizer.pad_token != data.tokenizer.eos_token
        tokens, _ = next(iter(data.val_dataloader()))
        mask = tokens["attention_mask"]
        assert (mask == 0).any()  # the batch is padded, on the side asked for
        first, last = (0, -1) if side == "left" else (-1, 0)
        assert (mask[:, first] == 0).any() and (mask[:, last] == 1).all()
        with torch.no_grad():
            logits[side] = head(backbone(tokens))
            if alone is None:  # every text on its own, no padding at all
                samples = [data.val_set[i][0] for i in range(len(mask))]
                alone = torch.cat([head(backbone({k: v[None] for k, v in s.items()})) for s in samples])
    torch.testing.assert_close(logits["left"], logits["right"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["right"], alone, rtol=1e-5, atol=1e-5)


def test_pad_batch_left():
    samples = [({"input_ids": torch.tensor([5, 6, 7])}, 0), ({"input_ids": torch.tensor([8])}, 1)]
    tokens, _ = pad_batch(samples, 0, "left")
    assert tokens["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]


STRATEGIES = [
    "linear_probe",
    "full_finetune",
    "lp_ft",
    "gradual_unfreeze",
    "discriminative_lr",
    "l2sp",
    "ewc",
    "lora",
    "ia3",
    "prefix_tuning",
    "prompt_tuning",
]

# the tiny decoder has 4 layer groups: unfreeze one per step, so the 2-step run unfreezes some
EXTRA = {
    "gradual_unfreeze": [
        "callbacks.gradual_unfreeze.groups_per_milestone=1",
        "callbacks.gradual_unfreeze.unit=step",
        "callbacks.gradual_unfreeze.milestones=[1]",
    ]
}


@pytest.mark.slow
def test_every_strategy_trains_and_tests(tmp_path, tiny_llama, reviews):
    """Each classification strategy on the tiny decoder, through the real pipeline (2 steps each)."""
    results = {}
    for strategy in STRATEGIES:
        extra = EXTRA.get(strategy, [])
        cfg = _cfg(tmp_path, tiny_llama, reviews, f"strategy={strategy}", *extra, run=strategy)
        train(cfg)
        metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
        results[strategy] = metrics
        assert metrics["strategy"] == strategy
        assert 0.0 <= metrics["test"]["test/acc"] <= 1.0
    assert results["linear_probe"]["feature_cache"] == "memory"  # token batches through the cache
    trainable = {s: m["params"]["trainable"] for s, m in results.items()}
    assert trainable["prefix_tuning"] < trainable["lora"] < trainable["full_finetune"]
    assert trainable["linear_probe"] == 2 * 32 + 2  # the head alone: the tied LM head is not trained


def _best_at_epoch(monkeypatch, epoch: int) -> None:
    """Make ``epoch`` the only one that improves ``val/acc`` as the checkpoint callbacks see it (the tiny
    random decoder's own accuracies tie or wander)."""
    candidates = ModelCheckpoint._monitor_candidates

    def forced(self, trainer):
        metrics = candidates(self, trainer)
        metrics["val/acc"] = torch.tensor(0.9 if trainer.current_epoch == epoch else 0.5)
        return metrics

    monkeypatch.setattr(ModelCheckpoint, "_monitor_candidates", forced)


@pytest.mark.parametrize("best_epoch", [0, 1])
def test_lora_tests_its_best_checkpoint_after_slow_background_writes(
    tmp_path, tiny_llama, reviews, monkeypatch, best_epoch
):
    """The README's decoder ``lora`` run (best and last ``ModelCheckpoint`` in one folder, adapter-only
    checkpoints, 2 epochs) with epoch 0's writes held back until epoch 1 comes to save: the best file is
    on disk when the test stage loads it, and a previous best is removed only after the new one landed."""
    _best_at_epoch(monkeypatch, best_epoch)
    real_save, next_save_point = torch.save, threading.Event()

    def slow_save(*args, **kwargs):
        next_save_point.wait(timeout=60)  # epoch 0's writes land only once epoch 1 has come to save
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", slow_save)
    loaded, pending = [], []
    real_load, real_wait = AsyncAtomicCheckpointIO.load_checkpoint, WaitForCheckpointWrites._wait

    def load(self, path, *args, **kwargs):
        loaded.append(Path(path).name)
        return real_load(self, path, *args, **kwargs)

    def wait(trainer):
        queued = [Path(p).name for p in trainer.strategy.checkpoint_io.pending]
        pending.extend(queued)
        if queued:
            next_save_point.set()
        real_wait(trainer)

    monkeypatch.setattr(AsyncAtomicCheckpointIO, "load_checkpoint", load)
    monkeypatch.setattr(WaitForCheckpointWrites, "_wait", staticmethod(wait))
    cfg = _cfg(tmp_path, tiny_llama, reviews, "strategy=lora", "trainer.max_epochs=2")
    train(cfg)
    assert pending == ["epoch00.ckpt", "last.ckpt"]  # epoch 0's writes, still queued at epoch 1's save point
    best = f"epoch{best_epoch:02d}.ckpt"
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [best, "last.ckpt"]
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert Path(metrics["best_checkpoint"]) == checkpoints / best
    assert loaded == [best]  # trainer.test read the best, through the writer (which waits for its writes)
    assert torch.load(checkpoints / best, weights_only=True)["epoch"] == best_epoch
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 1


def test_a_failed_write_of_the_best_stops_the_run_and_writes_nothing_after_it(
    tmp_path, tiny_llama, reviews, monkeypatch
):
    """The disk refuses epoch 0's best file only. Before the writer stopped at a failed write, the
    following ``last.ckpt`` writes went on and the error came out only when ``fit`` ended: the README
    run's folder (``last.ckpt`` of the last epoch, no ``epoch00.ckpt``). Now the run stops with the
    error naming the file, and nothing is written after it (no later file to mistake for the best)."""
    _best_at_epoch(monkeypatch, 0)
    real_save = torch.save

    def refuse_the_best(obj, f, *args, **kwargs):
        if Path(getattr(f, "name", "")).name.startswith(".epoch00.ckpt."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", refuse_the_best)
    cfg = _cfg(tmp_path, tiny_llama, reviews, "strategy=lora", "trainer.max_epochs=2")
    with pytest.raises(OSError, match=r"no space left .*epoch00\.ckpt"):
        train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == []  # no partial file, no later last.ckpt
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()
