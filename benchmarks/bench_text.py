"""Our text pipeline vs Hugging Face's ``transformers.Trainer``: all-MiniLM-L6-v2 on Rotten Tomatoes.

What a text user would pick instead of this project is ``Trainer``. Both arms train the same network from
the same weights on the same batches with the same optimizer and schedule, so the difference is the
training loop:

* model: all-MiniLM-L6-v2 (``AutoModel``, no pooler), mean pooling over the attention mask, a linear
  head of 2 classes. Ours is ``experiment=text_sentiment``'s ``TransferModule`` composed from ``conf/``
  with every layer training (``callbacks.freeze_lower=null``: a ``Trainer`` user has no ``Freeze``
  callback); the peer is the same network written the way a ``Trainer`` user writes it (an ``nn.Module``
  whose ``forward(input_ids, attention_mask, token_type_ids, labels)`` returns ``{"loss", "logits"}``),
  its head initialised with our head's weights. Their logits on one batch are checked equal first;
* data: our data module's token ids (one tokenisation, ``max_length=data`` truncation), batches of 32
  from our ``LengthGroupedSampler`` (the peer gets it through ``Trainer._get_train_sampler``), padded
  per batch (ours: ``pad_batch``; the peer: ``DataCollatorWithPadding``); the first batch of both loaders
  is checked equal;
* optimizer and schedule: AdamW (lr 1e-4, weight decay 0.01 except norms and biases: our
  ``named_param_groups``, handed to ``Trainer`` through ``optimizers=``), linear warm-up over 10% of the
  steps then linear decay (``tl_lightning.modules.warmup_linear``); no gradient clipping
  (``max_grad_norm=0``), fp32, no evaluation, logging or saving inside the timed loop of either;
* threads: fixed by ``harness.begin`` for both arms, in one process.

Printed: CPU time per optimizer step (one call = ``--steps`` steps of a fresh ``fit``/``train`` on the
same continuing model, start-up included for both, interleaved A B A B by ``harness.interleave``) with
the paired ratio; peak resident memory of one call of each arm (fresh child processes); then one run of
``--accuracy-steps`` steps per arm from the same initial weights, test accuracy every ``--eval-every``
steps: accuracy after the same number of steps (with the difference's two-standard-error noise band of
a binomial proportion on the test set), and the training time (evaluation excluded) until each first
reaches ``--target`` test accuracy. The accuracy runs go one after the other, not interleaved, with
``--accuracy-threads`` threads each (tens of minutes on a 2-core CPU; ``--accuracy-steps 0`` skips them).

Usage::

    python benchmarks/bench_text.py [--steps 12] [--repeats 5] [--threads 1] [--accuracy-steps 281]
                                    [--eval-every 56] [--accuracy-threads 2] [--target 0.80] [--no-memory]
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness
import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from torch.nn import functional as F

from tl_lightning.data.text import LengthGroupedSampler
from tl_lightning.modules.optim import named_param_groups, warmup_linear

CONF = Path(__file__).resolve().parents[1] / "conf"
LR, WEIGHT_DECAY, WARMUP = 1e-4, 0.01, 0.1
_DATA: dict = {}  # texts -> the set-up data module (build_ours)
OVERRIDES = ["experiment=text_sentiment", "callbacks.freeze_lower=null", f"module.optimizer.lr={LR}"]


def quiet() -> None:
    """No per-fit banners, tips or progress output from either framework."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def compose_text(overrides: list[str] | None = None):
    """``experiment=text_sentiment`` with every layer training, composed as ``train.py`` composes it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*OVERRIDES, *(overrides or [])])


def build_ours(cfg, texts: int | None = None):
    """``(module, datamodule)`` of our pipeline, built as ``tl_lightning.run.pipeline`` builds them.

    Args:
        cfg: The composed config (:func:`compose_text`).
        texts: Keep only the first ``texts`` of the training and of the test split (tiny budgets, tests).
    """
    torch.manual_seed(cfg.seed)
    backbone = instantiate(cfg.backbone)
    if texts not in _DATA:  # tokenised once per process: every arm and run reads the same splits
        datamodule = instantiate(cfg.data, data_config=backbone.data_config)
        datamodule.setup("fit")
        if texts is not None:
            for split in (datamodule.train_set, datamodule.test_set):
                split.encodings, split.labels = split.encodings[:texts], split.labels[:texts]
        _DATA[texts] = datamodule
    datamodule = _DATA[texts]
    head = instantiate(cfg.head, in_features=backbone.num_features, num_classes=datamodule.num_classes)
    module = instantiate(cfg.module, backbone=backbone, head=head, num_classes=datamodule.num_classes)
    return module, datamodule


class MeanPooledClassifier(nn.Module):
    """What a ``Trainer`` user writes for a sentence-transformers encoder: mean pooling and a linear head.

    Args:
        encoder: ``AutoModel`` of all-MiniLM-L6-v2 without its pooler.
        head: ``nn.Linear(hidden_size, classes)``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None) -> dict[str, torch.Tensor]:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def build_peer(module) -> MeanPooledClassifier:
    """The peer's network from the pretrained files, its head a copy of ``module``'s initial head."""
    from transformers import AutoModel

    from tl_lightning.backbones.hf import _resolve

    encoder = AutoModel.from_pretrained(_resolve("all-MiniLM-L6-v2"), add_pooling_layer=False)
    ours = module.heads["target"]
    linear = next(m for m in ours.modules() if isinstance(m, nn.Linear))
    head = nn.Linear(linear.in_features, linear.out_features)
    head.load_state_dict(linear.state_dict())
    return MeanPooledClassifier(encoder, head).train()


class TokenRows(torch.utils.data.Dataset):
    """Our tokenised split as the rows a ``Trainer`` collator takes (``input_ids``, ..., ``labels``)."""

    def __init__(self, tokenized) -> None:
        self.rows = [
            {**{k: v.tolist() for k, v in tokens.items()}, "labels": int(label)}
            for tokens, label in zip(tokenized.encodings, tokenized.labels, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def peer_trainer(model: MeanPooledClassifier, datamodule, steps: int, folder: str, callbacks=()):
    """A ``transformers.Trainer`` for ``steps`` optimizer steps with our optimizer, schedule and batches."""
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments

    lengths = [len(tokens["input_ids"]) for tokens in datamodule.train_set.encodings]
    batch, seed = datamodule.batch_size, datamodule.shuffle_seed

    class GroupedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return LengthGroupedSampler(lengths, batch, seed)

    groups = named_param_groups(model, {"all": [n for n, _ in model.named_parameters()]}, WEIGHT_DECAY)
    optimizer = torch.optim.AdamW(groups, lr=LR)
    arguments = TrainingArguments(
        output_dir=folder,
        per_device_train_batch_size=batch,
        max_steps=steps,
        max_grad_norm=0.0,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=0,
    )
    trainer = GroupedTrainer(
        model=model,
        args=arguments,
        train_dataset=TokenRows(datamodule.train_set),
        data_collator=DataCollatorWithPadding(datamodule.tokenizer),
        optimizers=(optimizer, warmup_linear(optimizer, steps, WARMUP)),
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # no end-of-training line: the peer logs nothing either
    return trainer


def our_trainer(steps: int, callbacks=()) -> pl.Trainer:
    """Lightning with what the peer has: no logger, progress bar, checkpoints or validation."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def check_like_for_like(module, peer: MeanPooledClassifier, datamodule, folder: str) -> None:
    """Same first batch from both loaders, same logits from both networks on it (eval mode).

    Raises:
        AssertionError: Naming what differs.
    """
    ours_tokens, ours_labels = next(iter(datamodule.train_dataloader()))
    theirs = next(iter(peer_trainer(peer, datamodule, 1, folder).get_train_dataloader()))
    for key, tensor in ours_tokens.items():
        assert torch.equal(tensor, theirs[key].cpu()), f"first batch differs in {key}"
    assert torch.equal(ours_labels, theirs["labels"].cpu()), "first batch differs in labels"
    module.eval(), peer.eval()
    with torch.no_grad():
        ours, peers = module(ours_tokens), peer(**ours_tokens)["logits"]
    module.train(), peer.train()
    assert torch.allclose(ours, peers, atol=1e-5), f"logits differ by {(ours - peers).abs().max():.2e}"


@torch.no_grad()
def test_accuracy(logits: Callable[[dict], torch.Tensor], model: nn.Module, datamodule) -> float:
    """Accuracy over our test loader (the same batches for both arms), ``model`` in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    right = total = 0
    for tokens, labels in datamodule.test_dataloader():
        right += int((logits(tokens).argmax(1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return right / total


class Curve:
    """Test accuracy every ``every`` steps against training time so far, evaluation time left out."""

    def __init__(self, every: int, evaluate: Callable[[], float], texts: int) -> None:
        self.every, self.evaluate, self.texts = every, evaluate, texts
        self.points: list[tuple[int, float, float, float]] = []  # step, wall s, CPU s, accuracy
        self.start = self.left_out = (0.0, 0.0)

    def begin(self) -> None:
        self.start, self.left_out = (time.perf_counter(), time.process_time()), (0.0, 0.0)

    def step(self, step: int, last: bool) -> None:
        if step % self.every and not last:
            return
        wall, cpu = time.perf_counter(), time.process_time()
        accuracy = self.evaluate()
        trained = (wall - self.start[0] - self.left_out[0], cpu - self.start[1] - self.left_out[1])
        self.points.append((step, *trained, accuracy))
        self.left_out = (
            self.left_out[0] + time.perf_counter() - wall,
            self.left_out[1] + time.process_time() - cpu,
        )

    def first_reaching(self, target: float) -> tuple[int, float, float, float] | None:
        return next((point for point in self.points if point[3] >= target), None)


class LightningCurve(pl.Callback):
    def __init__(self, curve: Curve, steps: int) -> None:
        self.curve, self.steps = curve, steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.curve.step(trainer.global_step, trainer.global_step >= self.steps)


def accuracy_run(arm: str, cfg, steps: int, every: int, texts: int | None) -> Curve:
    """One run of ``steps`` steps of ``arm`` (``ours`` or ``trainer``) from the pretrained weights."""
    from transformers import TrainerCallback

    module, datamodule = build_ours(cfg, texts)
    pl.seed_everything(cfg.seed, verbose=False)
    if arm == "ours":
        curve = Curve(every, lambda: test_accuracy(module, module, datamodule), len(datamodule.test_set))
        trainer = our_trainer(steps, [LightningCurve(curve, steps)])
        curve.begin()
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
        return curve
    peer = build_peer(module)
    evaluate = lambda: test_accuracy(lambda tokens: peer(**tokens)["logits"], peer, datamodule)  # noqa: E731
    curve = Curve(every, evaluate, len(datamodule.test_set))

    class PeerCurve(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            curve.step(state.global_step, state.global_step >= steps)

    with tempfile.TemporaryDirectory() as folder:
        trainer = peer_trainer(peer, datamodule, steps, folder, [PeerCurve()])
        curve.begin()
        trainer.train()
    return curve


def arms(steps: int, texts: int | None, folder: str, check: bool = True) -> dict[str, Callable[[], None]]:
    """``ours`` and ``trainer``: one call = ``steps`` optimizer steps of a fresh fit/train, same batches."""
    cfg = compose_text()
    module, datamodule = build_ours(cfg, texts)
    peer = build_peer(module)
    if check:
        check_like_for_like(module, peer, datamodule, folder)
    loader = datamodule.train_dataloader()

    def ours() -> None:
        our_trainer(steps).fit(module, train_dataloaders=loader)

    def trainer() -> None:
        peer_trainer(peer, datamodule, steps, folder).train()

    return {"ours": ours, "trainer": trainer}


def memory_arm(arm: str, steps: int, texts: int | None) -> Callable[[], None]:
    """``harness.peak_rss_in_child`` target: build both arms, return one call of ``arm``."""
    quiet()
    folder = tempfile.TemporaryDirectory()
    call = arms(steps, texts, folder.name, check=False)[arm]

    def run() -> None:
        try:
            call()
        finally:
            folder.cleanup()

    return run


def binomial_noise(accuracy: float, texts: int) -> float:
    """Two standard errors of the difference of two accuracies measured on ``texts`` test texts each."""
    return 2 * math.sqrt(2 * accuracy * (1 - accuracy) / texts)


def accuracy_rows(curves: dict[str, Curve], steps: int, target: float) -> list[tuple[str, str]]:
    """Accuracy after ``steps`` for each arm, whether they agree within noise, and time to ``target``."""
    (_, _, _, ours), (_, _, _, theirs) = curves["ours"].points[-1], curves["trainer"].points[-1]
    noise = binomial_noise((ours + theirs) / 2, curves["ours"].texts)
    agree = "within noise" if abs(ours - theirs) <= noise else "NOT within noise: not like for like"
    rows = [
        (f"test accuracy after {steps} steps: ours / Trainer", f"{ours:.4f} / {theirs:.4f}"),
        (
            "difference vs 2 standard errors of it",
            f"{ours - theirs:+.4f} vs {noise:.4f} ({curves['ours'].texts} test texts): {agree}",
        ),
    ]
    for arm, curve in curves.items():
        reached = curve.first_reaching(target)
        rows.append(
            (
                f"{arm}: training time to test accuracy >= {target:.2f}",
                f"step {reached[0]}, {reached[1]:.0f} s wall, {reached[2]:.0f} s CPU"
                if reached
                else f"not reached in {steps} steps (best {max(p[3] for p in curve.points):.4f})",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accuracy-steps", type=int, default=281, help="0 skips (281 = one epoch)")
    parser.add_argument("--eval-every", type=int, default=56)
    parser.add_argument("--accuracy-threads", type=int, default=2, help="threads of both accuracy runs")
    parser.add_argument("--target", type=float, default=0.80)
    parser.add_argument("--texts", type=int, default=None, help="first N training and test texts (tests)")
    parser.add_argument("--no-memory", action="store_true", help="skip the child-process peak memory rows")
    args = parser.parse_args()
    title = (
        f"text: ours vs transformers.Trainer, all-MiniLM-L6-v2 (all layers) on Rotten Tomatoes, batch 32, "
        f"{args.steps} steps per call, {args.repeats} rounds + 1 warm-up"
    )
    harness.begin(title, args.threads)
    quiet()
    with tempfile.TemporaryDirectory() as folder:
        timings = harness.interleave(arms(args.steps, args.texts, folder), repeats=args.repeats)
    steps = {name: timing.per(args.steps) for name, timing in timings.items()}
    rows: list[tuple[str, str | harness.Ratio]] = [
        ("ours: CPU per step", steps["ours"].describe()),
        ("Trainer: CPU per step", steps["trainer"].describe()),
        ("ours / Trainer step, CPU (goal <= 1.05x)", harness.ratio(steps["ours"], steps["trainer"])),
        ("ours / Trainer step, wall", harness.ratio(steps["ours"], steps["trainer"], "wall")),
    ]
    if not args.no_memory:
        for arm in ("ours", "trainer"):
            peak = harness.peak_rss_in_child("__main__:memory_arm", arm, args.steps, args.texts)
            rows.append((f"{arm}: peak RSS of one call (fresh child)", f"{peak / 2**20:.0f} MiB"))
    harness.report(title, rows)
    if args.accuracy_steps > 0:
        harness.fix_threads(args.accuracy_threads)
        cfg = compose_text()
        curves = {
            arm: accuracy_run(arm, cfg, args.accuracy_steps, args.eval_every, args.texts)
            for arm in ("ours", "trainer")
        }
        accuracy_title = (
            f"text: ours vs transformers.Trainer, test accuracy over {args.accuracy_steps} steps from the "
            f"same weights, evaluated every {args.eval_every} steps, {args.accuracy_threads} threads"
        )
        harness.report(accuracy_title, accuracy_rows(curves, args.accuracy_steps, args.target))


if __name__ == "__main__":
    main()
