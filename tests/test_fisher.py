"""fisher_diagonal against a brute-force batch-size-1 loop, and its DDP sharding."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from tl_lightning.fisher import fisher_diagonal, sample_labels

NUM_CLASSES = 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 8),
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Linear(8, NUM_CLASSES),
    )
    with torch.no_grad():  # non-trivial running statistics, so eval mode visibly differs from train mode
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    model.train()
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    sizes = (7, 5, 6)
    return [
        (torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))
        for n in sizes
    ]


def _reference(model: nn.Module, batches, mode: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """One sample at a time, plain autograd, eval mode."""
    model.eval()
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    count = 0
    for index, (x, y) in enumerate(batches):
        if mode == "sampled":
            with torch.no_grad():
                y = sample_labels(model(x), seed + index)
        for j in range(len(x)):
            logits = model(x[j : j + 1])
            if mode == "exact":
                probs = logits.softmax(-1)[0].detach()
                labels, weights = range(NUM_CLASSES), probs
            else:
                labels, weights = [int(y[j])], torch.ones(1)
            for label, weight in zip(labels, weights, strict=True):
                grads = torch.autograd.grad(
                    F.cross_entropy(logits, torch.tensor([label])),
                    list(model.parameters()),
                    retain_graph=True,
                )
                for (name, _), g in zip(model.named_parameters(), grads, strict=True):
                    total[name] += weight * g.square()
            count += 1
    return {name: t / count for name, t in total.items()}


def _assert_close(actual: dict, expected: dict, rtol: float = 1e-4) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        err = (actual[name] - expected[name]).norm() / expected[name].norm()
        assert err <= rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("mode", ["empirical", "sampled", "exact"])
def test_matches_per_sample_loop(mode):
    model, batches = _model(), _batches()
    fisher = fisher_diagonal(model, batches, mode=mode, chunk_size=4, seed=3)
    _assert_close(fisher, _reference(_model(), batches, mode, seed=3))


def test_mean_gradient_squared_is_not_the_fisher():
    model, batches = _model(), _batches()
    fisher = fisher_diagonal(model, batches)
    model.eval()
    buggy = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for x, y in batches:  # Avalanche-style: square the gradient of the mini-batch mean loss
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), grads, strict=True):
            buggy[name] += g.square() / len(batches)
    with pytest.raises(AssertionError):
        _assert_close(buggy, fisher, rtol=0.1)


def test_restores_training_modes_and_leaves_state_untouched():
    model = _model()
    model[3].eval()  # a mixed state must come back exactly
    before_modes = [m.training for m in model.modules()]
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    fisher_diagonal(model, _batches(), mode="sampled")
    assert [m.training for m in model.modules()] == before_modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_state[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_params_filter_method_and_max_samples():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.source = nn.Linear(4, 3)
            self.target = nn.Linear(4, 2)

        def source_logits(self, x):
            return self.source(self.body(x))

    model = TwoHeads()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    fisher = fisher_diagonal(model, [(x, y)], method="source_logits", params=["body.weight"], max_samples=6)
    body = nn.Sequential(model.body, model.source)
    expected = fisher_diagonal(body, [(x[:6], y[:6])], params=["0.weight"])
    assert list(fisher) == ["body.weight"]
    torch.testing.assert_close(fisher["body.weight"], expected["0.weight"])


def test_rejects_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="one of"):
        fisher_diagonal(model, _batches(), mode="diagonal")
    with pytest.raises(ValueError, match="no samples"):
        fisher_diagonal(model, [])
    with pytest.raises(TypeError, match="label"):
        fisher_diagonal(model, [torch.randn(2, 1, 6, 6)], mode="empirical")
    with pytest.raises(ValueError, match="missing"):
        fisher_diagonal(model, _batches(), params=["nope"])


def test_two_process_gloo_equals_single_process(tmp_path):
    script = Path(__file__).with_name("ddp_fisher_script.py")
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=120)
    single, sharded = load_file(tmp_path / "single.safetensors"), load_file(tmp_path / "ddp.safetensors")
    assert single.keys() == sharded.keys() and single
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=0)
