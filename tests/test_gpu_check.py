"""scripts/gpu_check.py --dry-run: every row's code path runs on the CPU, so the GPU check cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_prints_one_table_where_every_cpu_row_passes(tmp_path):
    out = tmp_path / "gpu_check.md"
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    table = out.read_text()
    assert done.returncode == 0, table + done.stderr[-3000:]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][
        1:
    ]
    status = {(row[0].lstrip("| "), row[1]): row[-1].rstrip(" |") for row in rows}
    skipped = {key for key, value in status.items() if value == "skipped"}
    fsdp = (ROOT / "conf" / "trainer" / "fsdp_cpu.yaml").is_file()
    assert skipped == {
        ("default job", "trainer=cpu, 16-mixed"),
        ("strategy=lora", "trainer=cpu, 16-mixed"),
        *([] if fsdp else [("default job", "trainer=fsdp, 1 GPU")]),
    }, skipped  # only what needs CUDA; fsdp runs as fsdp_cpu on one process where it exists
    assert set(status.values()) == {"pass", "skipped"}, table
    checks = {check for check, _ in status}
    assert checks == {
        "default job",
        "strategy=lora",
        "callback precision x fused",
        "loop vs plain PyTorch",
        "Fisher vs batched fwd+bwd",
        "feature cache",
    }
    assert sum(check == "callback precision x fused" for check, _ in status) == 12
    assert not fsdp or ("default job", "trainer=fsdp_cpu, 1 device") in status


def test_without_cuda_the_real_check_refuses_and_points_to_the_dry_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the real check would run")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0 and "pass --dry-run" in done.stderr
