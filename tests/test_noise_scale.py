"""The gradient noise scale against a dense float64 reference (per-sample loop)."""

from __future__ import annotations

import itertools

import pytest

import sgdnoise
from conftest import make_problem
from reference import loop_per_sample_gradients


def _reference(problem: sgdnoise.Problem) -> tuple[float, float]:
    G = loop_per_sample_gradients(problem)
    gbar = G.mean(0)
    C = G - gbar
    return float((C * C).sum() / G.shape[0]), float(gbar @ gbar)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_exact_noise_scale_matches_the_reference(kind: str, chunk_size: int | None) -> None:
    problem = make_problem(kind, n=17, chunk_size=chunk_size)
    tr, gsq = _reference(problem)
    gns = sgdnoise.gradient_noise_scale(problem)
    assert gns.method == "exact" and gns.stderr == 0.0
    assert gns.tr_sigma == pytest.approx(tr, rel=1e-10)
    assert gns.grad_norm_sq == pytest.approx(gsq, rel=1e-10)
    assert gns.b_simple == pytest.approx(tr / gsq, rel=1e-10)
    # Tr Σ₁ is the trace of the per-sample covariance operator (b = 1)
    S1 = sgdnoise.gradient_noise_covariance(problem, 1)
    assert gns.tr_sigma == pytest.approx(float(S1.trace()), rel=1e-10)


def test_expected_squared_batch_gradient_is_signal_plus_noise_over_b() -> None:
    # E‖g_B‖² = ‖ḡ‖² + Tr Σ₁ / B for B i.i.d. uniform indices: exact, by enumerating every batch.
    problem = make_problem("mlp", n=4)
    tr, gsq = _reference(problem)
    for B in (1, 2, 3):
        norms = [
            float(problem.gradient(indices=list(batch)).pow(2).sum())
            for batch in itertools.product(range(4), repeat=B)
        ]
        assert sum(norms) / len(norms) == pytest.approx(gsq + tr / B, rel=1e-10)


def test_two_batch_estimate_agrees_with_the_exact_value_within_its_error() -> None:
    problem = make_problem("mlp", n=40)
    exact = sgdnoise.gradient_noise_scale(problem)
    est = sgdnoise.gradient_noise_scale(
        problem, method="two_batch", b_small=2, b_big=20, num_pairs=400, generator=0
    )
    assert est.method == "two_batch" and est.num_pairs == 400
    assert (est.b_small, est.b_big) == (2, 20)
    assert abs(est.tr_sigma - exact.tr_sigma) <= 4 * est.tr_sigma_stderr
    assert abs(est.grad_norm_sq - exact.grad_norm_sq) <= 4 * est.grad_norm_sq_stderr
    assert abs(est.b_simple - exact.b_simple) <= 4 * est.stderr
    again = sgdnoise.gradient_noise_scale(
        problem, method="two_batch", b_small=2, b_big=20, num_pairs=400, generator=0
    )
    assert again == est  # same seed, same numbers


def test_bad_options_are_refused() -> None:
    problem = make_problem("mlp", n=8)
    with pytest.raises(ValueError, match="method must be 'exact' or 'two_batch'"):
        sgdnoise.gradient_noise_scale(problem, method="fast")
    with pytest.raises(TypeError, match="generator"):
        sgdnoise.gradient_noise_scale(problem, method="two_batch", generator="0")
    with pytest.raises(ValueError, match="b_big must be larger than b_small"):
        sgdnoise.gradient_noise_scale(problem, method="two_batch", b_small=4, b_big=4, generator=0)
    with pytest.raises(ValueError, match=r"b_big must be an integer in \[1, N\] = \[1, 8\]"):
        sgdnoise.gradient_noise_scale(problem, method="two_batch", b_small=1, b_big=9, generator=0)
    with pytest.raises(ValueError, match="num_pairs must be an integer >= 2"):
        sgdnoise.gradient_noise_scale(problem, method="two_batch", num_pairs=1, generator=0)
