"""The README's SLURM sweep against a real scheduler: ``scripts/slurm_local.sh`` stands up a one-node cluster
on localhost (Debian's munge, slurmctld, slurmd), runs ``hydra/launcher=slurm trainer=ddp_cpu`` with a tiny
budget, checks every run's ``metrics.json`` and stops its daemons. Skipped where SLURM is not installed
(``make test`` needs no apt): ``apt-get install slurm-wlm munge`` to run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm_local.sh"
MISSING = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(tool) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"SLURM is not installed ({', '.join(MISSING)} missing): "
                    "apt-get install slurm-wlm munge")  # fmt: skip
@pytest.mark.skipif(os.geteuid() != 0, reason="slurm_local.sh starts munged and slurmd as root")
def test_readme_sweep_runs_on_a_local_slurm_cluster(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=1200)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "every run wrote metrics.json (2 runs" in output
    assert sorted(p.name for p in (tmp_path / "multirun").glob("[0-9]*")) == ["0", "1"]
    assert "stopped daemons" in output
