"""Lanczos solvers in lock-step (``run_lockstep``), Hessian products batched across members
(``Problem.hvp_members``), and the batched engine's Hessian refreshes that use both."""

from __future__ import annotations

import threading

import pytest
import torch

import sgdnoise
from conftest import make_problem, on_device
from sgdnoise.engine import BatchedEngine, Member
from sgdnoise.linalg.lockstep import run_lockstep
from sgdnoise.linalg.operators import DenseOperator


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A @ A.T / n + torch.diag(torch.linspace(0, 3, n, dtype=torch.float64))


def test_lockstep_solvers_equal_solvers_alone_and_share_rounds():
    mats = [_spd(40, s) for s in range(4)]
    ks = [5, 5, 1, 3]
    rounds: list[list[int]] = []
    threads_before = threading.active_count()

    def products(batch):
        rounds.append([j for j, _ in batch])
        return [mats[j] @ V for j, V in batch]

    solvers = [lambda op, k=k: sgdnoise.top_eigenpairs(op, k) for k in ks]
    got = run_lockstep(solvers, products, dim=40, dtype=torch.float64, device="cpu")
    for A, k, pairs in zip(mats, ks, got, strict=True):
        alone = sgdnoise.top_eigenpairs(DenseOperator(A), k)
        assert torch.equal(pairs.eigenvalues, alone.eigenvalues)
        assert torch.equal(pairs.eigenvectors, alone.eigenvectors)
        assert pairs.num_matvecs == alone.num_matvecs
    # products of several solvers in one round (lock-step), never one thread left behind
    assert max(len(r) for r in rounds) == 4
    assert len(rounds) < sum(len(r) for r in rounds)
    assert threading.active_count() == threads_before  # every solver thread joined


def test_lockstep_errors_reach_the_caller_without_deadlock():
    A = _spd(20, 0)

    def bad(op):
        op @ torch.ones(20, 1, dtype=torch.float64)
        raise ValueError("solver 1 failed")

    solvers = [lambda op: sgdnoise.top_eigenpairs(op, 2), bad, lambda op: 7]
    with pytest.raises(ValueError, match="solver 1 failed"):
        run_lockstep(solvers, lambda b: [A @ V for _, V in b], dim=20, dtype=torch.float64,
                     device="cpu")  # fmt: skip

    def broken(batch):
        raise RuntimeError("products failed")

    with pytest.raises(RuntimeError, match="products failed"):
        run_lockstep([lambda op: op @ torch.ones(20, 1, dtype=torch.float64)] * 3, broken,
                     dim=20, dtype=torch.float64, device="cpu")  # fmt: skip


@pytest.mark.parametrize("route", ["forward-over-reverse", "double backward, column by column"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_hvp_members_equal_hvp_at_each_theta(kind, route, device):
    problem = on_device(make_problem(kind, n=24, chunk_size=10), device)
    problem.hvp(torch.zeros(problem.dim, 1, dtype=problem.dtype, device=problem.device))
    problem._hvp_mode = route  # both routes of the batched pass, on either model
    g = torch.Generator().manual_seed(3)
    theta0 = problem.theta()
    thetas = theta0 + 0.1 * torch.randn(3, problem.dim, generator=g, dtype=torch.float64).to(theta0)
    V = torch.randn(3, problem.dim, 4, generator=g, dtype=torch.float64).to(theta0)
    got = problem.hvp_members(thetas, V)
    for r in range(3):
        ref = problem.hvp(V[r], thetas[r])
        assert float((got[r] - ref).norm() / ref.norm()) < 1e-12
    assert problem.routes["hvp_members"] == f"{route}, batched over members"
    with pytest.raises(ValueError, match="thetas"):
        problem.hvp_members(thetas, V[0])


def test_engine_runs_hessian_refreshes_in_lockstep(monkeypatch):
    """Two seeds × (hessian, hessian_top1): the refreshes after the first batch their products
    (fewer product passes than columns), and every member equals the engine without lock-step
    (itself equal to each dynamics alone, tests/test_engine.py) to 1e-10 in float64."""
    problem = make_problem("cnn", n=24)
    theta0 = problem.theta()
    eigen = {"max_matvecs": 12, "on_nonconvergence": "ignore"}
    members = [
        Member(name, 0.05, seed=seed, refresh_every=3, options=opts)
        for seed in (0, 1)
        for name, opts in (("gld_hessian", {"k": 3, **eigen}), ("gld_hessian_top1", eigen))
    ]
    calls: list[int] = []
    original = sgdnoise.Problem.hvp_members

    def counted(self, thetas, V):
        calls.append(thetas.shape[0])
        return original(self, thetas, V)

    monkeypatch.setattr(sgdnoise.Problem, "hvp_members", counted)
    engine = BatchedEngine(problem, members, theta0)
    for _ in range(10):
        engine.step()
    assert calls and max(calls) >= 2  # products of several members in one pass
    reference = BatchedEngine(problem, members, theta0, lockstep_lanczos=False)
    for _ in range(10):
        reference.step()
    for j in range(len(members)):
        rel = (engine.theta[j] - reference.theta[j]).norm() / reference.theta[j].norm()
        assert float(rel) < 1e-10, (members[j].dynamics, float(rel))


@pytest.fixture
def ctrl_c():
    """Python's Ctrl-C handler for one test: a process started in the background by a
    non-interactive shell (``nohup … &``) inherits SIGINT ignored, and then ``interrupt_main``
    does nothing."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_lockstep_interrupted_leaves_no_thread_and_checks_shapes(ctrl_c):
    import _thread
    import time

    A = torch.eye(30, dtype=torch.float64)
    before = threading.active_count()

    def slow(op):
        time.sleep(1.0)
        return op @ torch.ones(30, 1, dtype=torch.float64)

    timer = threading.Timer(0.2, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        run_lockstep([slow, slow], lambda b: [A @ V for _, V in b], dim=30,
                     dtype=torch.float64, device="cpu")  # fmt: skip
    timer.join()
    assert threading.active_count() == before  # the solvers were released and joined
    with pytest.raises(RuntimeError, match="request of shape"):
        run_lockstep([lambda op: op @ torch.ones(30, 2, dtype=torch.float64)],
                     lambda b: [torch.zeros(3, 3)], dim=30, dtype=torch.float64,
                     device="cpu")  # fmt: skip
