"""Start two forked gloo workers on a free local port, for the DDP test scripts."""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch
import torch.multiprocessing as mp


def run_two_workers(worker: Callable[..., None], out_dir: str) -> None:
    """Call ``worker(rank, port, out_dir)`` in two forked processes (ranks 0 and 1) and wait for both.

    Forking before this process computes anything avoids a second torch import and inherited thread pools.
    """
    torch.set_num_threads(1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(worker, args=(port, out_dir), nprocs=2, join=True, start_method="fork")
