"""Fisher and EWC speed, as ratios measured side by side in one run (printed, never asserted).

Rows:
* vectorised ``fisher_diagonal`` vs a batch-size-1 autograd loop over the same samples (goal: >= 5x faster);
* vectorised ``fisher_diagonal`` vs one batched forward+backward over the same samples (goal: <= 3x slower);
* an SGD step with the EWC hook vs a plain step (goal: <= 5 % overhead).

Usage: ``python benchmarks/bench_fisher.py [--samples 64] [--no-timm] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from tl_lightning.callbacks.penalty import EWC, _Term
from tl_lightning.fisher import fisher_diagonal


def small_convnet(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(32, num_classes),
    )


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Minimum wall time of ``repeat`` calls (warm up separately, on a small input)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def per_sample_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    model.eval()
    for j in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[j : j + 1]), y[j : j + 1]), params)
        torch._foreach_addcmul_(total, grads, grads)


def batched_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> None:
    model.eval()
    for start in range(0, len(x), chunk):
        F.cross_entropy(model(x[start : start + chunk]), y[start : start + chunk]).backward()
    model.zero_grad(set_to_none=True)


def fisher_rows(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int, repeat: int):
    methods = {
        "vectorised": lambda xs, ys: fisher_diagonal(model, [(xs, ys)], chunk_size=chunk),
        "loop": lambda xs, ys: per_sample_loop(model, xs, ys),
        "batched": lambda xs, ys: batched_backward(model, xs, ys, chunk),
    }
    for method in methods.values():
        method(x[:2], y[:2])  # warm-up
    t = {key: best_of(lambda m=method: m(x, y), repeat) for key, method in methods.items()}
    return [
        (
            f"{name}: loop / vectorised",
            t["loop"] / t["vectorised"],
            ">= 5x",
            f"{t['loop']:.2f}s / {t['vectorised']:.2f}s",
        ),
        (
            f"{name}: vectorised / batched fwd+bwd",
            t["vectorised"] / t["batched"],
            "<= 3x",
            f"{t['vectorised']:.2f}s / {t['batched']:.2f}s",
        ),
    ]


def ewc_overhead_row(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int):
    """Interleave plain and penalised SGD steps; compare median step times."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    params = list(model.parameters())
    ewc = EWC(lambda_=1.0, modules="0")
    ewc._terms = [
        _Term(1.0, params, [p.detach().clone() for p in params], [torch.rand_like(p) for p in params])
    ]
    trainer = SimpleNamespace(_logger_connector=SimpleNamespace(should_update_logs=False))
    model.train()

    def step(penalised: bool) -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if penalised:
            ewc.on_before_optimizer_step(trainer, model, optimizer)
        optimizer.step()
        return time.perf_counter() - start

    plain, penalised = [], []
    for _ in range(steps):
        plain.append(step(False))
        penalised.append(step(True))
    ratio = statistics.median(penalised) / statistics.median(plain)
    return (
        f"{name}: EWC step / plain step",
        ratio,
        "<= 1.05x",
        f"{statistics.median(plain) * 1e3:.1f} ms/step",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--no-timm", action="store_true", help="skip tf_efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []

    model = small_convnet()
    x, y = torch.randn(args.samples, 3, 32, 32), torch.randint(0, 10, (args.samples,))
    rows += fisher_rows("convnet 32x32", model, x, y, chunk=64, repeat=3)
    rows.append(ewc_overhead_row("convnet 32x32", nn.Sequential(model), x, y, steps=30))

    if not args.no_timm:
        import timm

        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
        x = torch.randn(args.samples, 3, 64, 64)
        rows += fisher_rows("effnet-lite0 64x64", model, x, y, chunk=16, repeat=1)
        rows.append(ewc_overhead_row("effnet-lite0 64x64", nn.Sequential(model), x[:16], y[:16], steps=10))

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {args.samples} samples, CPU")
    print(f"{'measurement':<44} {'ratio':>7}  {'goal':>8}  detail")
    for label, ratio, goal, detail in rows:
        print(f"{label:<44} {ratio:>6.2f}x  {goal:>8}  {detail}")


if __name__ == "__main__":
    main()
