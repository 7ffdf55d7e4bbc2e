"""Hessian products within a solver keep the gradient's graph (HessianOperator.session) only where
it is sound — a double-backward route, all samples in one chunk, the same θ and samples, nothing
it saved changed in place — and give the same numbers as products without it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import sgdnoise


def _conv_problem(n: int = 12, **kw) -> tuple[sgdnoise.Problem, list[int]]:
    """A small float64 CNN (double backward route) with a counter of its forward passes."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()
    calls = [0]
    model[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    source = kw.pop("source", None)
    if source == "batches":  # a re-iterable of 3 batches: full passes go batch by batch
        data = [(x[i : i + 4], y[i : i + 4]) for i in range(0, n, 4)]
        return sgdnoise.Problem(model, F.cross_entropy, data, **kw), calls
    return sgdnoise.Problem(model, F.cross_entropy, x, y, **kw), calls


def _dense_hessian(problem: sgdnoise.Problem) -> torch.Tensor:
    return sgdnoise.hessian(problem).to_dense()


def test_a_session_keeps_the_graph_and_changes_no_product() -> None:
    problem, calls = _conv_problem()
    H = sgdnoise.hessian(problem)
    V = torch.randn(problem.dim, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    outside = torch.cat([H @ V[:, j : j + 1] for j in range(6)], dim=1)
    calls[0] = 0
    with H.session():
        inside = torch.cat([H @ V[:, j : j + 1] for j in range(6)], dim=1)
    assert calls[0] == 1  # one forward pass for six products (outside: one per product)
    assert torch.equal(inside, outside)
    torch.testing.assert_close(inside, _dense_hessian(problem) @ V, rtol=1e-10, atol=1e-12)
    assert H._graph is None  # dropped on exit


def test_a_kept_graph_follows_theta_and_samples() -> None:
    problem, calls = _conv_problem()
    H = sgdnoise.hessian(problem)
    v = torch.randn(problem.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with H.session():
        H @ v
        calls[0] = 0
        H.theta.mul_(1.01)  # θ changed in place (its version counter): the graph is rebuilt
        moved = H @ v
        assert calls[0] == 1
        other = sgdnoise.hessian(problem, indices=[0, 3, 5])
        sub = problem.hvp(v[:, None], H.theta, other.indices, _graph=H._graph)[:, 0]
        assert calls[0] == 2  # other samples: another graph
    problem.set_theta(H.theta)
    torch.testing.assert_close(moved, _dense_hessian(problem) @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        sub, sgdnoise.hessian(problem, indices=[0, 3, 5]).to_dense() @ v, rtol=1e-10, atol=1e-12
    )


def test_data_in_several_chunks_keeps_no_graph() -> None:
    # a small chunk size, or a data set given as several batches (full passes go batch by
    # batch whatever the plan): each chunk needs its own graph, so none is kept — and the
    # products equal the one-chunk tensor problem's (a kept first-chunk graph would not)
    ref, _ = _conv_problem()
    V = torch.randn(ref.dim, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want = _dense_hessian(ref) @ V
    for kw in ({"chunk_size": 5}, {"source": "batches"}):
        problem, calls = _conv_problem(**kw)
        H = sgdnoise.hessian(problem)
        assert not problem.keeps_hessian_graph()
        H @ V[:, :1]
        calls[0] = 0
        with H.session():
            got = torch.cat([H @ V[:, j : j + 1] for j in range(4)], dim=1)
        assert calls[0] == 4 * 3, kw  # every product: a forward pass per chunk
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        pairs = sgdnoise.top_eigenpairs(H, 3, generator=0)
        ref_pairs = sgdnoise.top_eigenpairs(sgdnoise.hessian(ref), 3, generator=0)
        torch.testing.assert_close(pairs.eigenvalues, ref_pairs.eigenvalues, rtol=1e-8, atol=0)


def test_lanczos_builds_the_graph_once_and_finds_repeated_eigenvalues() -> None:
    problem, calls = _conv_problem()
    H = sgdnoise.hessian(problem)
    assert problem.keeps_hessian_graph()
    calls[0] = 0
    pairs = sgdnoise.top_eigenpairs(H, 3, generator=0)
    assert pairs.converged and calls[0] == 1  # one forward pass for every block of the solve
    exact = torch.linalg.eigvalsh(_dense_hessian(problem)).flip(0)[:3]
    torch.testing.assert_close(pairs.eigenvalues, exact, rtol=1e-6, atol=1e-9)
    # two identical, independent branches: every eigenvalue twice (H = blockdiag(A, A)); the
    # default block finds both copies (single columns, block_size=1, cannot: 2.33 and 1.31 came
    # back for 2.33 twice)
    torch.manual_seed(0)

    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.fc = nn.Conv1d(1, 3, 3, padding=1), nn.Linear(24, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.c(x)).flatten(1))

    class Twins(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = Branch(), Branch()
            self.b.load_state_dict(self.a.state_dict())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.a(x), self.b(x)], dim=1)

    model = Twins().double()
    x = torch.randn(32, 1, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randn(32, 1, dtype=torch.float64).repeat(1, 2)
    twins = sgdnoise.Problem(model, F.mse_loss, x, y)
    lam = torch.linalg.eigvalsh(sgdnoise.hessian(twins).to_dense()).flip(0)
    assert float(lam[0] - lam[1]) < 1e-9 * float(lam[0])  # the top eigenvalue is double
    top = sgdnoise.top_eigenpairs(sgdnoise.hessian(twins), 2, tol=1e-6, generator=0)
    torch.testing.assert_close(top.eigenvalues, lam[:2], rtol=1e-6, atol=0)


def test_a_kept_graph_is_rebuilt_after_any_in_place_change() -> None:
    # the model's parameters outside θ (restrict), its buffers (BatchNorm statistics), the data
    # and the indices are saved in the graph too: changed in place, the products must follow
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()
    model.eval()
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    idx = torch.tensor([0, 2, 4, 6, 8])
    problem = sgdnoise.Problem(model, F.cross_entropy, x, y).restrict(["0.weight", "4.bias"])
    H = sgdnoise.hessian(problem, indices=idx)
    v = torch.randn(problem.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    changes = [
        lambda: model[4].weight.mul_(1.3),  # a parameter outside θ (frozen by restrict)
        lambda: model[1].running_var.mul_(2.0),  # a buffer
        lambda: x.mul_(0.5),  # the data
        lambda: idx.add_(1),  # the indices
    ]
    with H.session():
        H @ v
        for change in changes:
            with torch.no_grad():
                change()
            got = H @ v
            want = sgdnoise.hessian(problem, indices=idx) @ v  # built afresh, outside the session
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_trace_estimators_share_the_kept_graph() -> None:
    problem, calls = _conv_problem()
    H = sgdnoise.hessian(problem)
    H @ torch.zeros(problem.dim, dtype=torch.float64)  # the one-time route check
    calls[0] = 0
    est = sgdnoise.trace_estimate(H, 30, generator=0)
    assert calls[0] == 1
    exact = float(_dense_hessian(problem).diagonal().sum())
    assert abs(est.value - exact) < 5 * est.stderr + 1e-9


def test_the_activation_footprint_per_sample_leaves_out_the_parameters() -> None:
    # a wide linear layer (many parameters, small activations): θ's own storage is a fixed cost;
    # counted per sample it made every pass of a 9.2M-parameter VGG-11 twice as many chunks
    model = nn.Sequential(nn.Linear(400, 400), nn.Tanh(), nn.Linear(400, 3)).double()
    x, y = torch.randn(8, 400, dtype=torch.float64), torch.randint(0, 3, (8,))
    problem = sgdnoise.Problem(model, F.cross_entropy, x, y)
    fixed, per = problem._footprint()
    d = problem.dim * 8
    assert fixed >= d  # θ counted once
    assert per < d / 20  # a sample's activations and inputs: a few 400-wide rows, not D / 4
