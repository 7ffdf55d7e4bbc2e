"""float16 / bfloat16 operators through the eigen and trace solvers (issue 10, case 08).

PyTorch has no 16-bit QR or ``eigh``; the solvers keep their basis and small dense algebra in
float32/float64 and take only the products in the operator's dtype. Every check compares with the
float64 spectrum of the *same* (16-bit-rounded) weights and data. Stated tolerance: 5 % relative
(the products carry ~1e-2 relative rounding in bfloat16, ~1e-3 in float16).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgdnoise
from reference import dense_hessian, dense_sigma
from sgdnoise.linalg import DenseOperator
from sgdnoise.linalg.lanczos import default_tol, work_dtype

LOW = [torch.bfloat16, torch.float16]
REL = 0.05  # the stated tolerance against float64


def _problems(dtype: torch.dtype, n: int = 40) -> tuple[sgdnoise.Problem, sgdnoise.Problem]:
    """A tiny 16-bit MLP (D = 67) and the float64 copy of its rounded weights and data."""
    gen = torch.Generator().manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    model = model.to(dtype)
    x = torch.randn(n, 4, generator=gen).to(dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    low = sgdnoise.Problem(model, F.cross_entropy, x, y)
    ref = sgdnoise.Problem(copy.deepcopy(model).double(), F.cross_entropy, x.double(), y)
    return low, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs()).max())


def test_default_tolerances_are_stated_and_reachable() -> None:
    assert default_tol(torch.float64) == 1e-6
    assert default_tol(torch.float32) == 1e-3
    assert default_tol(torch.float16) == 1e-2
    assert default_tol(torch.bfloat16) == 3e-2
    assert work_dtype(torch.bfloat16) == work_dtype(torch.float16) == torch.float32
    assert work_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("dtype", LOW)
def test_top_eigenpairs_dense_16bit_matrix(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    lam = torch.cat(
        [torch.tensor([5.0, 3.0, -4.0]), torch.rand(37, generator=gen, dtype=torch.float64)]
    )
    A = ((Q * lam) @ Q.T).to(dtype)
    A = (A + A.T) / 2  # exactly symmetric after rounding
    ref = torch.linalg.eigvalsh(A.double()).flip(0)[:3]
    pairs = sgdnoise.top_eigenpairs(DenseOperator(A), 3, generator=0)
    assert pairs.converged and pairs.tol == default_tol(dtype)
    # Stated return dtype: float32 for 16-bit operators, with float32-orthonormal vectors.
    assert pairs.eigenvalues.dtype == pairs.eigenvectors.dtype == torch.float32
    U = pairs.eigenvectors
    assert torch.allclose(U.T @ U, torch.eye(3), atol=1e-5)
    assert _rel(pairs.eigenvalues, ref) < REL


@pytest.mark.parametrize("dtype", LOW)
def test_top_eigenpairs_of_a_16bit_hessian_match_float64(dtype: torch.dtype) -> None:
    low, ref = _problems(dtype)
    H_ref = dense_hessian(ref)
    vals, vecs = torch.linalg.eigh(H_ref)
    vals, vecs = vals.flip(0)[:2], vecs.flip(1)[:, :2]
    H = sgdnoise.hessian(low)
    pairs = sgdnoise.top_eigenpairs(H, k=2, generator=0)
    assert pairs.converged
    assert _rel(pairs.eigenvalues, vals) < REL
    overlap = (pairs.eigenvectors.double().T @ vecs).abs().diagonal()
    assert bool((overlap > 1 - REL).all()), overlap
    # A warm start from float32 (or float64) vectors is accepted.
    again = sgdnoise.top_eigenpairs(H, k=2, v0=vecs, generator=1)
    assert _rel(again.eigenvalues, vals) < REL


@pytest.mark.parametrize("dtype", LOW)
def test_trace_estimates_of_a_16bit_hessian_match_float64(dtype: torch.dtype) -> None:
    low, ref = _problems(dtype)
    tr_ref = float(torch.trace(dense_hessian(ref)))
    H = sgdnoise.hessian(low)
    D = low.dim
    # Hutch++ with a sketch of all D directions is exact up to the 16-bit products.
    full = sgdnoise.trace_estimate(H, 3 * D, generator=0)
    assert full.stderr == 0.0
    assert abs(full.value - tr_ref) < REL * abs(tr_ref)
    for method in ("hutch++", "hutchinson"):
        est = sgdnoise.trace_estimate(H, 60, method=method, generator=1)
        assert isinstance(est.value, float)
        assert abs(est.value - tr_ref) < 4 * est.stderr + REL * abs(tr_ref), (method, est)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", ["hessian", "hessian_top1", "leading"])
def test_eigen_noise_structures_on_16bit_models(dtype: torch.dtype, name: str) -> None:
    low, ref = _problems(dtype)
    b = 4
    opts = {"k": 2} if name != "hessian_top1" else {}
    if name == "leading":
        opts["solver"] = "lanczos"
        target = dense_sigma(ref, b)
    else:
        target = dense_hessian(ref)
    vals, vecs = torch.linalg.eigh(target)
    k = opts.get("k", 1)
    vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
    nm = sgdnoise.noise_model(name, low, b, **opts)
    # The structure keeps the model's dtype: covariance, eigenvectors and draws.
    assert nm.covariance.dtype == dtype and nm.eigenvectors.dtype == dtype
    draws = nm.sample(3, generator=0)
    assert draws.dtype == dtype and draws.shape == (3, low.dim)
    got = nm.eigenvalues if name == "leading" else nm.hessian_eigenvalues
    assert _rel(got, vals) < REL
    overlap = (nm.eigenvectors.double().T @ vecs).abs().diagonal()
    assert bool((overlap > 1 - REL).all()), overlap
    # Tr Cov(n) = Tr Σ_b for the Hessian structures, within 16-bit accuracy of float64.
    if name != "leading":
        tr_sigma = float(torch.trace(dense_sigma(ref, b)))
        assert abs(float(nm.covariance.trace()) - tr_sigma) < REL * tr_sigma


@pytest.mark.parametrize("dtype", LOW)
def test_gld_hessian_steps_on_a_16bit_model(dtype: torch.dtype) -> None:
    low, _ = _problems(dtype)
    theta0 = low.theta()
    opt = sgdnoise.make_optimizer("gld_hessian", low, 0.01, generator=0, batch_size=4, k=2)
    opt.step()
    opt.step()
    theta = low.theta()
    assert theta.dtype == dtype and bool(torch.isfinite(theta).all())
    assert not torch.equal(theta, theta0)
    assert opt.last is not None and opt.last.noise_norm > 0


@pytest.mark.parametrize("dtype", LOW)
def test_alignment_on_a_16bit_model_matches_float64(dtype: torch.dtype) -> None:
    low, ref = _problems(dtype)
    H = dense_hessian(ref)
    S = dense_sigma(ref, 2)
    lam, U = torch.linalg.eigh(H)
    u1 = U[:, -1]
    a_ref = float(u1 @ S @ u1) * float(torch.trace(H)) / (float(lam[-1]) * float(torch.trace(S)))
    res = sgdnoise.alignment(low, 2, 1, generator=0)
    assert abs(res.a - a_ref) < 2 * REL * abs(a_ref)
    assert abs(res.lambda_1 - float(lam[-1])) < REL * float(lam[-1])


@pytest.mark.parametrize("dtype", LOW)
def test_every_structure_draws_noise_in_the_model_dtype(dtype: torch.dtype) -> None:
    low, ref = _problems(dtype, n=16)
    b = 4
    tr_ref = float(torch.trace(dense_sigma(ref, b)))
    for name in sgdnoise.noise_structures():
        opts = {"k": 2} if name in ("leading", "hessian") else {}
        nm = sgdnoise.noise_model(name, low, b, **opts)
        draws = nm.sample(2, generator=0)
        assert draws.dtype == dtype and bool(torch.isfinite(draws).all()), name
        assert nm.covariance.dtype == dtype, name
        if name in ("dynamic", "diag", "full", "hessian", "hessian_top1"):
            # Tr Cov(n) = Tr Σ_b, within 16-bit accuracy of the float64 reference
            assert abs(float(nm.covariance.trace()) - tr_ref) < REL * tr_ref, name


@pytest.mark.parametrize("dtype", LOW)
def test_escape_indicator_on_a_16bit_model_matches_float64(dtype: torch.dtype) -> None:
    low, ref = _problems(dtype)
    H, S = dense_hessian(ref), dense_sigma(ref, 2)
    tr_HS, tr_H = float(torch.trace(H @ S)), float(torch.trace(H))
    # Tr H by Hutch++ (the 16-bit QR path), with a sketch of every direction: exact up to rounding
    res = sgdnoise.escape_indicator(low, 2, exact_trace_max_dim=10, trace_matvecs=3 * low.dim)
    assert not res.tr_H_exact
    assert abs(res.tr_H - tr_H) < REL * tr_H
    assert abs(res.tr_HS - tr_HS) < REL * tr_HS
