"""What only a GPU can show, in one command and one table: every row says what it expects and pass/fail.

Rows (each a real run; nothing is simulated):

* **jobs**: the default job (``python train.py``: EfficientNet-Lite0, digits, ``strategy=gradual_unfreeze``)
  and ``strategy=lora``, each under ``trainer=gpu`` (16-mixed, CUDA's ``GradScaler``) and with
  ``trainer.precision=bf16-mixed``: the run finishes, its losses are finite and its test accuracy reaches
  the expectation; ``trainer=fsdp`` (FSDP2 on one GPU) the same, when ``conf/trainer/fsdp.yaml`` exists;
* **callback precision x fused**: the gradients the first optimizer step of ``EWC`` and ``L2SP`` applies
  (``on_before_optimizer_step``, in the loss's units) under 32-true, bf16-mixed and 16-mixed (CUDA's
  real ``GradScaler``), ``AdamW(fused=False|True)``, against the 32-bit unfused ones: a penalty added
  in the wrong (scaled) units, or of the wrong size (x10, x0.2), is far outside the 2% tolerance;
* **loop**: images/s of our Lightning loop (``TransferModule``, ``trainer=gpu``'s precision) against a
  plain PyTorch loop over the same module, batches and optimizer, batch 64 of 224 px, full fine-tuning,
  steady state (warm-up batches left out), rounds alternated: goal >= 0.95x;
* **Fisher**: ``fisher_diagonal`` (empirical) against one batched forward+backward of the same samples
  on the device: time (goal <= 2.0x, as ``benchmarks/bench_fisher.py`` on the CPU) and peak device memory
  (goal <= 1.5x);
* **feature cache**: ``extract_features`` of a CPU-resident backbone on the device: features equal to
  the CPU's (to TF32 / kernel tolerance), returned on the CPU, the backbone back where it was.

``--dry-run`` runs the same code on the CPU with tiny budgets (jobs of a few batches, 32 px, a handful of
samples): rows that need CUDA (16-mixed with CUDA's ``GradScaler``, FSDP2 over NCCL) are marked
``skipped``; the loop, Fisher and feature-cache rows run (so their code cannot rot) but are marked
``skipped`` too, since what they judge (a speed ratio, peak device memory, CUDA features against the
CPU's) needs CUDA; job rows judge finishing with finite losses, not the accuracy of 2 batches; the
16-mixed matrix rows use the CPU ``GradScaler`` stand-in (``tests/test_gpu_check.py`` runs the dry run).
On an H100 the whole check takes about 4-6 minutes (budget: 8).

Usage::

    python scripts/gpu_check.py [--dry-run] [--out docs/results/gpu/gpu_check.md]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.plugins.precision.amp import _optimizer_handles_unscaling
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.backbones import efficientnet_lite0
from tl_lightning.callbacks import EWC, L2SP
from tl_lightning.fisher import fisher_diagonal
from tl_lightning.modules.heads import LinearHead
from tl_lightning.modules.transfer import TransferModule
from tl_lightning.run.feature_cache import extract_features
from tl_lightning.run.pipeline import train

CONF = Path(__file__).resolve().parents[1] / "conf"
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


@dataclass
class Budget:
    """How much each row runs: the GPU's real sizes, or the dry run's tiny ones."""

    job_overrides: tuple[str, ...]
    min_test_accuracy: float | None  # None: accuracy not judged (a dry run's few batches)
    loop_batch: int
    loop_pixels: int
    loop_steps: int
    loop_warmup: int
    loop_rounds: int
    fisher_samples: int
    fisher_pixels: int
    cache_images: int
    judge_speed: bool


GPU = Budget((), 0.80, 64, 224, 30, 5, 3, 256, 64, 512, True)
DRY_RUN = Budget(
    (
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "data.image_size=32",
        "data.batch_size=8",
        "allow_short_schedule=true",
    ),
    None,
    4,
    32,
    3,
    1,
    1,
    8,
    32,
    8,
    False,
)


@dataclass
class Row:
    check: str
    setting: str
    measured: str
    expectation: str
    status: str  # pass | fail | skipped


def _row(check: str, setting: str, expectation: str, measure: Callable[[], tuple[str, bool]]) -> Row:
    """Run one check; an exception is a failed row with its last line, not a crashed command."""
    try:
        measured, passed = measure()
    except Exception as error:  # noqa: BLE001 (every failure becomes a row of the one table)
        traceback.print_exc()
        return Row(
            check, setting, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}", expectation, "fail"
        )
    return Row(check, setting, measured, expectation, "pass" if passed else "fail")


def _skipped(check: str, setting: str, expectation: str, reason: str) -> Row:
    return Row(check, setting, reason, expectation, "skipped")


def _unjudged(check: str, setting: str, expectation: str, measure: Callable[[], tuple[str, bool]]) -> Row:
    """Run the row's code (an exception fails it) but judge nothing: ``skipped``, with what it measured
    on the CPU. A dry run keeps the code path alive without claiming the GPU's result."""
    row = _row(check, setting, expectation, lambda: (measure()[0], True))
    if row.status == "fail":
        return row
    return _skipped(check, setting, expectation, f"needs CUDA; ran on the CPU, not judged: {row.measured}")


# -- jobs -------------------------------------------------------------------------------------------


def run_job(overrides: list[str], folder: Path) -> dict:
    """``train(cfg)`` of the composed config in ``folder``; its ``metrics.json``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.output_dir={folder}",
                "callbacks.rich_progress_bar=null",
                "+trainer.enable_progress_bar=false",
                *overrides,
            ],
        )
    train(cfg)
    return json.loads((folder / "metrics.json").read_text())


def job_rows(budget: Budget, device: str, root: Path) -> list[Row]:
    trainer = "trainer=gpu" if device == "cuda" else "trainer=cpu"
    expectation = (
        f"finishes, finite losses, test acc >= {budget.min_test_accuracy:.2f}"
        if budget.min_test_accuracy is not None
        else "finishes, finite losses (accuracy not judged after 2 batches)"
    )
    rows = []
    jobs = [("default job", []), ("strategy=lora", ["strategy=lora"])]
    for name, strategy in jobs:
        for precision in ("16-mixed", "bf16-mixed"):
            setting = f"{trainer}, {precision}"
            if precision == "16-mixed" and device != "cuda":
                rows.append(
                    _skipped(name, setting, expectation, "16-mixed needs CUDA (Lightning: bf16 on CPU)")
                )
                continue
            overrides = [trainer, f"++trainer.precision={precision}", *strategy, *budget.job_overrides]
            rows.append(_row(name, setting, expectation, partial(_judge_job, overrides, budget, root)))
    fsdp = "fsdp" if device == "cuda" else "fsdp_cpu"
    if (CONF / "trainer" / f"{fsdp}.yaml").is_file():
        overrides = [f"trainer={fsdp}", "trainer.devices=1", *budget.job_overrides]
        rows.append(
            _row(
                "default job",
                f"trainer={fsdp}, 1 device",
                expectation,
                partial(_judge_job, overrides, budget, root),
            )
        )
    else:
        rows.append(
            _skipped("default job", "trainer=fsdp, 1 GPU", expectation, f"conf/trainer/{fsdp}.yaml missing")
        )
    return rows


def _judge_job(overrides: list[str], budget: Budget, root: Path) -> tuple[str, bool]:
    folder = Path(tempfile.mkdtemp(dir=root))
    started = time.perf_counter()
    metrics = run_job(overrides, folder)
    seconds = time.perf_counter() - started
    test = metrics["test"]
    accuracy, loss = test.get("test/acc"), test.get("test/loss")
    finite = all(v is not None and math.isfinite(v) for v in (accuracy, loss))
    measured = f"test acc {accuracy:.3f}, loss {loss:.3f}, {metrics['epochs']} epochs, {seconds:.0f} s"
    judged = budget.min_test_accuracy is None or (finite and accuracy >= budget.min_test_accuracy)
    return measured, finite and judged


# -- callback precision x fused matrix ---------------------------------------------------------------


class _Net(pl.LightningModule):
    """A small backbone + two heads; the penalties act on the backbone (EWC) or on everything (L2SP)."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleDict({"source": nn.Linear(16, 4), "target": nn.Linear(16, 3)})
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads["target"](self.backbone(x))

    def source_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads["source"](self.backbone(x))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01, fused=self.fused)


class _AwayFromAnchor(Callback):
    """After the penalty took its anchor, move every weight by +-0.1: the penalty then dominates the step."""

    def __init__(self, before: dict) -> None:
        self.before = before

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(torch.randn(p.shape, generator=g).sign().to(p.device) * 0.1)
        self.before.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})


class _GradientsBeforeStep(Callback):
    """The gradients the optimizer is about to apply (the penalty's included: this callback runs after it),
    in the loss's units: divided by the ``GradScaler``'s scale when the optimizer unscales them itself
    (fused AdamW; Lightning unscales the others before this hook)."""

    def __init__(self, into: dict) -> None:
        self.into = into

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and _optimizer_handles_unscaling(optimizer) else 1.0
        for name, param in pl_module.named_parameters():
            if param.grad is not None:  # the source head takes no part in the target loss
                self.into[name] = (param.grad.detach().float() / scale).cpu()


def first_step(penalty: str, precision: str, fused: bool, device: str) -> dict[str, torch.Tensor]:
    """The gradients of the first optimizer step, loss and penalty, in the loss's units (16-mixed on CUDA:
    Lightning's own CUDA GradScaler). Gradients, not the update: AdamW's first update is about
    ``lr * sign(gradient)``, blind to a penalty of the wrong size."""
    model = _Net(fused)
    callback = (
        EWC(lambda_=100.0, modules="backbone", fisher_samples=16)
        if penalty == "ewc"
        else L2SP(alpha=100.0, beta=100.0, pretrained="backbone", new="heads.target")
    )
    if precision == "16-mixed" and device == "cpu":  # the stand-in the test suite uses
        extra = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    else:
        extra = {"precision": precision}
    before: dict[str, torch.Tensor] = {}
    gradients: dict[str, torch.Tensor] = {}
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, _AwayFromAnchor(before), _GradientsBeforeStep(gradients)],
        **extra,
    )
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
    trainer.fit(model, DataLoader(data, batch_size=16))
    return gradients


def deviation(
    reference: dict[str, torch.Tensor], measured: dict[str, torch.Tensor], names: list[str]
) -> float:
    """The largest ``|measured - reference|`` of any of ``names``, relative to that tensor's largest entry."""
    return max(((measured[n] - reference[n]).abs().max() / reference[n].abs().max()).item() for n in names)


def matrix_rows(device: str) -> list[Row]:
    rows = []
    expectation = "first step's gradients of the penalised weights = 32-bit unfused ones (2% of the largest)"
    for penalty in ("ewc", "l2sp"):
        reference = first_step(penalty, "32-true", False, device)
        penalised = [
            n
            for n in reference
            if n.startswith(("backbone.",) if penalty == "ewc" else ("backbone.", "heads.target."))
        ]
        for precision in PRECISIONS:
            for fused in (False, True):
                setting = f"{penalty}, {precision}, fused={fused}"
                if precision == "16-mixed" and device == "cpu":
                    setting += " (CPU GradScaler stand-in)"

                def measure(
                    penalty=penalty,
                    precision=precision,
                    fused=fused,
                    reference=reference,
                    penalised=penalised,
                ) -> tuple[str, bool]:
                    worst = deviation(reference, first_step(penalty, precision, fused, device), penalised)
                    return f"largest relative deviation {worst:.2e}", worst <= 2e-2

                rows.append(_row("callback precision x fused", setting, expectation, measure))
    return rows


# -- our loop vs a plain loop ------------------------------------------------------------------------


def _new_module(classes: int) -> TransferModule:
    torch.manual_seed(0)
    optimizer = partial(torch.optim.AdamW, lr=1e-3)
    return TransferModule(
        efficientnet_lite0(), LinearHead(1280, classes), classes, optimizer, weight_decay=0.01
    )


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Throughput(Callback):
    """Seconds from the start of batch ``warmup`` to the end of the epoch (device synchronised)."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device, self.seconds = warmup, device, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            _synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _synchronize(self.device)
        self.seconds = time.perf_counter() - self.start


def loop_row(budget: Budget, device: str) -> Row:
    precision = "16-mixed" if device == "cuda" else "32-true"
    setting = f"batch {budget.loop_batch}, {budget.loop_pixels} px, {precision}, full fine-tuning"
    expectation = "ours / plain images/s >= 0.95"

    def measure() -> tuple[str, bool]:
        classes, steps = 10, budget.loop_warmup + budget.loop_steps
        g = torch.Generator().manual_seed(0)
        images = budget.loop_batch * steps
        x = torch.randn(images, 3, budget.loop_pixels, budget.loop_pixels, generator=g)
        y = torch.randint(0, classes, (images,), generator=g)
        loader = DataLoader(TensorDataset(x, y), batch_size=budget.loop_batch, pin_memory=device == "cuda")
        timed = budget.loop_batch * budget.loop_steps
        plain_module, ours_module = _new_module(classes).to(device), _new_module(classes)
        optimizer = torch.optim.AdamW(plain_module.parameters(), lr=1e-3, weight_decay=0.01)
        scaler = torch.amp.GradScaler(device, enabled=precision == "16-mixed")

        def plain() -> float:
            plain_module.train()
            for step, (xb, yb) in enumerate(loader):
                if step == budget.loop_warmup:
                    _synchronize(device)
                    start = time.perf_counter()
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                with torch.autocast(device, torch.float16, enabled=precision == "16-mixed"):
                    loss = F.cross_entropy(plain_module(xb), yb)
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            _synchronize(device)
            return timed / (time.perf_counter() - start)

        def ours() -> float:
            clock = _Throughput(budget.loop_warmup, device)
            trainer = pl.Trainer(
                accelerator="gpu" if device == "cuda" else "cpu",
                devices=1,
                max_epochs=1,
                precision=precision,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                callbacks=[clock],
            )
            trainer.fit(ours_module, train_dataloaders=loader)
            return timed / clock.seconds

        rates = [(plain(), ours()) for _ in range(budget.loop_rounds)]
        ratio = statistics.median(o / p for p, o in rates)
        plain_rate, ours_rate = (statistics.median(r[i] for r in rates) for i in (0, 1))
        measured = f"{ratio:.3f}x (ours {ours_rate:.0f} vs plain {plain_rate:.0f} images/s)"
        return measured, ratio >= 0.95

    judge = _row if budget.judge_speed else _unjudged
    return judge("loop vs plain PyTorch", setting, expectation, measure)


# -- Fisher ------------------------------------------------------------------------------------------


def fisher_row(budget: Budget, device: str) -> Row:
    setting = f"Lite0, {budget.fisher_samples} samples, {budget.fisher_pixels} px, empirical"
    expectation = "time <= 2.0x, peak memory <= 1.5x batched"

    def measure() -> tuple[str, bool]:
        import timm

        torch.manual_seed(0)
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval().to(device)
        px = budget.fisher_pixels
        x = torch.randn(budget.fisher_samples, 3, px, px, device=device)
        y = torch.randint(0, 10, (budget.fisher_samples,), device=device)

        def batched() -> None:
            F.cross_entropy(model(x), y).backward()
            model.zero_grad(set_to_none=True)

        arms = {"batched": batched, "fisher": lambda: fisher_diagonal(model, [(x, y)])}
        seconds, peaks = {}, {}
        for name, call in arms.items():
            call()  # warm-up (kernels, allocator)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            _synchronize(device)
            start = time.perf_counter()
            call()
            _synchronize(device)
            seconds[name] = time.perf_counter() - start
            if device == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated() - base
        time_ratio = seconds["fisher"] / seconds["batched"]
        measured = (
            f"time {time_ratio:.2f}x ({seconds['fisher'] * 1e3:.0f} vs {seconds['batched'] * 1e3:.0f} ms)"
        )
        if not peaks:  # the CPU: no peak device memory to judge
            return measured, False
        memory_ratio = peaks["fisher"] / peaks["batched"]
        mib = {name: f"{peak / 2**20:.0f}" for name, peak in peaks.items()}
        measured += f", peak {memory_ratio:.2f}x ({mib['fisher']} vs {mib['batched']} MiB)"
        return measured, time_ratio <= 2.0 and memory_ratio <= 1.5

    judge = _row if budget.judge_speed and device == "cuda" else _unjudged
    return judge("Fisher vs batched fwd+bwd", setting, expectation, measure)


# -- feature cache -----------------------------------------------------------------------------------


def cache_row(budget: Budget, device: str) -> Row:
    setting = f"Lite0, {budget.cache_images} images of 64 px, extraction on {device}"
    expectation = "features = CPU's (1e-2 of their scale), on the CPU; backbone back on the CPU"

    def measure() -> tuple[str, bool]:
        backbone = efficientnet_lite0()
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(budget.cache_images, 3, 64, 64, generator=g),
            torch.zeros(budget.cache_images, dtype=torch.long),
        )
        reference = extract_features(backbone, data, 32, device="cpu").tensors[0]
        _synchronize(device)
        start = time.perf_counter()
        features = extract_features(backbone, data, 32, device=device).tensors[0]
        _synchronize(device)
        rate = budget.cache_images / (time.perf_counter() - start)
        deviation = ((features - reference).abs().max() / reference.abs().max()).item()
        home = next(backbone.parameters()).device
        where = f"features on {features.device}, backbone on {home}"
        measured = f"deviation {deviation:.1e}, {rate:.0f} images/s, {where}"
        return measured, deviation <= 1e-2 and features.device.type == "cpu" and home.type == "cpu"

    # on the CPU the reference is the same computation: nothing to compare
    return (_row if device == "cuda" else _unjudged)("feature cache", setting, expectation, measure)


# -- table -------------------------------------------------------------------------------------------


def check(dry_run: bool) -> list[Row]:
    """Every row, on CUDA (or, with ``dry_run``, on the CPU with tiny budgets).

    Raises:
        RuntimeError: Without ``dry_run`` on a machine with no CUDA device.
    """
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run on a GPU machine, or pass --dry-run for the CPU paths")
    device, budget = ("cpu", DRY_RUN) if dry_run else ("cuda", GPU)
    with tempfile.TemporaryDirectory() as folder:
        rows = job_rows(budget, device, Path(folder))
    rows += matrix_rows(device)
    rows += [loop_row(budget, device), fisher_row(budget, device), cache_row(budget, device)]
    return rows


def markdown(rows: list[Row], title: str) -> str:
    lines = [
        f"## {title}",
        "",
        "| check | setting | measured | expectation | status |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.check} | {r.setting} | {r.measured} | {r.expectation} | {r.status} |" for r in rows]
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "fail", "skipped")}
    lines += ["", f"{counts['pass']} pass, {counts['fail']} fail, {counts['skipped']} skipped"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny budgets; CUDA-only rows skipped")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) to this file")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = check(args.dry_run)
    where = "CPU dry run" if args.dry_run else torch.cuda.get_device_name()
    title = f"gpu_check on {where}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s"
    table = markdown(rows, title)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    raise SystemExit(1 if any(r.status == "fail" for r in rows) else 0)


if __name__ == "__main__":
    main()
