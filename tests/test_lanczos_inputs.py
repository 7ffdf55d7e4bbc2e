"""top_eigenpairs on inputs a user can get wrong, and on operators of extreme norm (a breaker's
findings): one clear error, or the right answer."""

from __future__ import annotations

import warnings

import pytest
import torch

import sgdnoise
from sgdnoise.linalg import DenseOperator
from sgdnoise.linalg.lanczos import _nonconvergence_message


def _op(spec: torch.Tensor, seed: int = 0) -> DenseOperator:
    D = spec.numel()
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0]
    return DenseOperator((Q * spec.double()) @ Q.T)


SPEC = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.linspace(1, 0, 97)]).double()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tol": 1.5}, "tol must be a relative residual in \\(0, 1\\)"),
        ({"tol": float("inf")}, "tol must be a relative residual"),
        ({"tol": 0.0}, "tol must be a relative residual"),
        ({"block_size": 2.5}, "block_size must be a positive integer"),
        ({"max_matvecs": 0}, "max_matvecs must be a positive integer"),
        ({"max_matvecs": 2.5}, "max_matvecs must be a positive integer"),
        ({"basis_size": 4}, "basis_size must be at least k \\+ the default block"),
        ({"v0": torch.randn(100, 101, dtype=torch.float64)}, "with j ≤ 100"),
    ],
)
def test_bad_options_get_one_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sgdnoise.top_eigenpairs(_op(SPEC), 3, generator=0, **kwargs)


def test_complex_and_non_finite_operators_are_refused_by_name() -> None:
    M = torch.randn(6, 6, dtype=torch.complex128)
    with pytest.raises(TypeError, match="needs a real floating-point matrix"):
        DenseOperator(M + M.mH)
    with pytest.raises(TypeError, match="needs a real floating-point matrix"):
        DenseOperator(torch.eye(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="needs a torch.Tensor, got ndarray"):
        DenseOperator(torch.eye(3).numpy())
    A = _op(SPEC).to_dense().clone()
    A[3, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite entries"):
        sgdnoise.top_eigenpairs(DenseOperator(A), 2, generator=0)


@pytest.mark.parametrize(
    "scale,dtype",
    [
        (1e-25, torch.float32),
        (1e-30, torch.float32),
        (1e20, torch.float32),
        (1e-250, torch.float64),
        (1e200, torch.float64),
    ],
)
def test_operators_of_tiny_or_huge_norm(scale: float, dtype: torch.dtype) -> None:
    # the squares of a residual's entries left the dtype's range: every residual read 0 (any
    # Ritz pair passed, eigenvalues 9.55, 8.65, 7.68 for 10, 9, 8) or inf (a math domain error)
    A = (_op(SPEC).to_dense() * scale).to(dtype)
    pairs = sgdnoise.top_eigenpairs(DenseOperator(A), 3, generator=0)
    got = pairs.eigenvalues.double() / scale
    torch.testing.assert_close(got, SPEC[:3], rtol=1e-3 if dtype == torch.float32 else 1e-8, atol=0)
    U = pairs.eigenvectors.double()
    true_res = (A.double() / scale @ U - U * got).norm(dim=0) / 10  # unscaled: no overflow
    assert float(true_res.max()) <= pairs.tol
    torch.testing.assert_close(
        pairs.residuals.double() / (10 * scale), true_res, rtol=0.05, atol=1e-12
    )


def test_a_fixed_block_warns_when_an_eigenvalue_fills_it() -> None:
    spec = torch.cat([torch.full((3,), 10.0), torch.linspace(9, 1, 97)]).double()
    with pytest.warns(RuntimeWarning, match="the eigenvalue 10 came out 2 times among the top 5"):
        sgdnoise.top_eigenpairs(_op(spec), 5, generator=0, block_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default block grows instead, silently right
        pairs = sgdnoise.top_eigenpairs(_op(spec), 5, generator=0)
        sgdnoise.top_eigenpairs(_op(SPEC), 3, generator=0, block_size=2)  # no repeat: no warning
    torch.testing.assert_close(pairs.eigenvalues, spec[:5])


def test_the_budget_message_after_a_growth_says_what_happened() -> None:
    res = torch.full((5,), 1e-9, dtype=torch.float64)
    theta = torch.tensor([10.0, 10.0, 9.0, 8.0, 7.0, 6.0], dtype=torch.float64)
    msg = _nonconvergence_message(res, theta, 10.0, 1e-6, 5, 2000, [], torch.float64, 25, (2, 4))
    assert "every residual meets tol" in msg and "grew from 2 to 4" in msg
    assert "did not converge" not in msg


def test_bad_warm_starts_get_one_clear_error() -> None:
    op = _op(SPEC)
    bad = torch.randn(100, 2, dtype=torch.float64)
    bad[5, 1] = float("nan")
    for v0, err, match in [
        (bad, ValueError, "finite with no zero column"),
        (torch.zeros(100, dtype=torch.float64), ValueError, "finite with no zero column"),
        (torch.ones(100, dtype=torch.complex128), TypeError, "real floating-point torch.Tensor"),
        ([1.0] * 100, TypeError, "real floating-point torch.Tensor"),
    ]:
        with pytest.raises(err, match=match):
            sgdnoise.top_eigenpairs(op, 2, generator=0, v0=v0)
    # a 0-d tensor tol is a number
    pairs = sgdnoise.top_eigenpairs(op, 2, generator=0, tol=torch.tensor(1e-6))
    assert pairs.tol == pytest.approx(1e-6)


def test_the_default_block_at_its_cap_warns_when_an_eigenvalue_fills_it() -> None:
    # 10 copies, k = 12: the default block grows to its cap of 8 and cannot promise the rest
    spec = torch.cat([torch.full((10,), 5.0), torch.linspace(4, 0, 190)]).double()
    with pytest.warns(RuntimeWarning, match="the default block grown to its cap of 8"):
        pairs = sgdnoise.top_eigenpairs(_op(spec), 12, generator=0)
    assert pairs.block_size == 8
