"""``alignment`` refuses k above the rank of Σ_b instead of a seed-dependent overlap (case 18)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgdnoise
from reference import dense_hessian, dense_sigma

F64 = torch.float64


def _problem(x: torch.Tensor, y: torch.Tensor) -> sgdnoise.Problem:
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))  # D = 57
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.8)
    return sgdnoise.Problem(model.double(), F.cross_entropy, x, y)


def _data(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def test_k_above_n_minus_one_is_refused() -> None:
    problem = _problem(*_data(4))
    with pytest.raises(ValueError, match=r"k = 8 exceeds the rank of Σ \(at most N − 1 = 3") as e:
        sgdnoise.alignment(problem, 1, 8, generator=0)
    assert "pass k ≤ 3" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"k = 4 exceeds the rank of Σ \(at most N − 1 = 3"):
        sgdnoise.alignment(problem, 1, 4, generator=0)


def test_k_equal_to_the_rank_is_seed_independent_and_matches_float64() -> None:
    problem = _problem(*_data(4))
    k, b = 3, 2
    H, S = dense_hessian(problem), dense_sigma(problem, b)
    U_H = torch.linalg.eigh(H)[1].flip(1)[:, :k]
    U_S = torch.linalg.eigh(S)[1].flip(1)[:, :k]
    expected = float((U_H.T @ U_S).pow(2).sum()) / k
    overlaps = [sgdnoise.alignment(problem, b, k, generator=s).overlap for s in range(3)]
    # equal up to the Lanczos tolerance (1e-6 in float64), not seed-dependent at the 1e-2 level
    assert max(overlaps) - min(overlaps) < 1e-6
    assert overlaps[0] == pytest.approx(expected, abs=1e-6)


def test_duplicated_samples_give_the_numerical_rank() -> None:
    x, y = _data(2)
    xs, ys = x.repeat(3, 1), y.repeat(3)  # N = 6 samples, 2 distinct: rank Σ = 1
    problem = _problem(xs, ys)
    assert torch.linalg.matrix_rank(dense_sigma(problem)) == 1
    with pytest.raises(ValueError, match=r"numerical rank 1") as e:
        sgdnoise.alignment(problem, 1, 2, generator=0)
    assert "k = 2 exceeds the numerical rank of Σ" in str(e.value) and "pass k ≤ 1" in str(e.value)
    # k = 1 is defined: the top eigenvector of Σ is unique, so the overlap is seed-independent.
    H, S = dense_hessian(problem), dense_sigma(problem)
    expected = float(torch.linalg.eigh(H)[1][:, -1] @ torch.linalg.eigh(S)[1][:, -1]) ** 2
    overlaps = [sgdnoise.alignment(problem, 1, 1, generator=s).overlap for s in range(3)]
    # equal up to the Lanczos tolerance (1e-6 in float64), not seed-dependent at the 1e-2 level
    assert max(overlaps) - min(overlaps) < 1e-6
    assert overlaps[0] == pytest.approx(expected, abs=1e-6)


def test_three_distinct_among_eight_samples_allow_k_two_not_three() -> None:
    x, y = _data(3, seed=5)
    idx = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    problem = _problem(x[idx], y[idx])
    sgdnoise.alignment(problem, 2, 2, generator=0)
    with pytest.raises(ValueError, match=r"numerical rank 2"):
        sgdnoise.alignment(problem, 2, 3, generator=0)


def test_zero_noise_gives_nan_not_a_seed_dependent_overlap() -> None:
    problem = _problem(*_data(5))
    res = sgdnoise.alignment(problem, 5, 2, replacement=False, generator=0)  # b = N: Σ_b = 0
    assert math.isnan(res.overlap) and math.isnan(res.a)
