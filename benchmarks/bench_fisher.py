"""Fisher cost as ratios to one batched forward+backward, measured side by side (printed, never asserted).

Rows (issue 14's goals in brackets), all through ``benchmarks/harness.py``:

* EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``, random weights, 10 classes), 256 samples of 64 px,
  1 thread: CPU time of the empirical ``fisher_diagonal`` over one batched forward+backward of the same
  samples [<= 2.0x], and of the exact mode (expectation over the 10 classes); arms interleaved, paired
  per-round ratios with their min-max;
* peak memory of each arm in a fresh child process, above the memory its set-up holds (the model and
  the samples) [Fisher <= 1.5x batched];
* a randomly initialised BERT-base-sized encoder (``BertConfig()``, 110M parameters), 64 samples x 128
  tokens, empirical Fisher: peak memory of the child process [<= 6 GB].

Usage: ``python benchmarks/bench_fisher.py [--repeats 3] [--samples 256] [--no-exact] [--no-bert]
[--bert-samples 64]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import harness
import torch
from torch import nn
from torch.nn import functional as F

from tl_lightning.fisher import fisher_diagonal

CLASSES = 10
ARMS = ("batched fwd+bwd", "Fisher empirical", "Fisher exact")


def lite0_inputs(samples: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The benchmark's model and samples (fixed seeds: every arm and process sees the same ones)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=CLASSES).eval()
    return model, torch.randn(samples, 3, 64, 64), torch.randint(0, CLASSES, (samples,))


def batched(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def arms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], object]]:
    return {
        "batched fwd+bwd": lambda: batched(model, x, y),
        "Fisher empirical": lambda: fisher_diagonal(model, [(x, y)]),
        "Fisher exact": lambda: fisher_diagonal(model, [x], mode="exact"),
    }


def lite0_arm(arm: str, samples: int) -> Callable[[], object]:
    """Child-process target of ``harness.peak_rss_in_child``: set up, then hand back the arm to measure."""
    model, x, y = lite0_inputs(samples)
    return (lambda: None) if arm == "set-up" else arms(model, x, y)[arm]


def bert_arm(samples: int) -> Callable[[], object]:
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
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return lambda: fisher_diagonal(model, [(batch, torch.randint(0, 2, (samples,)))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-bert", action="store_true")
    parser.add_argument("--no-exact", action="store_true", help="leave out the (slow) exact-mode arm")
    parser.add_argument("--bert-samples", type=int, default=64)
    args = parser.parse_args()
    title = f"Fisher: EfficientNet-Lite0, {args.samples} samples 64 px, {args.repeats} rounds + 1 warm-up"
    harness.begin(title, threads=1)
    model, x, y = lite0_inputs(args.samples)
    chosen = ARMS[:2] if args.no_exact else ARMS
    every = arms(model, x, y)
    times = harness.interleave({arm: every[arm] for arm in chosen}, repeats=args.repeats)
    base = times["batched fwd+bwd"]
    rows: list[tuple[str, str | harness.Ratio]] = [(f"{arm}, CPU", times[arm].describe()) for arm in chosen]
    rows += [
        (f"{arm} / batched, CPU [empirical goal <= 2.0x]", harness.ratio(times[arm], base))
        for arm in chosen[1:]
    ]
    set_up = harness.peak_rss_in_child("__main__:lite0_arm", "set-up", args.samples)
    peaks = {arm: harness.peak_rss_in_child("__main__:lite0_arm", arm, args.samples) for arm in chosen}
    for arm, peak in peaks.items():
        above, ratio = (peak - set_up) / 2**20, (peak - set_up) / (peaks[ARMS[0]] - set_up)
        rows.append((f"{arm}, peak above set-up [Fisher goal <= 1.5x]", f"{above:.0f} MiB ({ratio:.2f}x)"))
    rows.append(("set-up (model + samples), process peak", f"{set_up / 2**20:.0f} MiB"))
    harness.report(title, rows)
    if args.no_bert:
        return
    bert_title = f"Fisher: BERT-base-sized encoder (110M), {args.bert_samples} x 128 tokens, empirical"
    try:
        import transformers  # noqa: F401
    except ImportError:
        harness.skip(bert_title, "transformers is not installed")
        return
    peak = harness.peak_rss_in_child("__main__:bert_arm", args.bert_samples)
    harness.report(bert_title, [("process peak [goal <= 6 GB]", f"{peak / 2**30:.2f} GiB")])


if __name__ == "__main__":
    main()
