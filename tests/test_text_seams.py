"""Text seams: length-grouped order per epoch and under DDP, adapter checkpoints of encoders whose file
lacks a tensor, unlabelled rows, and sentence-transformers pooling configs.

The tiny random BERT and the review helpers come from ``test_text.py``.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ddp_text_script import BATCH_SIZE, EPOCHS
from hydra import compose, initialize_config_dir
from test_text import BAD, CONF_DIR, GOOD, _write_csv

from tl_lightning.backbones import TextConfig, hf_encoder
from tl_lightning.backbones.hf import MINILM
from tl_lightning.data import HFDatasetDataModule, TextFilesDataModule
from tl_lightning.data.text import pad_batch
from tl_lightning.run.pipeline import rebuild_module, train


@pytest.fixture
def distinct_reviews(tmp_path) -> Path:
    """60 distinct labelled reviews (30 per class) of varied lengths: a batch's tokens name its samples."""
    rows = []
    for i in range(30):
        rows.append((f"{GOOD[i % 3]}{' truly' * (i % 7)} {i}", "pos"))
        rows.append((f"{BAD[i % 3]}{' sadly' * (i % 5)} {i}", "neg"))
    return _write_csv(tmp_path / "reviews.csv", rows)


def _cfg(out: Path, model: Path, reviews: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "backbone=hf_encoder",
                f"backbone.model_name={model}",
                "data=text_files",
                f"data.train_file={reviews}",
                "data.batch_size=8",
                "+trainer.enable_progress_bar=false",
                "callbacks.rich_progress_bar=null",
                "logger=none",
                "allow_short_schedule=true",
                f"paths.output_dir={out}",
                *overrides,
            ],
        )


# --- data.group_by_length: a new order every epoch, resume-exact, one shard per DDP process --------


def _expected_batches(data, epoch: int, replicas: int = 1, rank: int = 0) -> list[list[int]]:
    from tl_lightning.data.text import LengthGroupedSampler

    lengths = [len(tokens["input_ids"]) for tokens in data.train_set.encodings]
    sampler = LengthGroupedSampler(
        lengths, data.batch_size, data.shuffle_seed, num_replicas=replicas, rank=rank
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i : i + data.batch_size] for i in range(0, len(order), data.batch_size)]


def _recorded(out: Path, rank: int = 0) -> dict[int, list[list[int]]]:
    return {int(e): batches for e, batches in json.loads((out / f"rank{rank}.json").read_text()).items()}


_GROUPED_RUN = [
    "data.group_by_length=true",
    "strategy=full_finetune",
    "trainer.max_epochs=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "+callbacks.order._target_=ddp_text_script.BatchOrder",
]


def test_group_by_length_order_changes_every_epoch(tmp_path, tiny_bert, distinct_reviews):
    """Through ``Trainer.fit``: the batches ``training_step`` sees are the order of (seed, epoch)."""
    cfg = _cfg(
        tmp_path / "run", tiny_bert, distinct_reviews, *_GROUPED_RUN, f"+callbacks.order.out={tmp_path}"
    )
    train(cfg)
    seen = _recorded(tmp_path)
    data = TextFilesDataModule(hf_encoder(str(tiny_bert)).data_config, str(distinct_reviews), batch_size=8)
    data.setup("fit")
    assert sorted(seen) == [0, 1, 2]
    assert seen[0] != seen[1] and seen[1] != seen[2] and seen[0] != seen[2]
    for epoch, batches in seen.items():
        assert sorted(i for batch in batches for i in batch) == list(range(len(data.train_set)))
        assert batches == _expected_batches(data, epoch)


def test_group_by_length_resumes_the_order_of_a_straight_run(tmp_path, tiny_bert, distinct_reviews):
    """Stopped after epoch 0 and resumed: epochs 1 and 2 run the batches of (seed, epoch), as a straight
    run does (the test above)."""
    cut = _cfg(
        tmp_path / "cut",
        tiny_bert,
        distinct_reviews,
        *_GROUPED_RUN,
        f"+callbacks.order.out={tmp_path}/cut",
        "+callbacks.stop._target_=resume_helpers.StopAfterEpoch",
        "+callbacks.stop.epoch=0",
    )
    train(cut)
    checkpoint = Path(cut.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = _cfg(
        tmp_path / "resumed",
        tiny_bert,
        distinct_reviews,
        *_GROUPED_RUN,
        f"+callbacks.order.out={tmp_path}/resumed",
        f"ckpt_path={checkpoint}",
    )
    train(resumed)
    data = TextFilesDataModule(hf_encoder(str(tiny_bert)).data_config, str(distinct_reviews), batch_size=8)
    data.setup("fit")
    before, after = _recorded(tmp_path / "cut"), _recorded(tmp_path / "resumed")
    assert sorted(before) == [0] and sorted(after) == [1, 2]
    assert after[1] != before[0] and after[2] != after[1]
    assert before == {0: _expected_batches(data, 0)}
    assert after == {1: _expected_batches(data, 1), 2: _expected_batches(data, 2)}


@pytest.mark.slow
def test_group_by_length_shards_under_ddp(tmp_path, tiny_bert, distinct_reviews):
    """``trainer=ddp_cpu`` (two gloo processes): disjoint shards that cover the training set, per epoch."""
    script = Path(__file__).with_name("ddp_text_script.py")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), str(tiny_bert), str(distinct_reviews)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [_recorded(tmp_path / "out", rank) for rank in (0, 1)]
    data = TextFilesDataModule(
        hf_encoder(str(tiny_bert)).data_config, str(distinct_reviews), batch_size=BATCH_SIZE
    )
    data.setup("fit")
    assert len(data.train_set) % 2 == 0  # so the shards need no padding repeat and must be disjoint
    for epoch in range(EPOCHS):
        r0, r1 = ranks[0][epoch], ranks[1][epoch]
        assert len(r0) == len(r1)  # the same number of steps, or DDP would hang
        s0, s1 = [i for b in r0 for i in b], [i for b in r1 for i in b]
        assert not set(s0) & set(s1) and sorted(s0 + s1) == list(range(len(data.train_set)))
        assert r0 == _expected_batches(data, epoch, 2, 0) and r1 == _expected_batches(data, epoch, 2, 1)
    assert ranks[0][0] != ranks[0][1]


def test_length_grouped_shards_pad_like_distributed_sampler():
    """An odd count over two ranks: equal shard sizes, one repeat, every sample in some shard, grouped."""
    from tl_lightning.data.text import LengthGroupedSampler

    lengths = [int(v) for v in torch.randint(3, 60, (43,), generator=torch.Generator().manual_seed(0))]
    shards = []
    for rank in (0, 1):
        sampler = LengthGroupedSampler(lengths, 4, seed=3, group=2, num_replicas=2, rank=rank)
        sampler.set_epoch(5)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler) == 22
    both = sorted(shards[0] + shards[1])
    assert sorted(set(both)) == list(range(43)) and len(both) == 44  # every sample, and one padding repeat
    one = LengthGroupedSampler(lengths, 4, seed=3, group=2)
    one.set_epoch(5)
    assert sorted(one) == list(range(43))

    def padding(order: list[int]) -> int:
        batches = [order[i : i + 4] for i in range(0, len(order), 4)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    random_order = torch.randperm(43, generator=torch.Generator().manual_seed(1)).tolist()
    assert padding(list(one)) < padding(random_order)
    whole = LengthGroupedSampler(lengths, 4, seed=3)  # one chunk: the batches of the sorted order
    assert padding(list(whole)) == padding(sorted(range(43), key=lengths.__getitem__))


# --- adapter checkpoints: a tensor the pretrained file lacks is stored ------------------------------


@pytest.fixture
def poolerless_bert(tmp_path, tiny_bert) -> Path:
    """The tiny BERT saved without its pooler (as sentence-transformers checkpoints often are)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    path = tmp_path / "poolerless"
    model.save_pretrained(path, state_dict=state)
    TextConfig(MINILM, 256, "mean").load_tokenizer().save_pretrained(path)
    return path


def test_not_pretrained_names_what_the_file_lacks(tiny_bert, poolerless_bert):
    assert hf_encoder(str(poolerless_bert), pooling="cls").not_pretrained == [
        "pooler.dense.weight",
        "pooler.dense.bias",
    ]
    assert hf_encoder(str(poolerless_bert), pooling="mean").not_pretrained == []  # pooler removed
    assert hf_encoder(str(tiny_bert), pooling="cls").not_pretrained == []


@pytest.mark.parametrize("strategy", ["lora", "ia3"])
def test_adapter_checkpoint_rebuilds_identically_without_pretrained_pooler(
    tmp_path, poolerless_bert, distinct_reviews, strategy
):
    """Two rebuilds of an adapter checkpoint give equal logits: the random pooler is stored, not redrawn."""
    cfg = _cfg(
        tmp_path / "run",
        poolerless_bert,
        distinct_reviews,
        f"strategy={strategy}",
        "backbone.pooling=cls",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    )
    train(cfg)
    checkpoint = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    state, config = checkpoint["state_dict"], checkpoint["tl_lightning"]["config"]
    data = TextFilesDataModule(hf_encoder(str(poolerless_bert)).data_config, str(distinct_reviews))
    data.setup("fit")
    tokens, _ = pad_batch([data.val_set[i] for i in range(6)], data.tokenizer.pad_token_id)
    logits = []
    for _ in range(2):
        module = rebuild_module(config, 2)
        module.load_state_dict(state)
        with torch.no_grad():
            logits.append(module.eval()(tokens))
    assert torch.equal(logits[0], logits[1])
    pooler = {k for k in state if ".pooler." in k}
    assert pooler == {f"backbone.model.base_model.model.pooler.dense.{p}" for p in ("weight", "bias")}
    assert not any(".embeddings." in k or ".intermediate." in k for k in state)  # the frozen base: rebuilt


# --- unlabelled rows ----------------------------------------------------------------------------


def _labelled_rows(n: int = 10) -> list[tuple[str, str]]:
    return [(f"{GOOD[i % 3]} {i}", "pos") for i in range(n)] + [
        (f"{BAD[i % 3]} {i}", "neg") for i in range(n)
    ]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_unlabelled_file_rows_are_left_out_and_counted(tmp_path, tiny_bert, suffix, caplog):
    """Empty cells (and JSON null, an empty string, a missing key) are no label, not a class ''/'None'."""
    rows = [{"text": t, "label": y} for t, y in _labelled_rows()]
    unlabelled = [{"text": "no label here", "label": ""}, {"text": "nor here", "label": "  "}]
    if suffix == ".jsonl":
        unlabelled += [{"text": "null label", "label": None}, {"text": "no label key"}]
    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in unlabelled[:2] + rows + unlabelled[2:]))
    else:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle, delimiter="," if suffix == ".csv" else "\t")
            writer.writerows([("text", "label"), *((r["text"], r["label"]) for r in unlabelled + rows)])
    data = TextFilesDataModule(
        hf_encoder(str(tiny_bert)).data_config, str(path), batch_size=8, val_fraction=0.2, test_fraction=0.2
    )
    with caplog.at_level(logging.WARNING, logger="tl_lightning.data.text"):
        data.setup("fit")
    assert data.class_names == ["neg", "pos"]
    assert len(data.train_set) + len(data.val_set) + len(data.test_set) == 20
    texts = data.train_set.texts + data.val_set.texts + data.test_set.texts
    assert not any(t.startswith(("no label", "nor here", "null label")) for t in texts)
    total = 20 + len(unlabelled)
    assert (
        f"{len(unlabelled)} of {total} rows have no 'label' label" in caplog.text and str(path) in caplog.text
    )


def test_a_file_without_labelled_rows_stops_naming_it(tmp_path, tiny_bert):
    train_file = _write_csv(tmp_path / "train.csv", _labelled_rows())
    val_file = _write_csv(tmp_path / "val.csv", [(t, "") for t, _ in _labelled_rows(3)])
    data = TextFilesDataModule(
        hf_encoder(str(tiny_bert)).data_config, str(train_file), val_file=str(val_file)
    )
    with pytest.raises(ValueError, match=r"text file '.*val\.csv' has no labelled row: none of its 6 rows"):
        data.setup("fit")


class _Split:
    """What ``datasets`` gives for one split, in memory: columns by name and a ``ClassLabel``-like feature."""

    def __init__(self, columns: dict[str, list], names: list[str] | None) -> None:
        self.columns = columns
        self.column_names = list(columns)
        self.features = {"label": SimpleNamespace(names=names) if names else SimpleNamespace()}

    def __getitem__(self, column: str) -> list:
        return self.columns[column]


class _InMemoryHF(HFDatasetDataModule):
    """``data=hf_dataset`` over in-memory splits (``datasets`` is not installed for the tests)."""

    def __init__(self, data_config, splits: dict[str, _Split], **kwargs) -> None:
        super().__init__(data_config, name="bench", **kwargs)
        self.splits = splits

    def _load(self):
        return self.splits


def _hf_split(labels: list, names=("neg", "pos")) -> _Split:
    return _Split({"text": [f"{GOOD[i % 3]} {i}" for i in range(len(labels))], "label": labels}, list(names))


def test_hf_label_minus_one_is_no_label(tiny_bert, caplog):
    """ClassLabel -1 ("no label", as in GLUE) is left out and counted, not read as the last class; an
    all-unlabelled test split (a hidden test set) counts as missing and is carved out of train."""
    train_labels = [0, 1] * 10 + [-1] * 4
    splits = {
        "train": _hf_split(train_labels),
        "validation": _hf_split([0, 1, 1, 0, -1, 0]),
        "test": _hf_split([-1] * 8),
    }
    data = _InMemoryHF(hf_encoder(str(tiny_bert)).data_config, splits, batch_size=8, test_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="tl_lightning.data.text"):
        data.setup("fit")
    assert data.class_names == ["neg", "pos"]
    assert len(data.train_set) + len(data.test_set) == 20 and len(data.test_set) == 4  # carved from train
    assert torch.bincount(torch.cat([data.train_set.labels, data.test_set.labels])).tolist() == [10, 10]
    assert len(data.val_set) == 5 and torch.bincount(data.val_set.labels).tolist() == [3, 2]
    assert "bench/train: 4 of 24 rows have no 'label' label" in caplog.text
    assert "bench/validation: 1 of 6 rows" in caplog.text and "bench/test has no labelled row" in caplog.text


def test_hf_plain_label_column_keeps_minus_one_as_a_class(tiny_bert):
    """Without ClassLabel names, -1 is a value like any other (a -1/+1 column); None is no label."""
    splits = {"train": _hf_split([-1, 1] * 10 + [None] * 2, names=())}
    data = _InMemoryHF(hf_encoder(str(tiny_bert)).data_config, splits, batch_size=8)
    data.setup("fit")
    assert data.class_names == ["-1", "1"]
    assert len(data.train_set) + len(data.val_set) + len(data.test_set) == 20


def test_an_all_unlabelled_hf_train_split_stops_naming_it(tiny_bert):
    splits = {"train": _hf_split([-1] * 12), "test": _hf_split([0, 1] * 3)}
    data = _InMemoryHF(hf_encoder(str(tiny_bert)).data_config, splits)
    with pytest.raises(ValueError, match=r"bench/train has no labelled row: none of its 12 rows"):
        data.setup("fit")


# --- sentence-transformers pooling configs -----------------------------------------------------


def _sentence_model(root: Path, tiny_bert: Path, modes: dict[str, bool], folder: str = "1_Pooling") -> Path:
    """``tiny_bert`` as a sentence-transformers directory: modules.json and ``folder``/config.json."""
    path = root / "sentence_model"
    shutil.copytree(tiny_bert, path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": folder, "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / folder).mkdir()
    settings = {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
    }
    (path / folder / "config.json").write_text(json.dumps(settings | modes))
    return path


def _reference(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """What sentence-transformers pools from one unpadded text's last hidden states ``(L, H)``."""
    return {
        "cls": hidden[0],
        "mean": hidden.mean(0),
        "max": hidden.max(0).values,
        "lasttoken": hidden[-1],
    }[pooling]


@pytest.mark.parametrize(
    ("mode", "pooling", "folder"),
    [
        ("pooling_mode_max_tokens", "max", "1_Pooling"),
        ("pooling_mode_lasttoken", "lasttoken", "1_Pooling"),
        ("pooling_mode_cls_token", "cls", "1_Pooling"),
        ("pooling_mode_mean_tokens", "mean", "1_Pooling"),
        ("pooling_mode_max_tokens", "max", "pooling_layer"),  # the folder modules.json names
    ],
)
def test_sentence_transformers_pooling_is_followed(tmp_path, tiny_bert, mode, pooling, folder):
    path = _sentence_model(tmp_path, tiny_bert, {mode: True}, folder)
    backbone = hf_encoder(str(path)).eval()
    assert backbone.pooling == backbone.data_config.pooling == pooling
    assert getattr(backbone.model, "pooler", None) is None  # sentence-transformers never runs the pooler
    tokenizer = backbone.data_config.load_tokenizer()
    texts = ["a fine film", "dull, slow and far too long for anyone", "great"]
    samples = [({k: torch.tensor(v) for k, v in tokenizer(t).items()}, torch.tensor(0)) for t in texts]
    with torch.no_grad():
        pooled = backbone(pad_batch(samples, tokenizer.pad_token_id)[0])
        expected = torch.stack(
            [_reference(backbone.model(**{k: v[None] for k, v in s.items()}).last_hidden_state[0], pooling)
             for s, _ in samples]
        )  # fmt: skip
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "modes",
    [
        {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True},  # concatenated
        {"pooling_mode_mean_sqrt_len_tokens": True},
        {"pooling_mode_weightedmean_tokens": True},
    ],
    ids=["mean_and_max", "mean_sqrt_len", "weighted_mean"],
)
def test_unsupported_sentence_transformers_pooling_is_refused(tmp_path, tiny_bert, modes):
    path = _sentence_model(tmp_path, tiny_bert, modes)
    with pytest.raises(
        ValueError, match=r"1_Pooling/config\.json.*pooling_mode_lasttoken.*backbone\.pooling"
    ):
        hf_encoder(str(path))
    assert hf_encoder(str(path), pooling="mean").pooling == "mean"  # an explicit pooling overrides it


def test_a_checkpoint_keeps_the_pooling_it_was_trained_with(tmp_path, tiny_bert, distinct_reviews):
    """A run recorded with ``pooling: auto`` that resolved to mean (what versions before sentence-transformers
    configs were read did with any folder): the rebuild keeps mean, and a resume that would pool otherwise
    stops naming the key, instead of continuing another function of the same weights."""
    from tl_lightning.run.pipeline import rebuild_module, train

    model = _sentence_model(tmp_path, tiny_bert, {"pooling_mode_max_tokens": True})
    fast = ["strategy=full_finetune", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
    train(_cfg(tmp_path / "run", model, distinct_reviews, "backbone.pooling=mean", *fast))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    stored["tl_lightning"]["config"]["backbone"]["pooling"] = "auto"  # as such a run recorded it
    torch.save(stored, checkpoint)
    metadata = stored["tl_lightning"]
    assert metadata["data_config"]["pooling"] == "mean"
    rebuilt = rebuild_module(metadata["config"], 2, metadata["data_config"])
    assert rebuilt.backbone.data_config.pooling == "mean"
    assert rebuild_module(metadata["config"], 2).backbone.data_config.pooling == "max"  # what auto says now
    resume = _cfg(tmp_path / "resume", model, distinct_reviews, f"ckpt_path={checkpoint}", *fast)
    with pytest.raises(ValueError, match=r"pooling: 'mean' in the checkpoint, 'max' now.*backbone\.pooling"):
        train(resume)


def test_blank_labels_of_a_plain_hf_column_are_no_label(tiny_bert):
    """As in text files, an empty or blank string in a plain (non-ClassLabel) column is no label."""
    from tl_lightning.data.text import hf_labels

    assert hf_labels(["pos", "", "  ", None, "neg", -1], None) == ["pos", None, None, None, "neg", "-1"]
