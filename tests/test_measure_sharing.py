"""A sampled escape indicator costs what its sample costs; measurements at one θ share their
products through a MeasurementContext, equal the uncached ones, and never go stale."""

from __future__ import annotations

import pytest
import torch

import sgdnoise
from conftest import make_problem
from reference import dense_hessian
from sgdnoise.measures import MeasurementContext, at_theta


@pytest.fixture
def problem() -> sgdnoise.Problem:
    return make_problem("mlp", n=24, seed=3)  # D = 51, float64


def test_sampled_indicator_estimates_tr_h_with_a_budget_like_its_sample(problem) -> None:
    m, D = 8, problem.dim
    ctx = MeasurementContext(problem, 4)
    ind = ctx.escape_indicator(num_samples=m, generator=0)
    # m quadratic forms + a Hutch++ trace from max(m, 6) products; never the D of an exact trace
    assert ctx.hessian.num_products == m + max(m, 6) < m + D
    assert not ind.tr_H_exact and ind.tr_H_stderr > 0 and not ind.exact
    tr_ref = float(dense_hessian(problem).diagonal().sum())
    assert abs(ind.tr_H - tr_ref) < 5 * ind.tr_H_stderr + 1e-12 * abs(tr_ref)


def test_sampled_indicator_can_ask_for_the_exact_trace(problem) -> None:
    tr_ref = float(dense_hessian(problem).diagonal().sum())
    ind = sgdnoise.escape_indicator(problem, 4, num_samples=8, generator=0, exact_trace=True)
    assert ind.tr_H_exact and ind.tr_H_stderr == 0.0
    assert ind.tr_H == pytest.approx(tr_ref, rel=1e-10)
    # a Hutch++ budget of at least D gives the exact trace, which then costs no more
    big = sgdnoise.escape_indicator(problem, 4, num_samples=8, generator=0, trace_matvecs=60)
    assert big.tr_H_exact and big.tr_H == pytest.approx(tr_ref, rel=1e-10)
    hutch = sgdnoise.escape_indicator(
        problem, 4, num_samples=8, generator=0, trace_matvecs=60, exact_trace=False
    )
    assert not hutch.tr_H_exact


def test_exact_trace_above_the_dense_limit_is_computed_in_blocks(problem) -> None:
    H = sgdnoise.hessian(problem)
    tr_ref = float(dense_hessian(problem).diagonal().sum())
    value, se, exact = sgdnoise.measures.hessian_trace(H, exact_max_dim=10, exact=True)
    assert exact and se == 0.0 and value == pytest.approx(tr_ref, rel=1e-10)
    assert H.num_products == problem.dim


def test_alignment_after_indicator_reuses_tr_h_and_equals_uncached(problem) -> None:
    b, k = 4, 3
    plain_ind = sgdnoise.escape_indicator(problem, b)
    plain_al = sgdnoise.alignment(problem, b, k)
    with at_theta(problem, b) as ctx:
        ind = ctx.escape_indicator()
        after_indicator = ctx.hessian.num_products
        assert after_indicator == problem.num_samples + problem.dim  # N forms + exact Tr H
        al = ctx.alignment(k)
        spent = ctx.hessian.num_products - after_indicator
        hess_lanczos = ctx.top_eigenpairs(k).num_matvecs  # served from the cache
        assert ctx.hessian.num_products - after_indicator == spent  # that lookup cost nothing
    assert spent == hess_lanczos  # only H's Lanczos; Tr H was reused, not the D products again
    assert ind == plain_ind and al == plain_al  # bit for bit


def test_functions_take_a_context(problem) -> None:
    ctx = MeasurementContext(problem, 4)
    ind = sgdnoise.escape_indicator(problem, 4, context=ctx)
    n = ctx.hessian.num_products
    again = sgdnoise.escape_indicator(problem, 4, context=ctx)
    other_b = sgdnoise.escape_indicator(problem, 8, context=ctx, replacement=False)
    assert again == ind and ctx.hessian.num_products == n  # forms and Tr H reused
    assert other_b == sgdnoise.escape_indicator(problem, 8, replacement=False)
    with pytest.raises(ValueError, match="made for another Problem"):
        sgdnoise.alignment(make_problem("mlp", n=24, seed=4), 4, context=ctx)


def test_cached_eigenpairs_serve_smaller_k(problem) -> None:
    ctx = MeasurementContext(problem, 4)
    five = ctx.top_eigenpairs(5)
    n = ctx.hessian.num_products
    two = ctx.top_eigenpairs(2)
    assert ctx.hessian.num_products == n
    assert torch.equal(two.eigenvalues, five.eigenvalues[:2])
    ref = torch.linalg.eigvalsh(dense_hessian(problem)).flip(0)[:5]
    torch.testing.assert_close(five.eigenvalues, ref, rtol=0, atol=1e-8 * float(ref.abs().max()))
    ctx.top_eigenpairs(2, tol=1e-9)  # stricter than the cached one: recomputed
    assert ctx.hessian.num_products > n


def test_a_changed_theta_invalidates_the_context(problem) -> None:
    ctx = MeasurementContext(problem, 4)
    before = ctx.escape_indicator()
    theta = problem.theta()
    problem.set_theta(theta - 0.3 * problem.gradient())
    moved = ctx.escape_indicator()
    assert ctx.num_invalidations == 1
    assert moved == sgdnoise.escape_indicator(problem, 4)  # recomputed at the new θ
    assert moved != before
    assert ctx.hessian.num_products == problem.num_samples + problem.dim  # a fresh operator
    problem.set_theta(theta)
    assert ctx.escape_indicator() == before
    assert ctx.num_invalidations == 2
