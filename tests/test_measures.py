"""Escape indicator, alignment and expected sharpness against dense references and closed forms."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sgdnoise
from conftest import make_problem
from reference import dense_hessian, dense_sigma


class Quadratic(nn.Module):
    """ℓ(θ; x) = ½ (θ − x)ᵀ A (θ − x): H = A, c_i = −A (x_i − x̄), Σ_1 = A Cov(x) A."""

    def __init__(self, A: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.theta - x
        return 0.5 * ((d @ self.A) * d).sum(-1)


def _quadratic_problem(
    D: int = 12, N: int = 30, seed: int = 0
) -> tuple[sgdnoise.Problem, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(D, D, generator=gen, dtype=torch.float64)
    A = M @ M.T / D + 0.1 * torch.eye(D, dtype=torch.float64)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    model = Quadratic(A, torch.randn(D, generator=gen, dtype=torch.float64))
    problem = sgdnoise.Problem(model, lambda out, _: out.mean(), x, torch.zeros(N))
    return problem, A, x


def test_escape_indicator_closed_form_on_quadratic() -> None:
    problem, A, x = _quadratic_problem()
    xc = x - x.mean(0)
    cov_x = xc.T @ xc / x.shape[0]
    for b in (1, 5):
        S = A @ cov_x @ A / b
        ind = sgdnoise.escape_indicator(problem, b)
        assert ind.exact and ind.stderr == 0.0 and ind.tr_H_exact
        assert ind.tr_HS == pytest.approx(float(torch.trace(A @ S)), rel=1e-10)
        assert ind.tr_S == pytest.approx(float(S.trace()), rel=1e-10)
        assert ind.tr_H == pytest.approx(float(A.trace()), rel=1e-10)
        iso = float(A.trace() * S.trace() / A.shape[0])
        assert ind.tr_HS_iso == pytest.approx(iso, rel=1e-10)
        assert ind.ratio == pytest.approx(ind.tr_HS / iso, rel=1e-12)


def test_escape_indicator_dense_all_models(kind: str, dtype: torch.dtype) -> None:
    problem = make_problem(kind, dtype)
    ref_problem = make_problem(kind)
    H, S = dense_hessian(ref_problem), dense_sigma(ref_problem, 4, replacement=False)
    ind = sgdnoise.escape_indicator(problem, 4, replacement=False, block_size=7)
    rel = 1e-9 if dtype == torch.float64 else 1e-3
    assert ind.tr_HS == pytest.approx(float(torch.trace(H @ S)), rel=rel)
    assert ind.tr_HS_iso == pytest.approx(float(H.trace() * S.trace() / problem.dim), rel=rel)
    assert ind.dim == problem.dim and ind.batch_size == 4 and ind.num_samples == problem.num_samples


def test_escape_indicator_sampled_is_unbiased_with_honest_stderr() -> None:
    problem = make_problem("mlp", n=40)
    exact = sgdnoise.escape_indicator(problem, 2).tr_HS
    estimates = [
        sgdnoise.escape_indicator(problem, 2, num_samples=10, generator=s) for s in range(40)
    ]
    values = torch.tensor([e.tr_HS for e in estimates], dtype=torch.float64)
    mean_se = float(torch.tensor([e.stderr for e in estimates]).mean())
    # The mean of 40 independent unbiased estimates is within 4 standard errors of the truth.
    assert abs(float(values.mean()) - exact) < 4 * mean_se / 40**0.5
    # The reported standard error matches the spread of the estimates (within a factor 2).
    assert 0.5 < float(values.std()) / mean_se < 2.0
    full = sgdnoise.escape_indicator(problem, 2, num_samples=40, generator=0)
    assert full.exact and full.tr_HS == pytest.approx(exact, rel=1e-12)


def test_escape_indicator_streaming_and_estimated_trace() -> None:
    problem = make_problem("cnn")
    exact = sgdnoise.escape_indicator(problem, 3)
    est = sgdnoise.escape_indicator(
        problem, 3, exact_trace_max_dim=10, trace_matvecs=30, generator=0
    )
    assert not est.tr_H_exact and est.tr_H_stderr > 0
    assert abs(est.tr_H - exact.tr_H) < 5 * est.tr_H_stderr
    assert est.tr_HS == pytest.approx(exact.tr_HS, rel=1e-10)  # Tr(HΣ) stays exact


def test_escape_indicator_seeded_and_errors() -> None:
    problem = make_problem("mlp")
    a = sgdnoise.escape_indicator(problem, 2, num_samples=8, generator=3)
    b = sgdnoise.escape_indicator(problem, 2, num_samples=8, generator=3)
    assert a == b
    with pytest.raises(
        ValueError, match=r"num_samples must be None \(exact\) or an integer in \[2, N\]"
    ):
        sgdnoise.escape_indicator(problem, 2, num_samples=1)
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        sgdnoise.escape_indicator(problem, 0)


def test_alignment_dense(kind: str) -> None:
    problem = make_problem(kind)
    H, S = dense_hessian(problem), dense_sigma(problem, 2)
    lam, U = torch.linalg.eigh(H)
    mu, V = torch.linalg.eigh(S)
    u1 = U[:, -1]
    a_ref = float(u1 @ S @ u1 * H.trace() / (lam[-1] * S.trace()))
    k = 3
    overlap_ref = float((U[:, -k:].T @ V[:, -k:]).pow(2).sum() / k)
    res = sgdnoise.alignment(problem, 2, k=k, generator=0)
    assert res.a == pytest.approx(a_ref, rel=1e-6)
    assert res.overlap == pytest.approx(overlap_ref, rel=1e-5, abs=1e-7)
    assert res.lambda_1 == pytest.approx(float(lam[-1]), rel=1e-9)
    torch.testing.assert_close(
        torch.tensor(res.noise_eigenvalues, dtype=torch.float64),
        mu.flip(0)[:k],
        rtol=1e-6,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, D\]"):
        sgdnoise.alignment(problem, 2, k=problem.dim + 1)


def test_alignment_reports_the_spread_of_a_hutchpp_trace() -> None:
    # Tr H by Hutch++ (exact_trace_max_dim=0): a carries its spread, tr_H_stderr / tr_H
    # relative; the exact trace gives no spread. Several seeds: the estimates scatter around the
    # exact a within their reported errors.
    problem, _, _ = _quadratic_problem(D=40, N=30)
    exact = sgdnoise.alignment(problem, 1, k=1, generator=0)
    assert exact.tr_H_exact and exact.tr_H_stderr == 0.0 and exact.a_stderr == 0.0
    z = []
    for seed in range(6):
        res = sgdnoise.alignment(
            problem, 1, k=1, generator=seed, exact_trace_max_dim=0, trace_matvecs=30
        )
        assert not res.tr_H_exact and res.tr_H_stderr > 0
        assert res.a_stderr == pytest.approx(
            abs(res.a) * res.tr_H_stderr / abs(res.tr_H), rel=1e-12
        )
        # only Tr H differs (and u1, λ1 within Lanczos's tolerance, 1e-6 in float64: another
        # seed's start converges to another rounding of the same pair)
        assert res.a / res.tr_H == pytest.approx(exact.a / exact.tr_H, rel=1e-6)
        z.append((res.a - exact.a) / res.a_stderr)
        assert "±" in str(res)
    assert max(abs(v) for v in z) < 4, z


def test_alignment_overlap_is_one_when_k_equals_d() -> None:
    # With k = D both top-k eigenspaces are the whole space, so the overlap must be exactly 1.
    problem, _, _ = _quadratic_problem(D=6, N=50)
    res = sgdnoise.alignment(problem, 1, k=6, generator=0)
    assert res.overlap == pytest.approx(1.0, abs=1e-8)  # k = D: both eigenspaces are R^D


def test_expected_sharpness_closed_form_on_quadratic() -> None:
    problem, A, _ = _quadratic_problem(D=12)
    sigma = 0.05
    res = sgdnoise.expected_sharpness(problem, sigma, 4000, generator=0, draws_per_batch=500)
    expected = sigma**2 * float(A.trace()) / 2
    assert abs(res.signed - expected) < 4 * res.signed_stderr
    assert res.absolute >= abs(res.signed)
    assert res.num_samples == 4000 and res.sigma == sigma


def test_expected_sharpness_leaves_model_unchanged_and_is_seeded(dtype: torch.dtype) -> None:
    problem = make_problem("cnn", dtype)
    before = [p.detach().clone() for p in problem.model.parameters()]
    r1 = sgdnoise.expected_sharpness(
        problem, 0.01, 50, generator=torch.Generator().manual_seed(5), draws_per_batch=7
    )
    r2 = sgdnoise.expected_sharpness(problem, 0.01, 50, generator=5, draws_per_batch=7)
    assert r1 == r2
    # One forward pass per draw (the default for models with convolutions) and one vmapped pass
    # over the draws see the same draws and give the same losses.
    r3 = sgdnoise.expected_sharpness(
        problem, 0.01, 50, generator=5, draws_per_batch=7, vectorize=True
    )
    r4 = sgdnoise.expected_sharpness(
        problem, 0.01, 50, generator=5, draws_per_batch=7, vectorize=False
    )
    assert r4 == r1
    assert r3.signed == pytest.approx(r4.signed, rel=1e-4, abs=1e-9)
    assert r3.absolute == pytest.approx(r4.absolute, rel=1e-4, abs=1e-9)
    for p, q in zip(problem.model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma must be a positive finite number"):
            sgdnoise.expected_sharpness(problem, bad, 10, generator=0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        sgdnoise.expected_sharpness(problem, 0.01, 1, generator=0)
    # One randomness rule: no generator means seed 0 (deterministic by default).
    assert sgdnoise.expected_sharpness(problem, 0.01, 10) == sgdnoise.expected_sharpness(
        problem, 0.01, 10, generator=0
    )
    with pytest.raises(TypeError, match="torch.Generator or an int seed"):
        sgdnoise.expected_sharpness(problem, 0.01, 10, generator="0")


def test_measures_on_operators_match_the_problem_forms() -> None:
    """tr_HS(H, Σ_b), alignment(H, Σ_b, k) and hessian_trace(H) on operators give the numbers of
    escape_indicator / alignment(problem, b, k), and tr_HS on dense operators is Tr(HS)."""
    problem = make_problem("mlp", n=20, seed=3)
    b = 4
    H = sgdnoise.hessian(problem)
    S = sgdnoise.gradient_noise_covariance(problem, b)
    ind = sgdnoise.escape_indicator(problem, b)
    est = sgdnoise.tr_HS(H, S)
    assert est.value == ind.tr_HS and est.stderr == 0.0 and est.method == "exact"
    ref = float((dense_hessian(problem) @ dense_sigma(problem, b)).trace())
    assert est.value == pytest.approx(ref, rel=1e-9)
    dense = sgdnoise.tr_HS(
        sgdnoise.DenseOperator(H.to_dense()), sgdnoise.DenseOperator(S.to_dense())
    )
    assert dense.value == pytest.approx(ref, rel=1e-9)
    sampled = sgdnoise.escape_indicator(problem, b, num_samples=8, seed=5)
    direct = sgdnoise.tr_HS(H, S, num_samples=8, seed=5)
    assert (direct.value, direct.stderr) == (sampled.tr_HS, sampled.stderr)
    assert sgdnoise.hessian_trace(H)[0] == ind.tr_H
    al_op = sgdnoise.alignment(H, S, 2, seed=1)
    al_pb = sgdnoise.alignment(problem, b, 2, seed=1)
    assert al_op.a == pytest.approx(al_pb.a, rel=1e-8)
    assert al_op.overlap == pytest.approx(al_pb.overlap, rel=1e-8)
    assert sgdnoise.alignment(problem, batch_size=b, k=2, seed=1) == al_pb
    with pytest.raises(TypeError, match="S must be a LinearOperator"):
        sgdnoise.alignment(H, 4, 1)


def test_results_print_as_short_tables() -> None:
    problem = make_problem("mlp", n=20, seed=3)
    ind = sgdnoise.escape_indicator(problem, 4, num_samples=8)
    text = str(ind)
    assert text.splitlines()[0].startswith("EscapeIndicator (D=")
    assert "ratio" in text and "±" in text and len(text.splitlines()) == 6
    assert ind.ratio_stderr > 0
    assert "a " in str(sgdnoise.alignment(problem, 4, 1))
    assert "±" in str(sgdnoise.expected_sharpness(problem, 0.01, 4))
    assert "ratio_stderr" not in ind.to_dict()  # the JSON of the experiments is unchanged


def test_a_plain_tensor_is_refused_as_an_operator_with_the_fix() -> None:
    import pytest

    M = torch.eye(3, dtype=torch.float64)
    op = sgdnoise.DenseOperator(M)
    for call in (
        lambda: sgdnoise.tr_HS(op, M),
        lambda: sgdnoise.tr_HS(M, op),
        lambda: sgdnoise.hessian_trace(M),
        lambda: sgdnoise.trace_estimate(M, 8),
        lambda: sgdnoise.top_eigenpairs(M, 1),
        lambda: sgdnoise.alignment(M, op, 1),
    ):
        with pytest.raises(
            TypeError, match=r"must be a sgdnoise LinearOperator.*DenseOperator\(M\)"
        ):
            call()
    with pytest.raises(ValueError, match="must share dtype and device"):
        sgdnoise.tr_HS(op, sgdnoise.DenseOperator(M.float()))


def test_an_unresolved_sampled_trace_warns() -> None:
    # H indefinite with a trace near 0 (a ResNet-18's sampled indicator: Tr H = −3,284 ± 12,505
    # from 32 products): the isotropic equivalent and the ratio are noise, even in sign — said
    gen = torch.Generator().manual_seed(0)
    D = 40
    Q = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0]
    lam = torch.linspace(-10, 10, D, dtype=torch.float64) + 0.01
    A = (Q * lam) @ Q.T
    x = torch.randn(30, D, generator=gen, dtype=torch.float64)
    model = Quadratic(A, torch.randn(D, generator=gen, dtype=torch.float64))
    problem = sgdnoise.Problem(model, lambda out, _: out.mean(), x, torch.zeros(30))
    with pytest.warns(RuntimeWarning, match="not resolved"):
        ind = sgdnoise.escape_indicator(problem, 1, exact_trace=False, trace_matvecs=6)
    assert ind.tr_H_stderr > abs(ind.tr_H)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = sgdnoise.escape_indicator(problem, 1)  # exact trace: nothing to warn
    assert exact.tr_H == pytest.approx(float(lam.sum()), rel=1e-8)
