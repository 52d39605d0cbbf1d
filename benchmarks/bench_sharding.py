"""FSDP2 vs DDP on two ranks: per-rank peak memory and step time of fine-tuning a BERT-base-sized encoder.

Both arms train the same model the same way, in one run: a BERT-base encoder built from
``transformers.BertConfig()`` (12 layers, hidden 768, 110M parameters, random init) with a linear head,
AdamW, cross-entropy on fixed random token batches, two gloo processes on this machine's CPUs:

* ``ddp``: ``DistributedDataParallel`` (every rank holds all parameters, gradients, gradient buckets and
  AdamW moments);
* ``fsdp2``: ``fully_shard`` per encoder layer, then the whole model (what ``TransferModule.configure_model``
  does under ``trainer=fsdp|fsdp_cpu``): each rank holds half of the parameters, gradients and moments,
  plus the layer being gathered.

Per rank, the resident high-water mark (Linux ``VmHWM``) is reset once the model is built and wrapped
(so the set-up's spikes are left out and what it holds counts) and read after the steps; the table gives
it above the rank's memory before the model was built (interpreter, torch, process group), the part
the strategy decides, and the ratio FSDP2 / DDP rank by rank. The ranks run with glibc's mmap threshold
fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``): every large block goes back to the system when freed, so the
resident memory follows what is alive (by default glibc's moving threshold keeps freed blocks, e.g. the
whole model as built before ``fully_shard`` copied out this rank's half, and the high-water mark then
measures malloc's history rather than the strategy). Step time is the median wall time of the
timed steps (after one warm-up step). The arms run one after the other, each in two fresh processes.

Usage::

    python benchmarks/bench_sharding.py [--steps 3] [--batch-size 4] [--seq-len 128] [--threads 1]
        [--out docs/results/sharding]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import harness
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ARMS = ("ddp", "fsdp2")


def _vm(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process, in bytes."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024


def _model(num_classes: int = 2) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = BertModel(BertConfig(), add_pooling_layer=False)
            self.head = torch.nn.Linear(self.encoder.config.hidden_size, num_classes)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(input_ids=input_ids).last_hidden_state[:, 0])

    torch.manual_seed(0)
    return Classifier()


def _wrap(model: torch.nn.Module, arm: str) -> torch.nn.Module:
    if arm == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.encoder.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    return model


def _rank(rank: int, port: int, arm: str, options: dict, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(options["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    before = _vm("VmRSS:")
    model = _wrap(_model(), arm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(1000, 30000, (options["batch_size"], options["seq_len"]), generator=generator)
    labels = torch.randint(0, 2, (options["batch_size"],), generator=generator)
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := what the set-up holds now
    held = _vm("VmRSS:")
    times = []
    for step in range(options["steps"] + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(tokens), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step is warm-up
            times.append(time.perf_counter() - start)
    result = {"before": before, "held": held, "peak": _vm("VmHWM:"), "step_s": times}
    Path(out, f"{arm}{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run_arm(arm: str, options: dict, out: Path) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank, args=(port, arm, options, str(out)), nprocs=2, join=True, start_method="spawn")
    return [json.loads((out / f"{arm}{rank}.json").read_text()) for rank in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write bench_sharding.json/.md here")
    options = vars(parser.parse_args())
    out_dir = options.pop("out")
    harness.fix_threads(options["threads"])
    title = (
        f"FSDP2 vs DDP, 2 gloo ranks: BERT-base encoder (110M) + AdamW, batch {options['batch_size']} x "
        f"{options['seq_len']} tokens per rank"
    )
    print(f"{title}\n{harness.machine()}; ranks: glibc mmap threshold 64 KiB", flush=True)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # read by the spawned ranks' glibc (see above)
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_sharding_{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    results = {arm: _run_arm(arm, options, scratch) for arm in ARMS}
    mib = 2**20
    used = {arm: [(r["peak"] - r["before"]) / mib for r in ranks] for arm, ranks in results.items()}
    per_rank = [f / d for f, d in zip(used["fsdp2"], used["ddp"], strict=True)]
    step = {arm: statistics.median(t for r in ranks for t in r["step_s"]) for arm, ranks in results.items()}
    rows: list[tuple[str, str | harness.Ratio]] = []
    for arm in ARMS:
        peaks = ", ".join(f"{v:.0f}" for v in used[arm])
        rows.append((f"{arm}: peak RSS above start, MiB (rank 0, 1)", peaks))
        rows.append((f"{arm}: step time, s (median of ranks' timed steps)", f"{step[arm]:.2f}"))
    rows.append(
        (
            "peak memory per rank, fsdp2 / ddp",
            f"{statistics.median(per_rank):.2f}x [{min(per_rank):.2f}-{max(per_rank):.2f}]",
        )
    )
    rows.append(("step time, fsdp2 / ddp", f"{step['fsdp2'] / step['ddp']:.2f}x"))
    harness.report(title, rows)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {"title": title, "machine": harness.machine(), "options": options, "results": results}
        (out_dir / "bench_sharding.json").write_text(json.dumps(record, indent=2))
        lines = [
            f"# {title}",
            "",
            f"Machine: {harness.machine()}",
            "",
            "| measurement | value |",
            "|---|---|",
        ]
        lines += [f"| {label} | {value} |" for label, value in rows]
        (out_dir / "bench_sharding.md").write_text("\n".join(lines) + "\n")
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()


if __name__ == "__main__":
    main()
