"""predict.py classifies texts as the text run evaluated them: its data module's tokenisation, its module."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import tl_lightning
from tl_lightning.modules import TransferModule
from tl_lightning.run.inference import collect_texts, export, export_checkpoint, predict, predict_to_file
from tl_lightning.run.pipeline import train

ROOT = Path(__file__).resolve().parent.parent
GOOD = ["a moving, funny and wise film", "great acting and a clever script", "a joy from start to finish"]
BAD = ["dull, slow and far too long", "the plot makes no sense at all", "a waste of a fine cast"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_bert) -> tuple[Path, object]:
    """A one-epoch run of a tiny random BERT (saved with save_pretrained) on 60 labelled reviews,
    with a token limit of 8 so that some texts are truncated: ``(last.ckpt, the run's config)``."""
    root = tmp_path_factory.mktemp("text")
    with (root / "reviews.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "label"])
        for i in range(30):
            writer.writerow([f"{GOOD[i % 3]}{' truly' * (i % 7)}", "pos"])
            writer.writerow([f"{BAD[i % 3]}{' sadly' * (i % 5)}", "neg"])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "backbone=hf_encoder",
                f"backbone.model_name={tiny_bert}",
                "data=text_files",
                f"data.train_file={root / 'reviews.csv'}",
                "data.text_column=review",
                "data.max_length=8",
                "data.batch_size=8",
                "strategy=full_finetune",
                "trainer.max_epochs=1",
                "+trainer.enable_progress_bar=false",
                "callbacks.rich_progress_bar=null",
                "allow_short_schedule=true",
                f"paths.output_dir={root / 'run'}",
            ],
        )
    train(cfg)
    return root / "run" / "checkpoints" / "last.ckpt", cfg


@torch.no_grad()
def _run_evaluation(checkpoint: Path, cfg) -> tuple[list[str], torch.Tensor, list[str]]:
    """The test texts and the probabilities the run's own test loader and module give them."""
    module = TransferModule.load_from_checkpoint(checkpoint)
    datamodule = instantiate(cfg.data, data_config=module.backbone.data_config)
    datamodule.setup("test")
    probs = torch.cat([module(tokens).softmax(-1) for tokens, _ in datamodule.test_dataloader()])
    return datamodule.test_set.texts, probs, datamodule.class_names


def test_predicted_probabilities_are_the_runs_evaluation(text_run, tmp_path, caplog):
    """Texts from the command line, a .txt file and a .csv column, tokenised by the run's data module
    (its tokenizer and token limit 8: truncation counted in the log), give the probabilities the run's
    own evaluation gives them, with its class names."""
    checkpoint, cfg = text_run
    texts, reference, class_names = _run_evaluation(checkpoint, cfg)
    assert any(len(t.split()) > 8 for t in texts)  # the limit truncates some of them
    (tmp_path / "texts.txt").write_text("\n".join(texts[:5]) + "\n\n")
    with (tmp_path / "texts.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["id", "review"], *[[i, t] for i, t in enumerate(texts[5:9])]])
    with caplog.at_level(logging.INFO, logger="tl_lightning.data.text"):
        output = predict_to_file(
            checkpoint,
            [tmp_path / "texts.txt", tmp_path / "texts.csv"],
            tmp_path / "predictions.json",
            top_k=2,
            batch_size=3,  # other batches (so other padding) than the run's test loader
            device="cpu",
            texts=texts[9:],
            text_column="review",
        )
    assert "predict texts are longer than 8 tokens and were truncated" in caplog.text
    rows = json.loads(output.read_text())
    assert [row["text"] for row in rows] == texts
    for row, expected in zip(rows, reference, strict=True):
        assert {p["class"] for p in row["predictions"]} == set(class_names) == {"neg", "pos"}
        got = torch.tensor([p["probability"] for p in row["predictions"]])
        order = [class_names.index(p["class"]) for p in row["predictions"]]
        torch.testing.assert_close(got, expected[order], rtol=0, atol=1e-5)


def test_text_predict_cli_writes_csv_and_exported_model_predicts_the_same(text_run, tmp_path):
    checkpoint, _ = text_run
    output = tmp_path / "predictions.csv"
    subprocess.run(
        [
            sys.executable,
            "predict.py",
            f"ckpt_path={checkpoint}",
            'texts=["a joy from start to finish","dull, slow and far too long"]',
            f"output={output}",
            "top_k=1",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    lines = list(csv.reader(output.open()))
    assert lines[0] == ["text", "class_1", "probability_1"]
    assert [line[0] for line in lines[1:]] == ["a joy from start to finish", "dull, slow and far too long"]
    exported = tl_lightning.load(export_checkpoint(checkpoint, "safetensors", tmp_path / "model.safetensors"))
    assert exported.modality == "text" and exported.image_size is None
    again = predict(exported, [line[0] for line in lines[1:]], top_k=1, device="cpu")
    assert [[r["text"], r["predictions"][0]["class"]] for r in again] == [line[:2] for line in lines[1:]]
    assert export_checkpoint(checkpoint, "onnx", tmp_path / "model.onnx").is_file()  # text ONNX (see formats)


def test_inputs_must_match_the_checkpoints_modality(text_run, tmp_path):
    checkpoint, _ = text_run
    image = tmp_path / "scan.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(image)
    with pytest.raises(ValueError, match=r"scan\.png' is not a text file: a text model takes \.txt, \.csv"):
        predict_to_file(checkpoint, image, tmp_path / "p.csv", device="cpu")
    (tmp_path / "t.csv").write_text("body\nfine\n")
    with pytest.raises(
        ValueError, match=r"text_column='text' is not a column of .*t\.csv'; its columns: \['body'\]"
    ):
        predict_to_file(checkpoint, tmp_path / "t.csv", tmp_path / "p.csv", device="cpu")
    with pytest.raises(ValueError, match="no text to classify"):
        predict_to_file(checkpoint, None, tmp_path / "p.csv", device="cpu")
    with pytest.raises(ValueError, match="takes texts, not images"):
        tl_lightning.load(checkpoint).transform()


# --- review: inputs as users give them; exports that never damage what is there -----------------


def test_a_single_text_is_one_text_and_files_split_only_at_line_ends(text_run, tmp_path):
    checkpoint, _ = text_run
    model = tl_lightning.load(checkpoint)
    assert [r["text"] for r in predict(model, collect_texts(texts="superb"), top_k=1, device="cpu")] == [
        "superb"
    ]
    (row,) = predict(model, ["superb"], device="cpu")  # top_k default: 5, or every class when fewer (2)
    assert len(row["predictions"]) == 2
    with pytest.raises(ValueError, match=r"texts\[0\]=5 is not a text"):
        collect_texts(texts=[5, "great"])
    listing = tmp_path / "texts.txt"
    listing.write_text("a line\u2028with a separator\x0cand a form feed\r\nsecond\n\n", encoding="utf-8")
    assert collect_texts(listing) == ["a line\u2028with a separator\x0cand a form feed", "second"]
    table = tmp_path / "excel.csv"
    table.write_bytes("\ufefftext,id\ngreat film,1\n".encode())  # the BOM Excel writes
    assert collect_texts(table) == ["great film"]


def test_a_folder_export_refuses_a_non_empty_folder_and_is_readable_by_all(text_run, tmp_path):
    checkpoint, _ = text_run
    model = tl_lightning.load(checkpoint)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# my notes")
    with pytest.raises(ValueError, match="is a folder that is not empty"):
        export(model, "hf", mine)
    assert (mine / "README.md").read_text() == "# my notes"
    folder = export(model, "hf", tmp_path / "model.hf")
    for path in [folder, *folder.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_a_failed_export_leaves_nothing(text_run, tmp_path):
    checkpoint, _ = text_run
    model = tl_lightning.load(checkpoint)
    with pytest.raises(ValueError, match="timm"):
        export(model, "timm", tmp_path / "model.timm")  # a text model: refused
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_and_exports_do_not_carry_the_tracker_settings(text_run, tmp_path):
    checkpoint, _ = text_run
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)["tl_lightning"]["config"]
    assert "logger" not in stored  # a tracking URI may carry a token
