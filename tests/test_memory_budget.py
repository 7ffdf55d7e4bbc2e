"""The memory budget: every pass is split to fit it, with the same numbers as one piece."""

from __future__ import annotations

import pytest
import torch

import sgdnoise
from conftest import make_problem
from sgdnoise.problem import parse_memory


def _budgeted(kind: str, budget: int | str) -> sgdnoise.Problem:
    ref = make_problem(kind, n=24)
    return sgdnoise.Problem(ref.model, ref.loss_fn, ref.inputs, ref.targets, memory_budget=budget)


def test_a_small_budget_splits_every_pass_and_changes_no_number(kind: str) -> None:
    whole = make_problem(kind, n=24)
    fixed, per = whole._footprint()
    assert per > 0
    d = whole.dim * 8
    # room for a few samples of a gradient pass, and for 2 columns of 3 samples in H products
    small = _budgeted(kind, int(whole._cost("hvp", 2)[0] + 3 * whole._cost("hvp", 2)[1]))
    assert 1 <= small.plan_rows("hvp", 2) < 24
    assert small.plan_columns(16)[0] < 16
    assert small.plan_rows("gradient") < 24 or fixed + 24 * per + 3 * d <= small.memory_budget
    close = dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(small.loss(), whole.loss(), **close)
    torch.testing.assert_close(small.gradient(), whole.gradient(), **close)
    torch.testing.assert_close(small.per_sample_gradients(), whole.per_sample_gradients(), **close)
    V = torch.randn(whole.dim, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(small.hvp(V), whole.hvp(V), **close)
    S_small = sgdnoise.gradient_noise_covariance(small, 2, materialize=False)
    S_whole = sgdnoise.gradient_noise_covariance(whole, 2, materialize=False)
    torch.testing.assert_close(S_small @ V, S_whole @ V, **close)
    thetas = whole.theta()[None] + 0.01 * V.T
    torch.testing.assert_close(small.batched_loss(thetas), whole.batched_loss(thetas), **close)


def test_a_pass_that_cannot_fit_one_sample_says_what_it_needs() -> None:
    tiny = _budgeted("cnn", 64)
    with pytest.raises(MemoryError, match=r"needs about .* for one sample.*memory budget of"):
        tiny.gradient()
    with pytest.raises(MemoryError, match="Raise memory_budget"):
        tiny.hvp(torch.zeros(tiny.dim, 3, dtype=tiny.dtype))


def test_the_default_budget_is_half_the_free_memory() -> None:
    from sgdnoise.problem import FREE_MEMORY_FRACTION, free_memory

    p = make_problem("mlp")
    expected = free_memory(p.device) * FREE_MEMORY_FRACTION
    assert 0.5 * expected <= p.memory_budget <= 2 * expected


@pytest.mark.parametrize(
    "text,value",
    [("8G", 8 * 2**30), ("512MB", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)), (4096, 4096)],
)
def test_budget_sizes(text: object, value: int) -> None:
    assert parse_memory(text) == value  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["lots", "-1G", 0, True])
def test_bad_budgets_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="memory_budget"):
        parse_memory(bad)  # type: ignore[arg-type]


def test_trace_estimators_and_quadratic_forms_in_column_blocks(monkeypatch) -> None:
    """Hutchinson, Hutch++ and the quadratic forms of the sampled indicator apply the operator to
    a few columns at a time for large D (``BLOCK_BYTES``); blocks of one column give the same
    numbers as one block (same probes, same products), and Hutch++ stays unbiased-exact on a
    dense float64 reference whose sketch spans the space."""
    from sgdnoise.linalg import trace as _trace

    problem = make_problem("mlp", n=24)
    H = sgdnoise.hessian(problem)
    S = sgdnoise.gradient_noise_covariance(problem, 2)
    idx = torch.arange(0, 24, 3)
    whole = {m: sgdnoise.trace_estimate(H, 12, method=m, seed=3) for m in ("hutchinson", "hutch++")}
    forms = _trace.quadratic_forms(H, S, idx, block_size=8)
    monkeypatch.setattr(_trace, "BLOCK_BYTES", 1)  # one column per block
    for m, ref in whole.items():
        got = sgdnoise.trace_estimate(H, 12, method=m, seed=3)
        assert got.num_matvecs == ref.num_matvecs
        assert got.value == pytest.approx(ref.value, rel=1e-12)
        assert got.stderr == pytest.approx(ref.stderr, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(_trace.quadratic_forms(H, S, idx, block_size=8), forms)
    dense = H.to_dense()
    D = dense.shape[0]
    spanned = sgdnoise.trace_estimate(H, 3 * D, method="hutch++", seed=0)
    assert spanned.value == pytest.approx(float(dense.trace()), rel=1e-10)


def test_an_estimators_own_blocks_count_against_the_budget(monkeypatch) -> None:
    """Hutch++'s sketch and a Lanczos basis (``[D, m]`` blocks) are held while the operator's
    passes run, and those passes plan for the budget less the held bytes (never less than a
    quarter of it): the estimator's peak stays near the budget (a ResNet-18's alignment reached
    11 GB with a 6 GB budget when only the passes counted)."""
    problem = _budgeted("mlp", "1G")
    budget = problem.memory_budget
    assert problem.pass_budget() == budget
    with problem.holding(budget // 3):
        assert problem.pass_budget() == budget - budget // 3
        with problem.holding(budget // 3):  # nested holds add up
            assert problem.pass_budget() == budget - 2 * (budget // 3)
            with problem.holding(budget):
                assert problem.pass_budget() == budget // 4  # a pass must still run
    assert problem.pass_budget() == budget
    with pytest.raises(KeyError), problem.holding(budget // 2):
        raise KeyError("released when the estimator fails")
    assert problem.pass_budget() == budget

    seen: list[int] = []
    plan = sgdnoise.Problem.plan_columns

    def spy(self: sgdnoise.Problem, wanted: int, kind: str = "hvp") -> tuple[int, int]:
        seen.append(self.pass_budget())
        return plan(self, wanted, kind)

    monkeypatch.setattr(sgdnoise.Problem, "plan_columns", spy)
    D, H = problem.dim, sgdnoise.hessian(problem)
    got = sgdnoise.trace_estimate(H, 12, method="hutch++", seed=0)  # sketch of s = 4 columns
    assert seen and set(seen) == {budget - (4 + 3 * 4) * D * 8}  # and three [D, 4] blocks
    seen.clear()
    pairs = sgdnoise.top_eigenpairs(H, 2, generator=0)  # basis of m = min(D, 22) columns
    # Q and AQ, the Ritz vectors of k + b = 4 pairs, the new block's 4 [D, b = 2] temporaries
    assert seen and set(seen) == {budget - (2 * min(D, 22) + 4 + 4 * 2) * D * 8}
    seen.clear()
    S = sgdnoise.gradient_noise_covariance(problem, 2, materialize=False)
    with sgdnoise.linalg.SumOperator([H, S]).holding(1000):  # one problem: held once
        assert problem.pass_budget() == budget - 1000

    # the same numbers as with the whole budget for the passes
    monkeypatch.setattr(sgdnoise.Problem, "plan_columns", plan)
    monkeypatch.setattr(sgdnoise.Problem, "pass_budget", lambda self: self.memory_budget)
    again = sgdnoise.trace_estimate(H, 12, method="hutch++", seed=0)
    assert again.value == pytest.approx(got.value, rel=1e-12)
    torch.testing.assert_close(sgdnoise.top_eigenpairs(H, 2, generator=0).eigenvalues,
                               pairs.eigenvalues, rtol=1e-12, atol=0)  # fmt: skip


def test_a_pass_squeezed_by_held_blocks_says_so() -> None:
    ref = make_problem("cnn", n=8)
    fixed, per = ref._cost("double_backward", 1)
    problem = _budgeted("cnn", int(1.5 * (fixed + per)))
    with (
        problem.holding(problem.memory_budget),
        pytest.raises(MemoryError, match="held by the estimator's own blocks"),
    ):
        problem.hvp(torch.zeros(problem.dim, 1, dtype=problem.dtype))
