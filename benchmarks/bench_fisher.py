"""Fisher cost as ratios to one batched forward+backward, measured side by side (printed, never asserted).

Rows (issue 14's goals in brackets):
* EfficientNet-Lite0, 256 samples, 64 px, 1 thread: empirical ``fisher_diagonal`` CPU time / one batched
  forward+backward over the same samples [<= 2.0x]; arms interleaved (A B A B ...), median and min-max;
* the same, exact mode (expectation over 10 classes; one backward pass per class);
* peak memory of each arm in a child process (VmHWM reset after set-up) [Fisher <= 1.5x batched];
* a randomly initialised BERT-base-sized encoder (``BertConfig()``, 110M parameters), 64 samples x 128
  tokens, empirical Fisher: peak memory of the child process [<= 6 GB].

Usage: ``python benchmarks/bench_fisher.py [--repeats 3] [--no-bert] [--bert-samples 64]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from tl_lightning.fisher import fisher_diagonal

CLASSES = 10


def lite0_inputs(samples: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=CLASSES).eval()
    return model, torch.randn(samples, 3, 64, 64), torch.randint(0, CLASSES, (samples,))


def batched(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def arms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    return {
        "batched fwd+bwd": lambda: batched(model, x, y),
        "fisher empirical": lambda: fisher_diagonal(model, [(x, y)]),
        "fisher exact": lambda: fisher_diagonal(model, [x], mode="exact"),
    }


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """CPU seconds of each arm, arms interleaved, after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.process_time()
            fn()
            times[key].append(time.process_time() - start)
    return times


def _hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(arm: str, samples: int) -> None:
    """Run one arm once in this process; print peak RSS above the set-up's as JSON."""
    torch.set_num_threads(1)
    if arm == "bert":
        model, batch = bert_inputs(samples)
        run = lambda: fisher_diagonal(model, batch)  # noqa: E731
    else:
        model, x, y = lite0_inputs(samples)
        run = arms(model, x, y)[arm]
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    base = _hwm_bytes()
    start = time.perf_counter()
    run()
    print(
        json.dumps(
            {"peak": _hwm_bytes(), "above_setup": _hwm_bytes() - base, "s": time.perf_counter() - start}
        )
    )


def bert_inputs(samples: int):
    from transformers import BertConfig, BertModel

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = BertModel(BertConfig())
            self.head = nn.Linear(768, 2)

        def forward(self, batch):
            return self.head(self.encoder(**batch).last_hidden_state[:, 0])

    torch.manual_seed(0)
    model = Classifier().eval()
    ids = torch.randint(1000, 30000, (samples, 128))
    return model, [
        ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, 2, (samples,)))
    ]


def measure_child(arm: str, samples: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", arm, "--samples", str(samples)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-bert", action="store_true")
    parser.add_argument("--bert-samples", type=int, default=64)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.samples)
        return
    torch.set_num_threads(1)
    model, x, y = lite0_inputs(args.samples)
    times = interleaved(arms(model, x, y), args.repeats)
    base = statistics.median(times["batched fwd+bwd"])
    print(
        f"\ntorch {torch.__version__}, 1 thread, {args.samples} samples 64 px, "
        f"{args.repeats} repeats, CPU time"
    )
    print(f"{'EfficientNet-Lite0 arm':<22} {'median s':>9} {'min-max s':>14} {'/ batched':>10}")
    for key, values in times.items():
        spread, median = f"{min(values):.2f}-{max(values):.2f}", statistics.median(values)
        print(f"{key:<22} {median:>9.2f} {spread:>14} {median / base:>9.2f}x")
    peaks = {
        arm: measure_child(arm, args.samples)
        for arm in ("batched fwd+bwd", "fisher empirical", "fisher exact")
    }
    print(f"\n{'peak memory (child)':<22} {'above set-up':>13} {'/ batched':>10} {'process peak':>13}")
    for arm, peak in peaks.items():
        ratio = peak["above_setup"] / peaks["batched fwd+bwd"]["above_setup"]
        above, total = peak["above_setup"] / 2**20, peak["peak"] / 2**20
        print(f"{arm:<22} {above:>10.0f} MiB {ratio:>9.2f}x {total:>9.0f} MiB")
    if args.no_bert:
        return
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("\nBERT-base row skipped: transformers is not installed")
        return
    bert = measure_child("bert", args.bert_samples)
    print(
        f"\nBERT-base-sized encoder (110M), {args.bert_samples} x 128 tokens, empirical Fisher: "
        f"process peak {bert['peak'] / 2**30:.2f} GiB, {bert['s']:.0f} s wall"
    )


if __name__ == "__main__":
    main()
