"""Tests for sgdnoise.linalg.gauss_newton against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import sgdnoise
from sgdnoise.data import one_hidden_layer_data
from sgdnoise.linalg import GaussNewtonOperator, gauss_newton
from sgdnoise.models import OneHiddenLayerNet, one_hidden_layer_loss

F64 = torch.float64


def _mlp(out: int, dtype: torch.dtype = F64, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), act(), nn.Linear(5, out)).to(dtype)


def _data(n: int, out: int, *, classes: bool, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=dtype)
    y = (
        torch.randint(out, (n,), generator=g)
        if classes
        else torch.randn(n, out, generator=g, dtype=dtype)
    )
    return x, y


def _reference(problem: sgdnoise.Problem, loss_hessian, indices=None) -> torch.Tensor:
    """``(1/n) Σ_i J_iᵀ Λ_i J_i`` from explicit per-sample Jacobians (torch.autograd.functional)."""
    theta = problem.theta()
    x, y = problem.inputs, problem.targets
    idx = range(x.shape[0]) if indices is None else indices
    G = torch.zeros(problem.dim, problem.dim, dtype=F64)
    for i in idx:

        def f(th, i=i):
            return functional_call(problem.model, problem.unflatten(th), (x[i : i + 1],))[0]

        J = torch.autograd.functional.jacobian(f, theta).reshape(-1, problem.dim).double()
        G += J.T @ loss_hessian(f(theta).detach().double(), y[i]) @ J
    return G / len(idx)


def _mse_hessian(f, _):
    return 2.0 / f.numel() * torch.eye(f.numel(), dtype=F64)  # F.mse_loss averages over outputs


def _ce_hessian(f, _):
    p = torch.softmax(f, 0)
    return torch.diag(p) - torch.outer(p, p)


CASES = {
    "mse": (nn.functional.mse_loss, _mse_hessian, False),
    "cross_entropy": (nn.functional.cross_entropy, _ce_hessian, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dense", [True, False])
def test_matches_explicit_jacobians(case, dense):
    loss, lam, classes = CASES[case]
    problem = sgdnoise.Problem(_mlp(3), loss, *_data(12, 3, classes=classes))
    G = GaussNewtonOperator(problem, dense=dense)
    assert G.uses_dense() is dense
    torch.testing.assert_close(G.to_dense(), _reference(problem, lam), rtol=1e-10, atol=1e-13)
    assert G.num_products == problem.dim


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_equals_matrix_free_and_indices_select_a_sub_average(case):
    loss, lam, classes = CASES[case]
    problem = sgdnoise.Problem(_mlp(3), loss, *_data(15, 3, classes=classes), chunk_size=4)
    V = torch.randn(problem.dim, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    idx = [0, 3, 3, 7, 14]
    for indices in (None, idx):
        fast = gauss_newton(problem, indices=indices, dense=True) @ V
        slow = gauss_newton(problem, indices=indices, dense=False) @ V
        torch.testing.assert_close(fast, slow, rtol=1e-11, atol=1e-13)
    ref = _reference(problem, lam, idx)
    torch.testing.assert_close(
        gauss_newton(problem, indices=idx) @ V, ref @ V, rtol=1e-10, atol=1e-13
    )
    # a boolean mask is the same selection as its indices
    mask = torch.zeros(15, dtype=torch.bool)
    mask[[1, 2, 9]] = True
    torch.testing.assert_close(
        gauss_newton(problem, indices=mask) @ V, gauss_newton(problem, indices=[1, 2, 9]) @ V
    )


def _one_hidden_layer(n: int = 60, width: int = 8):
    x, y = one_hidden_layer_data(n, generator=torch.Generator().manual_seed(123), dtype=F64)
    gen = torch.Generator().manual_seed(0)
    model = OneHiddenLayerNet(width, generator=gen, delta=0.05, dtype=F64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        one_hidden_layer_loss(model(x), y).backward()
        opt.step()
    return sgdnoise.Problem(model, one_hidden_layer_loss, x, y)


def test_equals_the_exact_hessian_for_piecewise_linear_outputs():
    """Outputs piecewise linear in θ (ReLU, clip, fixed last layer) + MSE: G = ∇²L a.e."""
    problem = _one_hidden_layer()
    x, y = problem.inputs, problem.targets

    def loss(t: torch.Tensor) -> torch.Tensor:
        return one_hidden_layer_loss(functional_call(problem.model, problem.unflatten(t), (x,)), y)

    H = torch.autograd.functional.hessian(loss, problem.theta())
    for dense in (True, False):
        G = gauss_newton(problem, dense=dense).to_dense()
        torch.testing.assert_close(G, H, rtol=1e-10, atol=1e-13)
    # A generic ReLU MLP whose θ is the first layer only (the second held fixed).
    model = _mlp(2, act=nn.ReLU)
    p = sgdnoise.Problem(model, nn.functional.mse_loss, *_data(10, 2, classes=False), params="0.*")
    Hp = sgdnoise.hessian(p).to_dense()
    torch.testing.assert_close(gauss_newton(p).to_dense(), Hp, rtol=1e-10, atol=1e-13)


def test_dense_route_is_the_closed_form_bit_for_bit():
    """``(2/n) J_φᵀ(J_φ V)`` over the unclipped rows, as the indicator computed it before."""
    problem = _one_hidden_layer()
    G = gauss_newton(problem)
    J, lam = G.jacobian()
    assert J.shape == (problem.num_samples, 1, problem.dim) and bool((lam == 2.0).all())
    Jl = J[:, 0][(J[:, 0] != 0).any(dim=1)]
    assert 0 < Jl.shape[0] < problem.num_samples  # some outputs clipped
    V = torch.randn(problem.dim, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.equal(G @ V, Jl.T @ (Jl @ V) * (2.0 / problem.num_samples))


def test_all_outputs_clipped_gives_zero():
    problem = _one_hidden_layer()
    with torch.no_grad():
        problem.model.bias.fill_(-10.0)  # every unit off: every output clipped, J = 0
    V = torch.ones(problem.dim, 2, dtype=F64)
    assert torch.equal(gauss_newton(problem) @ V, torch.zeros_like(V))


def test_float32_against_float64():
    x, y = _data(10, 3, classes=True)
    p64 = sgdnoise.Problem(_mlp(3), nn.functional.cross_entropy, x, y)
    p32 = sgdnoise.Problem(_mlp(3, torch.float32), nn.functional.cross_entropy, x.float(), y)
    ref = gauss_newton(p64).to_dense()
    for dense in (True, False):
        G = gauss_newton(p32, dense=dense)
        assert G.dtype == torch.float32
        torch.testing.assert_close(G.to_dense().double(), ref, rtol=1e-4, atol=1e-5)


def test_theta_snapshot_and_errors():
    problem = sgdnoise.Problem(_mlp(2), nn.functional.mse_loss, *_data(6, 2, classes=False))
    theta = problem.theta()
    G = gauss_newton(problem, theta + 0.1)
    problem.set_theta(theta + 0.1)
    torch.testing.assert_close(G.to_dense(), gauss_newton(problem).to_dense())
    with pytest.raises(ValueError, match="shape"):
        gauss_newton(problem, theta[:3])
    with pytest.raises(ValueError, match="float64"):
        gauss_newton(problem, theta.float())
    with pytest.raises(IndexError):
        gauss_newton(problem, indices=[99])

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, x):
            return (self.lin(x), x)

    bad = sgdnoise.Problem(Pair(), lambda o, t: nn.functional.mse_loss(o[0], t),
                           *_data(4, 2, classes=False))  # fmt: skip
    with pytest.raises(TypeError, match="one tensor"):
        gauss_newton(bad) @ torch.zeros(bad.dim, dtype=F64)


class _LSTMHead(nn.Module):
    """An LSTM (no vmap batching rule for aten::lstm) with a linear read-out of its last state."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(2, 3, batch_first=True)
        self.out = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("dense", [True, False])
def test_layers_without_a_batching_rule_take_the_per_sample_path(dense):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 4, 2, generator=g, dtype=F64), torch.randint(3, (6,), generator=g)
    problem = sgdnoise.Problem(_LSTMHead().double(), nn.functional.cross_entropy, x, y)
    G = GaussNewtonOperator(problem, dense=dense)
    torch.testing.assert_close(
        G.to_dense(), _reference(problem, _ce_hessian), rtol=1e-10, atol=1e-13
    )
