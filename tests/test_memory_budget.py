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
