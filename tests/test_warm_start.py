"""Warm-started Lanczos at a moved θ: never more products than a cold start, same eigenpairs as
the dense float64 ``eigh`` reference; non-convergence messages that name the real cause."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sgdnoise
from sgdnoise.linalg import DenseOperator, LinearOperator
from sgdnoise.linalg.hessian import HessianOperator


def _trained_mlp(width: int, dtype: torch.dtype = torch.float64) -> sgdnoise.Problem:
    """A 3-layer tanh MLP (D = 435 for width 16) after 50 GD steps, so that H is structured."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model = model.to(dtype)
    x = torch.randn(64, 6, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (64,), generator=gen)
    problem = sgdnoise.Problem(model, nn.functional.cross_entropy, x, y)
    _gd(problem, 50)
    return problem


def _gd(problem: sgdnoise.Problem, steps: int, lr: float = 0.5) -> None:
    for _ in range(steps):
        problem.set_theta(problem.theta() - lr * problem.gradient())


@pytest.mark.parametrize(
    ("width", "k", "steps"),
    [(16, 20, 1), (16, 20, 10), (24, 8, 10)],
    ids=["k20-1step", "k20-10steps", "k8-10steps"],
)
def test_warm_start_at_moved_theta_costs_no_more_than_cold(width, k, steps) -> None:
    problem = _trained_mlp(width)
    previous = sgdnoise.top_eigenpairs(HessianOperator(problem), k)
    _gd(problem, steps)  # θ' = θ − η ∇L, as between two refreshes of GLD `hessian`
    H = HessianOperator(problem)
    cold = sgdnoise.top_eigenpairs(H, k, generator=1)
    warm = sgdnoise.top_eigenpairs(
        HessianOperator(problem), k, generator=1, v0=previous.eigenvectors
    )
    assert cold.converged and warm.converged
    assert warm.num_matvecs <= cold.num_matvecs, (warm.num_matvecs, cold.num_matvecs)
    ref = torch.linalg.eigvalsh(H.to_dense()).flip(0)[:k]
    scale = float(ref.abs().max())
    torch.testing.assert_close(warm.eigenvalues, ref, rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(cold.eigenvalues, ref, rtol=0, atol=1e-9 * scale)
    # the eigenvectors span the same eigenspace as the reference's (up to sign)
    _, vecs = torch.linalg.eigh(H.to_dense())
    overlap = (vecs.flip(1)[:, : k - 1].T @ warm.eigenvectors[:, : k - 1]).abs().diagonal()
    assert bool((overlap > 1 - 1e-6).all()), overlap


def test_warm_start_float32_model() -> None:
    problem = _trained_mlp(16, torch.float32)
    previous = sgdnoise.top_eigenpairs(HessianOperator(problem), 20)
    _gd(problem, 10)
    H = HessianOperator(problem)
    cold = sgdnoise.top_eigenpairs(H, 20)
    warm = sgdnoise.top_eigenpairs(HessianOperator(problem), 20, v0=previous.eigenvectors)
    assert warm.converged and warm.num_matvecs <= cold.num_matvecs
    ref = torch.linalg.eigvalsh(H.to_dense().double()).flip(0)[:20]
    torch.testing.assert_close(warm.eigenvalues.double(), ref, rtol=0, atol=2e-3 * float(ref[0]))


def test_hessian_noise_refresh_at_moved_theta_is_cheaper_than_a_cold_build() -> None:
    problem = _trained_mlp(16)
    gld = sgdnoise.noise_model("hessian", problem, batch_size=8, k=20)
    _ = gld.covariance
    _gd(problem, 10)
    gld.refresh()
    warm = gld.num_matvecs
    cold = sgdnoise.noise_model("hessian", problem, batch_size=8, k=20, warm_start=False)
    _ = cold.covariance
    assert warm <= cold.num_matvecs
    torch.testing.assert_close(gld.hessian_eigenvalues, cold.hessian_eigenvalues)


def _spd(D: int, vals: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    return (Q * vals) @ Q.T, Q


def test_warm_start_finds_an_eigenvalue_outside_the_warm_subspace() -> None:
    # The warm vectors span an exactly invariant subspace of the new matrix, and a new largest
    # eigenvalue appears in a direction orthogonal to them: the warm block alone would return the
    # old top-k with zero residuals. The random part of the warm block must find the new one.
    D, k = 300, 12
    vals = torch.cat([torch.linspace(10, 6, 20), torch.linspace(1, 0, D - 20)]).double()
    A, Q = _spd(D, vals, 0)
    w = Q[:, 100]  # an eigenvector with eigenvalue < 1, orthogonal to the top 20
    A2 = A + 20.0 * torch.outer(w, w)
    warm = sgdnoise.top_eigenpairs(DenseOperator(A2), k, v0=Q[:, :k].clone())
    ref = torch.linalg.eigvalsh(A2).flip(0)[:k]
    torch.testing.assert_close(warm.eigenvalues, ref, rtol=0, atol=1e-5)


def test_nonconvergence_names_an_unreachable_tolerance() -> None:
    vals = torch.linspace(2, 0, 200).double()
    A = DenseOperator(_spd(200, vals, 1)[0].float())
    with pytest.raises(sgdnoise.ConvergenceError, match="below what torch.float32 products can"):
        sgdnoise.top_eigenpairs(A, 3, tol=1e-9, max_matvecs=200)


def test_nonconvergence_names_a_short_budget_with_the_products_needed() -> None:
    A = DenseOperator(_spd(400, torch.linspace(1, 0, 400).double(), 2)[0])  # no gap
    with pytest.raises(sgdnoise.ConvergenceError, match=r"still decreasing.*raise max_matvecs to"):
        sgdnoise.top_eigenpairs(A, 3, tol=1e-8, max_matvecs=200)


class _NoisyOperator(LinearOperator):
    """A matrix whose products carry fresh noise (like dropout left on inside a loss)."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A = A
        self.gen = torch.Generator().manual_seed(0)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(V.shape, generator=self.gen, dtype=V.dtype)
        return self.A @ V + 1e-4 * noise


def test_nonconvergence_names_stagnation_and_non_determinism() -> None:
    vals = torch.cat([torch.tensor([3.0, 2.0]), torch.linspace(1, 0, 198)]).double()
    op = _NoisyOperator(_spd(200, vals, 3)[0])
    with pytest.raises(sgdnoise.ConvergenceError, match="stagnated.*not deterministic"):
        sgdnoise.top_eigenpairs(op, 2, tol=1e-9, max_matvecs=400)
