"""Late-unfrozen parameters under DDP stay identical across ranks in every precision, with accumulation.

Runs ``ddp_amp_script.py`` (2 gloo processes on the CPU, see its docstring for the cases).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_amp_script import ACCUMULATE, INJECT_STEP, PRECISIONS


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp_amp")
    script = Path(__file__).with_name("ddp_amp_script.py")
    result = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))


CASES = [f"{p}/acc{a}" for p in PRECISIONS for a in ACCUMULATE]


@pytest.mark.parametrize("case", CASES)
def test_ranks_hold_bitwise_equal_finite_weights_after_every_step(ranks, case):
    r0, r1 = ranks[0][case], ranks[1][case]
    assert len(r0["weights"]) == len(r1["weights"]) >= INJECT_STEP + 2
    for step, (w0, w1) in enumerate(zip(r0["weights"], r1["weights"], strict=True)):
        for name in w0:
            assert torch.equal(w0[name], w1[name]), (step, name)
            assert torch.isfinite(w0[name]).all(), (step, name)
    final = r0["weights"][-1]
    for name in ("backbone.0.weight", "backbone.2.weight", "head.weight"):
        assert not torch.equal(final[name], r0["initial"][name]), f"{name} never trained"


@pytest.mark.parametrize("case", CASES)
def test_parameters_no_rank_used_keep_no_gradient(ranks, case):
    """AdamW's weight decay would move ``unused`` if the all-reduce gave it a zero gradient."""
    r0 = ranks[0][case]
    for name in ("unused.weight", "unused.bias"):
        assert torch.equal(r0["weights"][-1][name], r0["initial"][name]), name


@pytest.mark.parametrize("accumulate", ACCUMULATE)
def test_fp16_overflow_on_one_rank_skips_the_step_on_both(ranks, accumulate):
    case = f"16-mixed/acc{accumulate}"
    r0, r1 = ranks[0][case], ranks[1][case]
    assert r0["scales"] == r1["scales"]
    before, after = r0["weights"][INJECT_STEP - 1], r0["weights"][INJECT_STEP]
    assert all(torch.equal(before[n], after[n]) for n in before), "the overflowing step was taken"
    assert r0["scales"][INJECT_STEP] == r0["scales"][INJECT_STEP - 1] / 2
