"""Domain adaptation pieces: gradient reversal, multi-kernel MMD, the DANN schedule."""

from __future__ import annotations

import math

import pytest
import torch

from tl_lightning.objectives.domain import dann_coefficient, gaussian_mmd, grad_reverse


@pytest.mark.parametrize("coeff", [0.0, 0.3, 1.0, 2.5])
def test_grad_reverse_is_identity_forward_and_flips_scaled_gradient_backward(coeff):
    x = torch.randn(4, 5, requires_grad=True)
    upstream = torch.randn(4, 5)
    y = grad_reverse(x, coeff)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream.neg() * coeff)


def test_grad_reverse_only_flips_the_path_through_it():
    x = torch.randn(3, requires_grad=True)
    (2 * x.sum() + 3 * grad_reverse(x, 0.5).sum()).backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0 - 1.5))


@pytest.mark.parametrize("coeff", [-0.1, float("nan"), float("inf")])
def test_grad_reverse_rejects_bad_coefficients(coeff):
    with pytest.raises(ValueError, match="gradient-reversal coefficient"):
        grad_reverse(torch.zeros(2), coeff)


def test_dann_schedule_values():
    assert dann_coefficient(0.0) == 0.0
    assert dann_coefficient(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann_coefficient(1.0) == pytest.approx(0.9999092, abs=1e-7)
    values = [dann_coefficient(p / 10) for p in range(11)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dann_coefficient(1.5)


def test_mmd_is_zero_for_identical_samples():
    x = torch.randn(7, 3)
    assert gaussian_mmd(x, x.clone()).item() == 0.0
    assert gaussian_mmd(x, x.clone(), bandwidths=[0.5, 3.0]).item() == 0.0


def test_mmd_matches_hand_computed_value_on_3x2():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    # k = exp(-d^2/b). Both within-sample kernel sums are 3 + 4 e^{-1/b} + 2 e^{-2/b}; the cross sum is
    # 2 + 5 e^{-1/b} + 2 e^{-2/b}; so MMD^2 = (2 (Kxx - Kxy)) / 9 = (2/9)(1 - e^{-1/b}) per kernel.
    assert gaussian_mmd(x, y, bandwidths=[1.0]).item() == pytest.approx(2 / 9 * (1 - math.exp(-1)), abs=1e-12)
    expected = 2 / 9 * (2 - math.exp(-1) - math.exp(-0.5))
    assert gaussian_mmd(x, y, bandwidths=[1.0, 2.0]).item() == pytest.approx(expected, abs=1e-12)


def test_mmd_matches_brute_force_with_data_driven_bandwidths():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64) + 1
    z = torch.cat([x, y])
    d2 = [[float(((a - b) ** 2).sum()) for b in z] for a in z]
    mean = sum(map(sum, d2)) / (len(z) ** 2 - len(z))
    widths = [s * mean for s in (0.25, 0.5, 1.0, 2.0, 4.0)]

    def k(i, j):
        return sum(math.exp(-d2[i][j] / w) for w in widths)

    n, m = len(x), len(y)
    xx = sum(k(i, j) for i in range(n) for j in range(n)) / n**2
    yy = sum(k(i, j) for i in range(n, n + m) for j in range(n, n + m)) / m**2
    xy = sum(k(i, j) for i in range(n) for j in range(n, n + m)) / (n * m)
    assert gaussian_mmd(x, y).item() == pytest.approx(xx + yy - 2 * xy, abs=1e-12)


def test_mmd_gradient_is_finite_and_pulls_samples_together():
    x = torch.randn(4, 2, requires_grad=True)
    y = x.detach().clone()
    y[0] += 1.0
    gaussian_mmd(x, y).backward()
    assert torch.isfinite(x.grad).all()
    before = gaussian_mmd(x, y).item()
    with torch.no_grad():
        after = gaussian_mmd(x - 0.01 * x.grad, y).item()
    assert after < before


def test_mmd_rejects_mismatched_shapes_and_bad_bandwidths():
    with pytest.raises(ValueError, match=r"\(n, d\) and \(m, d\)"):
        gaussian_mmd(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="bandwidths must be > 0"):
        gaussian_mmd(torch.zeros(3, 2), torch.ones(3, 2), bandwidths=[0.0])
