"""Exports to the ecosystems' formats, each loaded by the ecosystem's own loader and checked against ours.

Checkpoints come from tiny real runs (``train(cfg)``); the module is rebuilt from the stored config as
``export.py`` does. Every comparison allows a max abs logit difference of 1e-4.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tl_lightning.run.checkpointing import METADATA_KEY, load_checkpoint
from tl_lightning.run.formats import export_hf, export_text_onnx, export_timm
from tl_lightning.run.inference import load_trained
from tl_lightning.run.pipeline import rebuild_module, train

ATOL = 1e-4
# lengths 2 .. 40 tokens: padding, and one text past data.max_length=32 (truncation)
TEXTS = [
    "ok",
    "a moving, funny and wise film",
    "dull, slow and far too long; the plot makes no sense at all",
    "great acting and a clever script " * 6,
]
# conftest's FAST without data.image_size; text data, 32 tokens at most
TEXT_FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "+trainer.enable_progress_bar=false",
    "callbacks.rich_progress_bar=null",
    "allow_short_schedule=true",
    "strategy=full_finetune",
    "backbone=hf_encoder",
    "data=text_files",
    "data.batch_size=8",
    "data.max_length=32",
]
GOOD = ["a moving, funny and wise film", "great acting and a clever script", "a joy from start to finish"]
BAD = ["dull, slow and far too long", "the plot makes no sense at all", "a waste of a fine cast"]


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    """60 labelled reviews, three classes, varied lengths."""
    path = tmp_path_factory.mktemp("reviews") / "reviews.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(20):
            writer.writerow([f"{GOOD[i % 3]}{' truly' * (i % 7)}", "pos"])
            writer.writerow([f"{BAD[i % 3]}{' sadly' * (i % 5)}", "neg"])
            writer.writerow([f"the film runs {90 + i} minutes{' and then some' * (i % 4)}", "plot"])
    return path


def _trained(make_cfg, *overrides: str, fast: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train a tiny run, then rebuild its module from the checkpoint as export.py does."""
    cfg = make_cfg(*overrides, fast=fast)
    train(cfg)
    checkpoint = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    metadata = checkpoint[METADATA_KEY]
    module = rebuild_module(metadata["config"], len(metadata["class_names"]), metadata["data_config"])
    module.load_state_dict(checkpoint["state_dict"], strict=False)  # the source head is not rebuilt
    return module.eval(), metadata


def _text_run(make_cfg, *overrides: str):
    """A tiny text run on ``reviews`` (``backbone.model_name`` in ``overrides``; MiniLM by default)."""
    return _trained(make_cfg, *TEXT_FAST, *overrides, fast=False)


def _bert_run(make_cfg, tiny_bert, reviews, *overrides: str):
    """A tiny run of the random 2-layer BERT; a high learning rate moves its weights well away from init."""
    return _text_run(
        make_cfg,
        f"backbone.model_name={tiny_bert}",
        f"data.train_file={reviews}",
        "module.optimizer.lr=0.05",
        *overrides,
    )


def _ours(module, tokenizer, texts=TEXTS) -> torch.Tensor:
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return module(dict(tokens))


def _max_diff(a, b) -> float:
    return (torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max().item()


# --- format=hf ------------------------------------------------------------------------------------


def test_hf_cls_with_pooler_is_sequence_classification(make_cfg, tiny_bert, reviews, tmp_path):
    """[CLS] through the pooler + linear head: what BertForSequenceClassification computes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    module, metadata = _bert_run(make_cfg, tiny_bert, reviews, "backbone.pooling=cls")
    assert module.backbone.pooling == "cls" and module.backbone.model.pooler is not None
    folder = export_hf(module, metadata, tmp_path / "model.hf")
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)  # saved alongside, truncating at the run's 32 tokens
    assert type(loaded).__name__ == "BertForSequenceClassification"
    assert loaded.config.id2label == {0: "neg", 1: "plot", 2: "pos"}
    assert loaded.config.label2id == {"neg": 0, "plot": 1, "pos": 2}
    assert tokenizer.model_max_length == 32
    with torch.no_grad():
        theirs = loaded(**tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")).logits
    ours = _ours(module, tokenizer)
    assert _max_diff(ours, theirs) <= ATOL
    assert ours.std(0).max() > 1e-2  # logits that depend on the text: not a constant head
    assert not (folder / "modules.json").exists()


@pytest.mark.parametrize(
    ("overrides", "modules"),
    [
        (["backbone.pooling=mean"], ["Transformer", "Pooling", "Dense"]),
        (["backbone.pooling=max"], ["Transformer", "Pooling", "Dense"]),
        (["backbone.pooling=lasttoken"], ["Transformer", "Pooling", "Dense"]),
        (
            ["backbone.pooling=cls", "head=mlp", "head.hidden=[16,8]"],
            ["Transformer", "Pooling"] + ["Dense"] * 4,
        ),
    ],
    ids=["mean", "max", "lasttoken", "cls_pooler_mlp_head"],
)
def test_hf_other_poolings_are_sentence_transformers(
    make_cfg, tiny_bert, reviews, tmp_path, overrides, modules
):
    """Mean / max pooling and MLP heads: a sentence-transformers folder whose encode() returns the logits."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForSequenceClassification

    module, metadata = _bert_run(make_cfg, tiny_bert, reviews, *overrides)
    folder = export_hf(module, metadata, tmp_path / "model.hf")
    loaded = SentenceTransformer(str(folder), device="cpu")
    assert [type(m).__name__ for m in loaded] == modules
    assert loaded.max_seq_length == 32
    theirs = loaded.encode(TEXTS, convert_to_tensor=True)
    ours = _ours(module, loaded.tokenizer)
    assert theirs.shape == (len(TEXTS), 3) and _max_diff(ours, theirs) <= ATOL
    if "backbone.pooling=cls" not in overrides:  # the random BERT's pooled [CLS] hardly depends on the text
        assert ours.std(0).max() > 1e-2
    config = json.loads((folder / "0_Transformer" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "plot", "2": "pos"}
    # never a silently different model: transformers' classifier loader finds no model at the root
    with pytest.raises((OSError, ValueError), match="config.json"):
        AutoModelForSequenceClassification.from_pretrained(folder)


def test_hf_real_minilm_mean_pooled(make_cfg, reviews, tmp_path):
    """The offline default all-MiniLM-L6-v2 (mean-pooled) exports as sentence-transformers, offline."""
    from sentence_transformers import SentenceTransformer

    module, metadata = _text_run(make_cfg, f"data.train_file={reviews}", "trainer.limit_train_batches=1")
    assert module.backbone.pooling == "mean"
    folder = export_hf(module, metadata, tmp_path / "minilm")
    loaded = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    assert _max_diff(_ours(module, loaded.tokenizer), loaded.encode(TEXTS, convert_to_tensor=True)) <= ATOL


def test_hf_refuses_image_runs(make_cfg, tmp_path):
    module, metadata = _trained(
        make_cfg, "backbone=small_cnn", "backbone.channels=[8,16]", "strategy=full_finetune"
    )
    with pytest.raises(ValueError, match=r"format=hf takes text runs \(backbone=hf_encoder\).*format=timm"):
        export_hf(module, metadata, tmp_path / "model.hf")


# --- format=timm ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_timm_efficientnet_lite0(make_cfg, tmp_path):
    """EfficientNet-Lite0 is timm's tf_efficientnet_lite0 (TF "same" padding); the run's preprocessing."""
    import timm

    module, metadata = _trained(
        make_cfg, "backbone=efficientnet_lite0", "strategy=full_finetune", "trainer.limit_train_batches=2"
    )
    folder = export_timm(module, metadata, tmp_path / "model.timm")
    config = json.loads((folder / "config.json").read_text())
    assert (config["architecture"], config["num_classes"]) == ("tf_efficientnet_lite0", 10)
    assert config["label_names"] == metadata["class_names"] == [str(i) for i in range(10)]
    loaded = timm.create_model(
        "tf_efficientnet_lite0", num_classes=10, checkpoint_path=folder / "model.safetensors"
    )
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = module(images), loaded.eval()(images)
    assert _max_diff(ours, theirs) <= ATOL and ours.std(0).max() > 1e-2
    wrong = timm.create_model(
        "efficientnet_lite0", num_classes=10, checkpoint_path=folder / "model.safetensors"
    )
    with torch.no_grad():
        assert _max_diff(ours, wrong.eval()(images)) > 1e-2  # other padding: the recorded name matters
    local = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data = timm.data.resolve_data_config(model=local)
    assert data["input_size"] == (3, 32, 32)  # data.image_size, not the weights' 224
    assert (tuple(data["mean"]), tuple(data["std"]), data["interpolation"]) == (
        (0.5,) * 3,
        (0.5,) * 3,
        "bicubic",
    )
    assert data["crop_pct"] == 1.0 and config["tl_lightning"]["grayscale"] is True  # digits: upsampled whole
    with torch.no_grad():
        assert _max_diff(ours, local(images)) <= ATOL


def test_timm_any_model_by_name(make_cfg, tmp_path):
    """A backbone=timm run (classifier head.fc, behind a norm): timm's own name and classifier."""
    import timm

    module, metadata = _trained(
        make_cfg,
        "backbone=timm",
        "backbone.model_name=test_convnext",
        "backbone.pretrained=false",
        "strategy=full_finetune",
    )
    folder = export_timm(module, metadata, tmp_path / "model.timm")
    loaded = timm.create_model("test_convnext", num_classes=10, checkpoint_path=folder / "model.safetensors")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _max_diff(module(images), loaded.eval()(images)) <= ATOL


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["backbone=small_cnn", "backbone.channels=[8,16]"],
            r"format=timm needs a whole timm model.*small_cnn",
        ),
        (
            ["backbone=efficientnet_lite0", "backbone.cut_at=blocks.2"],
            r"cut at 'blocks.2' \(backbone.cut_at\)",
        ),
        (["backbone=efficientnet_lite0", "head=mlp", "head.hidden=[8]"], r"has 2 linear layers .*head=mlp"),
    ],
    ids=["small_cnn", "cut", "mlp_head"],
)
def test_timm_refuses_what_timm_cannot_build(make_cfg, tmp_path, overrides, match):
    module, metadata = _trained(
        make_cfg, *overrides, "strategy=full_finetune", "trainer.limit_train_batches=1"
    )
    with pytest.raises(ValueError, match=match):
        export_timm(module, metadata, tmp_path / "model.timm")
    assert not (tmp_path / "model.timm").exists()


# --- format=onnx (text) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pooling", ["mean", "lasttoken"]
)  # lasttoken indexes per sample: batch must stay free
def test_text_onnx_dynamic_batch_and_length(make_cfg, tiny_bert, reviews, tmp_path, pooling):
    import onnx
    import onnxruntime

    module, metadata = _bert_run(make_cfg, tiny_bert, reviews, f"backbone.pooling={pooling}")
    path = export_text_onnx(module, metadata, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "token_type_ids", "attention_mask"]
    tokenizer = module.backbone.data_config.load_tokenizer()
    for texts in (TEXTS, TEXTS[:1], TEXTS[2:]):  # batch 4, 1, 2; lengths up to 32 (truncated), 3, ...
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="np")
        theirs = session.run(None, {n: tokens[n] for n in names})[0]
        assert theirs.shape == (len(texts), 3)
        assert _max_diff(_ours(module, tokenizer, texts), theirs) <= ATOL
    properties = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert properties["class_names"] == ["neg", "plot", "pos"]
    assert properties["data_config"]["max_length"] == 32 and properties["data_config"]["pooling"] == pooling


# --- through export.py, as a user runs it -------------------------------------------------------------


def test_export_cli_writes_each_text_format_its_loader_reads(make_cfg, tiny_bert, reviews, tmp_path):
    """``python export.py ckpt_path=<text run> format=hf|onnx``: the folder/graph the ecosystem's loader
    reads, with the run's logits (the formats are wired into export.py, not only importable)."""
    import subprocess
    import sys

    import onnxruntime
    from sentence_transformers import SentenceTransformer

    cfg = make_cfg(
        *TEXT_FAST,
        f"backbone.model_name={tiny_bert}",
        f"data.train_file={reviews}",
        "backbone.pooling=mean",
        fast=False,
    )
    train(cfg)
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    module = load_trained(checkpoint).module
    tokenizer = module.backbone.data_config.load_tokenizer()
    ours = _ours(module, tokenizer)
    root = Path(__file__).resolve().parent.parent
    for format in ("hf", "onnx"):
        output = tmp_path / f"model.{format}"
        result = subprocess.run(
            [
                sys.executable,
                "export.py",
                f"ckpt_path={checkpoint}",
                f"format={format}",
                f"output={output}",
                f"hydra.run.dir={tmp_path / 'hydra'}",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        if format == "hf":
            theirs = SentenceTransformer(str(output), device="cpu").encode(TEXTS, convert_to_tensor=True)
        else:
            session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            tokens = tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="np")
            theirs = session.run(None, {n: tokens[n] for n in names})[0]
        assert _max_diff(ours, theirs) <= ATOL, format
