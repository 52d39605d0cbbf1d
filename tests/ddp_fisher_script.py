"""Compute fisher_diagonal in one process and in 2 gloo processes on sharded data; save both.

Usage: ``python tests/ddp_fisher_script.py OUT_DIR`` writes ``single.safetensors`` and
``ddp.safetensors`` (keys ``"<mode>/<parameter>"``) for ``tests/test_fisher.py`` to compare.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from gloo_launch import run_two_workers
from safetensors.torch import save_file
from torch import nn

from tl_lightning.fisher import fisher_diagonal

CASES = {"empirical": None, "sampled": 11, "exact": None}  # mode -> max_samples (cuts inside a batch)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 4))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in (4, 3, 5, 2, 3)]


def _all_modes() -> dict[str, torch.Tensor]:
    model, batches = _model(), _batches()
    out = {}
    for mode, max_samples in CASES.items():
        fisher = fisher_diagonal(model, batches, mode=mode, max_samples=max_samples, chunk_size=2, seed=5)
        out.update({f"{mode}/{name}": value for name, value in fisher.items()})
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = _all_modes()
        if rank == 0:
            save_file(result, str(Path(out_dir) / "ddp.safetensors"))
    finally:
        dist.destroy_process_group()


def main(out_dir: str) -> None:
    run_two_workers(_worker, out_dir)
    save_file(_all_modes(), str(Path(out_dir) / "single.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
