"""Operators, Σ_b, Lanczos and trace estimation against dense float64 references."""

from __future__ import annotations

import pytest
import torch

import sgdnoise
from conftest import make_problem
from reference import dense_hessian, dense_sigma
from sgdnoise.linalg import (
    DenseOperator,
    DiagonalOperator,
    LowRankOperator,
    ScaledIdentityOperator,
)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-5}


def _spd(D: int, seed: int = 0, spectrum: torch.Tensor | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    lam = spectrum if spectrum is not None else torch.linspace(-1, 5, D, dtype=torch.float64)
    return (Q * lam) @ Q.T


# ---------------------------------------------------------------- operators
def test_simple_operators_match_dense() -> None:
    gen = torch.Generator().manual_seed(0)
    D = 7
    U = torch.randn(D, 3, generator=gen, dtype=torch.float64)
    s = torch.rand(3, generator=gen, dtype=torch.float64)
    d = torch.rand(D, generator=gen, dtype=torch.float64)
    cases = [
        (LowRankOperator(U, s), (U * s) @ U.T),
        (DiagonalOperator(d), torch.diag(d)),
        (
            ScaledIdentityOperator(0.3, D, dtype=torch.float64, device="cpu"),
            0.3 * torch.eye(D, dtype=torch.float64),
        ),
    ]
    V = torch.randn(D, 4, generator=gen, dtype=torch.float64)
    for op, dense in cases:
        torch.testing.assert_close(op @ V, dense @ V)
        torch.testing.assert_close(op @ V[:, 0], dense @ V[:, 0])
        torch.testing.assert_close(op.to_dense(), dense)
        torch.testing.assert_close(op.diagonal(), dense.diagonal())
        torch.testing.assert_close(op.trace(), dense.trace())
    total = cases[0][0] + cases[1][0].scaled(2.0)
    torch.testing.assert_close(total.to_dense(), cases[0][1] + 2 * cases[1][1])
    torch.testing.assert_close(total.trace(), cases[0][1].trace() + 2 * cases[1][1].trace())


def test_operator_input_validation() -> None:
    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \[4\] or a block \[4, k\].*\[5\]"):
        op @ torch.zeros(5, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype torch.float64.*torch.float32.*V.to"):
        op @ torch.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        op @ torch.zeros(4, 2, 2, dtype=torch.float64)


def test_to_dense_refuses_large_operators() -> None:
    op = ScaledIdentityOperator(1.0, 10_000, dtype=torch.float32, device="cpu")
    with pytest.raises(MemoryError, match="refusing to build a dense 10000×10000.*max_dim"):
        op.to_dense()


def test_operator_does_not_mutate_input(kind: str) -> None:
    problem = make_problem(kind)
    V = torch.randn(problem.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    V0 = V.clone()
    for op in (sgdnoise.hessian(problem), sgdnoise.gradient_noise_covariance(problem, 2)):
        op @ V
        assert torch.equal(V, V0)


# ---------------------------------------------------------------- Hessian and Σ_b
def test_hessian_operator_dense(kind: str, dtype: torch.dtype) -> None:
    problem = make_problem(kind, dtype)
    H = sgdnoise.hessian(problem)
    assert H.shape == (problem.dim, problem.dim) and H.dtype == dtype and H.device == problem.device
    ref = dense_hessian(make_problem(kind)).to(dtype)
    torch.testing.assert_close(H.to_dense(), ref, **_tol(dtype))
    torch.testing.assert_close(H.trace(), ref.trace(), **_tol(dtype))


@pytest.mark.parametrize("b,replacement", [(1, True), (4, True), (4, False), (24, False)])
def test_noise_covariance_dense(kind: str, b: int, replacement: bool) -> None:
    problem = make_problem(kind)
    ref = dense_sigma(problem, b, replacement)
    for materialize in (True, False):
        S = sgdnoise.gradient_noise_covariance(problem, b, replacement, materialize=materialize)
        torch.testing.assert_close(S.to_dense(), ref, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(S.trace(), ref.trace(), rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(S.diagonal(), ref.diagonal(), rtol=1e-9, atol=1e-13)
    if b == 24 and not replacement:  # the whole data set as the batch: no noise
        assert float(S.trace()) == 0.0


def test_noise_covariance_float32_and_factor(dtype: torch.dtype) -> None:
    problem = make_problem("cnn", dtype)
    S = sgdnoise.gradient_noise_covariance(problem, 3)
    ref = dense_sigma(make_problem("cnn"), 3).to(dtype)
    torch.testing.assert_close(S.to_dense(), ref, **_tol(dtype))
    L = S.factor()
    torch.testing.assert_close(L @ L.T, ref, **_tol(dtype))


def test_noise_covariance_can_centre_a_handed_over_buffer_in_place() -> None:
    problem = make_problem("cnn")
    G = problem.per_sample_gradients()
    ref = sgdnoise.GradientNoiseCovariance(problem, 3, per_sample=G.clone())
    buf = G.clone()
    S = sgdnoise.GradientNoiseCovariance(problem, 3, per_sample=buf, overwrite_per_sample=True)
    assert S.centered is buf  # no copy: the buffer now holds the centred gradients
    torch.testing.assert_close(buf, G - G.mean(0))
    torch.testing.assert_close(S.to_dense(), ref.to_dense())
    torch.testing.assert_close(S.trace(), ref.diagonal().sum())
    torch.testing.assert_close(S.diagonal(), ref.diagonal())
    z = torch.randn(
        4, problem.num_samples, generator=torch.Generator().manual_seed(0), dtype=G.dtype
    )
    torch.testing.assert_close(S.sample_factor_product(z), z @ ref.factor().T)


def test_batch_size_validation() -> None:
    problem = make_problem("mlp", n=10)
    for bad in (0, 11, 2.5, True):
        with pytest.raises(
            ValueError, match=r"batch_size must be an integer in \[1, N\] = \[1, 10\]"
        ):
            sgdnoise.gradient_noise_covariance(problem, bad)


# ---------------------------------------------------------------- Lanczos
@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_eigenpairs_dense(k: int) -> None:
    A = _spd(60)
    vals, vecs = sgdnoise.top_eigenpairs(DenseOperator(A), k, generator=0)
    ref_vals, ref_vecs = torch.linalg.eigh(A)
    torch.testing.assert_close(vals, ref_vals.flip(0)[:k], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)
    # Same eigenspace (columns may differ by sign).
    overlap = (vecs.T @ ref_vecs.flip(1)[:, :k]).abs()
    torch.testing.assert_close(
        overlap.diagonal(), torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-7
    )


def test_top_eigenpairs_algebraic_not_magnitude() -> None:
    # The largest-magnitude eigenvalue is −10, but we want the algebraically largest.
    spec = torch.cat([torch.tensor([-10.0, 3.0, 2.0]), torch.linspace(-1, 1, 37)]).double()
    vals, _ = sgdnoise.top_eigenpairs(DenseOperator(_spd(40, 1, spec)), 2, generator=0)
    torch.testing.assert_close(vals, torch.tensor([3.0, 2.0], dtype=torch.float64))


def test_top_eigenpairs_hessian_all_models(kind: str, dtype: torch.dtype) -> None:
    problem = make_problem(kind, dtype)
    ref = torch.linalg.eigvalsh(dense_hessian(make_problem(kind))).flip(0)[:3].to(dtype)
    result = sgdnoise.top_eigenpairs(sgdnoise.hessian(problem), 3, generator=1)
    assert result.converged and result.eigenvalues.dtype == dtype
    scale = float(ref.abs().max())
    torch.testing.assert_close(
        result.eigenvalues, ref, rtol=0, atol=(1e-8 if dtype == torch.float64 else 2e-3) * scale
    )


def test_top_eigenpairs_repeated_and_degenerate() -> None:
    spec = torch.cat([torch.full((4,), 5.0), torch.zeros(46)]).double()  # rank 4, repeated
    vals, vecs = sgdnoise.top_eigenpairs(DenseOperator(_spd(50, 2, spec)), 6, generator=0)
    torch.testing.assert_close(
        vals, torch.tensor([5.0] * 4 + [0.0] * 2, dtype=torch.float64), rtol=0, atol=1e-9
    )
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-9)


def test_top_eigenpairs_reports_nonconvergence() -> None:
    A = DenseOperator(_spd(300, 3, torch.linspace(0, 1, 300, dtype=torch.float64)))  # no gap
    with pytest.raises(sgdnoise.ConvergenceError, match="did not converge within") as info:
        sgdnoise.top_eigenpairs(A, 5, generator=0, max_matvecs=30, tol=1e-12)
    assert not info.value.result.converged
    with pytest.warns(RuntimeWarning, match="did not converge"):
        sgdnoise.top_eigenpairs(
            A, 5, generator=0, max_matvecs=30, tol=1e-12, on_nonconvergence="warn"
        )


def test_top_eigenpairs_warm_start_and_determinism() -> None:
    A = DenseOperator(
        _spd(200, 4, torch.cat([torch.linspace(10, 5, 10), torch.linspace(0, 1, 190)]).double())
    )
    cold = sgdnoise.top_eigenpairs(A, 5, generator=0)
    again = sgdnoise.top_eigenpairs(A, 5, generator=0)
    assert torch.equal(cold.eigenvalues, again.eigenvalues) and torch.equal(
        cold.eigenvectors, again.eigenvectors
    )
    warm = sgdnoise.top_eigenpairs(A, 5, generator=0, v0=cold.eigenvectors)
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues)
    assert warm.num_matvecs < cold.num_matvecs


def test_top_eigenpairs_bad_k() -> None:
    A = DenseOperator(torch.eye(5, dtype=torch.float64))
    for bad in (0, -1, 6, 1.5):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, D\] = \[1, 5\]"):
            sgdnoise.top_eigenpairs(A, bad)


# ---------------------------------------------------------------- traces
def test_trace_estimators_unbiased_and_seeded() -> None:
    A = DenseOperator(
        _spd(
            80,
            5,
            torch.cat(
                [
                    torch.linspace(50, 10, 5),
                    torch.rand(75, generator=torch.Generator().manual_seed(0)),
                ]
            ).double(),
        )
    )
    exact = float(A.matrix.trace())
    for method in ("hutchinson", "hutch++"):
        est = sgdnoise.trace_estimate(A, 60, method=method, generator=7)
        assert est.method == method and est.num_matvecs == 60
        assert abs(est.value - exact) < 4 * est.stderr + 1e-9, (method, est, exact)
        same = sgdnoise.trace_estimate(A, 60, method=method, generator=7)
        assert same == est
    # Hutch++ is far more accurate here: a few dominant eigenvalues are captured exactly.
    hpp = [sgdnoise.trace_estimate(A, 30, generator=s).value - exact for s in range(20)]
    hut = [
        sgdnoise.trace_estimate(A, 30, method="hutchinson", generator=s).value - exact
        for s in range(20)
    ]
    assert torch.tensor(hpp).pow(2).mean() < torch.tensor(hut).pow(2).mean() / 4


def test_trace_estimate_exact_for_low_rank() -> None:
    gen = torch.Generator().manual_seed(0)
    op = LowRankOperator(torch.randn(50, 4, generator=gen, dtype=torch.float64))
    est = sgdnoise.trace_estimate(op, 15, generator=0)
    assert abs(est.value - float(op.trace())) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthonormal_basis_in_place_spans_what_qr_spans(dtype: torch.dtype) -> None:
    # The in-place basis (large sketches) against Householder QR: the same projector, an
    # orthonormal Q written over A, rank-deficient and zero blocks reduced to their rank.
    from sgdnoise.linalg._orth import orthonormal_basis

    gen = torch.Generator().manual_seed(3)
    eps = torch.finfo(dtype).eps
    D, s = 3000, 12
    A = torch.randn(D, s, generator=gen, dtype=torch.float64)
    A = (A * torch.logspace(0, -4, s, dtype=torch.float64)[None, :]).to(dtype)  # cond ~ 1e4
    Q_ref = torch.linalg.qr(A.double())[0]
    work = A.clone()
    Q = orthonormal_basis(work, max_copy_bytes=0)
    assert Q.shape == (D, s) and Q.data_ptr() == work.data_ptr()  # in place
    eye = torch.eye(s, dtype=torch.float64)
    assert (Q.double().T @ Q.double() - eye).abs().max() < 50 * eps
    # the same subspace: Q_ref's columns lie in span Q (to the rounding of A's small columns)
    assert (Q_ref - Q.double() @ (Q.double().T @ Q_ref)).norm() < 1e4 * eps * s
    dup = torch.cat([A[:, :5], A[:, :5] * 2, torch.zeros(D, 2, dtype=dtype)], dim=1)
    Qd = orthonormal_basis(dup.clone(), max_copy_bytes=0)
    assert Qd.shape == (D, 5)
    assert (Qd.double().T @ Qd.double() - torch.eye(5, dtype=torch.float64)).abs().max() < 50 * eps
    assert orthonormal_basis(torch.zeros(D, 4, dtype=dtype), max_copy_bytes=0).shape == (D, 0)
    assert orthonormal_basis(A.clone()).shape == (D, s)  # small: Householder QR, A kept


def test_hutchpp_in_place_sketch_basis_gives_the_qr_estimate(monkeypatch) -> None:
    # Hutch++ with the in-place basis (as for a ResNet-18 sketch) equals the QR one to rounding,
    # on a full-rank and on a low-rank operator (where the exact part is the whole trace).
    import sgdnoise.linalg._orth as orth_mod

    A = DenseOperator(_spd(200, 4, torch.linspace(-3, 40, 200, dtype=torch.float64)))
    L = LowRankOperator(torch.randn(200, 4, generator=torch.Generator().manual_seed(1)).double())
    ref = [sgdnoise.trace_estimate(op, 30, generator=5) for op in (A, L)]
    monkeypatch.setattr(orth_mod, "QR_COPY_MAX_BYTES", 0)
    got = [sgdnoise.trace_estimate(op, 30, generator=5) for op in (A, L)]
    for r, g in zip(ref, got, strict=True):
        assert g.value == pytest.approx(r.value, rel=1e-10)
        assert g.stderr == pytest.approx(r.stderr, rel=1e-8, abs=1e-10)
    assert got[1].value == pytest.approx(float(L.trace()), rel=1e-10)


def test_lanczos_basis_stays_orthonormal_in_float32_with_millions_of_entries() -> None:
    # A float32 inner product over millions of entries loses ~1e-5–1e-4 of its value (a
    # ResNet-18's Σ_1, D = 11.2M: the basis stopped being orthonormal once its Krylov space
    # saturated and the Ritz values rose above the spectrum, 144,697 for a top eigenvalue of
    # 66,558). Block sums accumulated in float64, the block is orthonormal to itself and to Q.
    from sgdnoise.linalg._orth import inner64, orthonormalize_against

    gen = torch.Generator().manual_seed(0)
    D = 2_000_000
    Q = torch.linalg.qr(torch.randn(D, 20, generator=gen, dtype=torch.float64))[0].float()
    X = Q @ torch.randn(20, 2, generator=gen) * 100 + 1e-2 * torch.randn(D, 2, generator=gen)
    Xq = orthonormalize_against(X, Q, gen).double()
    assert Xq.shape == (D, 2)
    assert float((Q.double().T @ Xq).abs().max()) < 1e-6
    assert float((Xq.T @ Xq - torch.eye(2, dtype=torch.float64)).abs().max()) < 1e-6
    ref = Q.double().T @ X.double()
    scale = Q.double().norm(dim=0)[:, None] * X.double().norm(dim=0)[None, :]
    err64 = float(((inner64(Q, X) - ref).abs() / scale).max())
    err32 = float((((Q.T @ X).double() - ref).abs() / scale).max())
    assert err64 < 1e-8 and err64 < err32 / 10  # plain float32 here: 7e-7
    # and the solver on a float32 rank-8 operator whose Krylov space saturates before m = 21
    F = torch.randn(D, 8, generator=gen) * torch.logspace(1, 0, 8)[None, :]
    op = LowRankOperator(F)
    lam_ref = torch.linalg.eigvalsh(F.double().T @ F.double()).flip(0)
    pairs = sgdnoise.top_eigenpairs(op, 2, tol=1e-3, generator=0)
    assert pairs.converged
    torch.testing.assert_close(pairs.eigenvalues.double(), lam_ref[:2], rtol=1e-3, atol=0)


def test_trace_estimate_errors() -> None:
    A = DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown method 'exact'"):
        sgdnoise.trace_estimate(A, 10, method="exact", generator=0)
    with pytest.raises(ValueError, match="num_matvecs >= 4"):
        sgdnoise.trace_estimate(A, 2, generator=0)
    with pytest.raises(TypeError, match="torch.Generator or an int seed"):
        sgdnoise.trace_estimate(A, 10, generator="0")  # type: ignore[arg-type]
    # one randomness rule: no generator means seed 0
    assert sgdnoise.trace_estimate(A, 10) == sgdnoise.trace_estimate(A, 10, generator=0)


def test_lanczos_judges_convergence_before_the_basis_fills() -> None:
    # A well-separated top of the spectrum converges in fewer products than the basis size
    # (m = k + 20 here): convergence is first judged at 2k + 2b columns, not at m (16-bit
    # products still wait for the full basis). The pairs still meet tol against the dense truth.
    gen = torch.Generator().manual_seed(0)
    D = 300
    Qr = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0]
    lam = torch.cat([torch.tensor([100.0, 50.0, 25.0]), torch.rand(D - 3, generator=gen)])
    A = DenseOperator((Qr * lam.double()) @ Qr.T)
    pairs = sgdnoise.top_eigenpairs(A, 3, tol=1e-6, generator=0)
    assert pairs.converged and pairs.num_matvecs < 3 + 20
    torch.testing.assert_close(pairs.eigenvalues, lam[:3].double(), rtol=1e-6, atol=0)
    R = A @ pairs.eigenvectors - pairs.eigenvectors * pairs.eigenvalues
    assert float(R.norm(dim=0).max()) <= 1e-6 * 100
