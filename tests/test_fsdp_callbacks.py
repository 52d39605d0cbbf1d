"""FSDP2 (``trainer=fsdp_cpu``'s strategy) gives every callback the weights of one process with the same
global batch, in a foreign LightningModule that shards itself and in ``TransferModule``.

One launch of two gloo processes trains every case (``fsdp_callbacks_script.py``); the same process
then trains each case alone. Before the callbacks followed the sharded parameters, ``GradualUnfreeze``
never unfroze the sharded backbone and ``L2SP``/``EWC`` stopped on ``_foreach`` ops over DTensors.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_callbacks_script import CASES, DDP_REFERENCE

TOLERANCE = 1e-5
CALLBACK_METRICS = ("drift/", "source/", "penalty/")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("fsdp_callbacks")
    script = Path(__file__).with_name("fsdp_callbacks_script.py")
    done = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {
        name: torch.load(out / f"{name}.pt", weights_only=True) for name in CASES if name not in DDP_REFERENCE
    }
    for name in DDP_REFERENCE:
        results[name] = [torch.load(out / f"{name}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    return results


def _moved(run: dict, name: str) -> bool:
    return not torch.equal(run["initial"][name], run["weights"][name])


@pytest.mark.slow
@pytest.mark.parametrize("case", [name for name in CASES if name not in DDP_REFERENCE])
def test_sharded_weights_and_metrics_equal_one_process(results, case):
    single, sharded = results[case]["single"], results[case]["sharded"]
    assert single["weights"].keys() == sharded["weights"].keys()
    gaps = {n: (single["weights"][n] - sharded["weights"][n]).abs().max().item() for n in single["weights"]}
    assert max(gaps.values()) <= TOLERANCE, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
    assert any(_moved(single, n) for n in single["weights"])  # the comparison is not of two idle runs
    logged = [k for k in single["metrics"][-1] if k.startswith(CALLBACK_METRICS)]
    for epoch, (a, b) in enumerate(zip(single["metrics"], sharded["metrics"], strict=True)):
        for key in logged:
            assert abs(a[key] - b[key]) <= TOLERANCE * max(1.0, abs(a[key])), (epoch, key, a[key], b[key])


@pytest.mark.slow
def test_what_each_callback_did_happened_under_sharding(results):
    """The equalities above are about callbacks that acted: frozen stays, unfrozen moves, metrics exist."""
    for kind, first in (("foreign", "backbone.0.0.weight"), ("transfer", "backbone.model.0.0.weight")):
        assert not _moved(results[f"{kind}-freeze"]["sharded"], first)
        assert _moved(results[f"{kind}-gradual_unfreeze"]["sharded"], first)  # was stuck before the fix
        assert "penalty/l2sp" in results[f"{kind}-l2sp"]["sharded"]["metrics"][-1]
        assert "penalty/ewc" in results[f"{kind}-ewc"]["sharded"]["metrics"][-1]
        drift = results[f"{kind}-drift_retention"]["sharded"]["metrics"][-1]
        assert {"source/agreement", "source/kl"} <= drift.keys() and any(
            k.startswith("drift/") for k in drift
        )
    lora = results["transfer-lora"]["sharded"]
    changed = {n for n in lora["weights"] if _moved(lora, n)}
    assert changed and all("lora_" in n or n.startswith("heads.target") for n in changed)


@pytest.mark.slow
def test_batchnorm_buffers_follow_ddp(results):
    """Rank 0's BatchNorm running statistics reach every rank before each forward, as DDP broadcasts them
    (FSDP2 leaves buffers alone: each rank's drifted on its own data, and checkpoints kept one rank's)."""
    for rank, run in enumerate(results["foreign-batchnorm"]):
        sharded, ddp = run["sharded"], run["ddp"]
        assert any("running_mean" in n for n in ddp["buffers"])
        for n in ddp["weights"]:
            assert (sharded["weights"][n] - ddp["weights"][n]).abs().max().item() <= TOLERANCE, (rank, n)
        for n in ddp["buffers"]:
            gap = (sharded["buffers"][n].double() - ddp["buffers"][n].double()).abs().max().item()
            assert gap <= TOLERANCE, (rank, n, gap)
