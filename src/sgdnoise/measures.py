"""The paper's measurements: the escape indicator Tr(HΣ), alignment, expected sharpness.

The measures take operators (:func:`tr_HS`, :func:`hessian_trace`, :func:`alignment` with
``(H, S, k)``); :func:`escape_indicator` and the ``alignment(problem, b, k)`` form are short
wrappers that build H and Σ_b once from a :class:`~sgdnoise.Problem` (through a
:class:`MeasurementContext`, which shares them between measures at the same θ).

All quantities use the conventions of :mod:`sgdnoise.problem` and
:mod:`sgdnoise.linalg.covariance`: ``Σ_b`` is the gradient-level covariance of a size-b
mini-batch mean gradient (``Σ_1 = (1/N) Σ_i c_i c_iᵀ``, ``c_i = g_i − ḡ``), ``H = ∇²L``.
Source: Zhu, Wu, Yu, Wu & Ma, ICML 2019 (indicator: Eq. 6 and Theorem 3.1; alignment:
Proposition 1).
"""

from __future__ import annotations

import warnings

import torch

from ._measure_context import MeasurementContext, _context, at_theta
from ._utils import resolve_generator
from .linalg.covariance import GradientNoiseCovariance, batch_scale
from .linalg.lanczos import EigenPairs, top_eigenpairs
from .linalg.operators import LinearOperator, check_operator
from .linalg.trace import (
    EXACT_TRACE_MAX_DIM,
    TraceEstimate,
    check_num_samples,
    hessian_trace,
    quadratic_forms,
    sampled_tr_HS,
    tr_HS,
)
from .problem import Problem
from .results import Alignment, EscapeIndicator, ExpectedSharpness
from .sharpness import expected_sharpness

__all__ = [
    "EXACT_TRACE_MAX_DIM",
    "Alignment",
    "EscapeIndicator",
    "ExpectedSharpness",
    "MeasurementContext",
    "alignment",
    "at_theta",
    "escape_indicator",
    "expected_sharpness",
    "hessian_trace",
    "tr_HS",
]


def _indicator_tr_HS(
    ctx: MeasurementContext,
    cov: GradientNoiseCovariance,
    num_samples: int | None,
    gen: torch.Generator,
    block_size: int,
) -> TraceEstimate:
    """``Tr(H Σ_b)``: the context's cached exact quadratic forms, or m sampled examples."""
    N = ctx.problem.num_samples
    if num_samples is None or num_samples == N:
        q = ctx.quadratic_forms(block_size)
        return TraceEstimate(float(q.double().mean()) * cov.scale, 0.0, N, "exact")
    idx = torch.randperm(N, generator=gen, device=gen.device)[:num_samples].to(cov.device)
    return sampled_tr_HS(quadratic_forms(ctx.hessian, cov, idx, block_size), N, cov.scale)


def _trace_policy(
    est: TraceEstimate, D: int, trace_matvecs: int | None, exact_trace: bool | None
) -> tuple[int, bool | None]:
    """``(Hutch++ budget, exact)`` for Tr(H) next to an exact or a sampled ``Tr(HΣ)``."""
    if est.method == "exact":
        return (99 if trace_matvecs is None else trace_matvecs), exact_trace
    budget = max(est.num_matvecs, 6) if trace_matvecs is None else trace_matvecs
    # Exact when D is within the budget: it costs no more than the estimate.
    return budget, (D <= budget) if exact_trace is None else exact_trace


def _warn_unresolved_trace(tr_H: float, stderr: float, exact: bool, budget: int) -> None:
    """Warn when an estimated Tr(H)'s standard error exceeds its size."""
    if exact or stderr <= abs(tr_H):
        return
    warnings.warn(
        f"escape_indicator: Tr(H) = {tr_H:.4g} ± {stderr:.2g} from {budget} Hutch++ products is "
        "not resolved (its standard error exceeds its size), so the isotropic equivalent "
        "Tr(H)Tr(Σ_b)/D and the ratio are noise at this budget, even in sign (and an error "
        "estimated from so few products can itself be far off). Raise trace_matvecs (now "
        f"{budget}) or pass exact_trace=True (D products).",
        RuntimeWarning,
        stacklevel=3,
    )


def escape_indicator(
    problem: Problem,
    batch_size: int = 1,
    *,
    num_samples: int | None = None,
    seed: int | None = 0,
    generator: torch.Generator | int | None = None,
    replacement: bool = True,
    block_size: int = 32,
    exact_trace_max_dim: int = EXACT_TRACE_MAX_DIM,
    trace_matvecs: int | None = None,
    exact_trace: bool | None = None,
    context: MeasurementContext | None = None,
) -> EscapeIndicator:
    """The escape indicator ``Tr(H Σ_b)`` and its isotropic equivalent ``Tr(H) Tr(Σ_b) / D``.

    Builds H and Σ_b once (or takes them from ``context``) and evaluates :func:`tr_HS`,
    ``Tr Σ_b`` and :func:`hessian_trace` on them. Exact mode (``num_samples=None``):
    ``Tr(H Σ_1) = (1/N) Σ_i c_iᵀ H c_i`` with N Hessian-vector products, ``block_size`` at a
    time — never a D×D matrix. Sampled mode (``num_samples=m``): m examples drawn uniformly
    without replacement; unbiased, standard error with the finite-population correction
    ``√(1 − m/N)``. ``ḡ`` and ``Tr(Σ_b)`` are always exact.
    ``Tr(H)`` (``tr_H_exact`` says how it was obtained, ``tr_H_stderr`` its standard error):
    exact mode: exact (D products) when D ≤ ``exact_trace_max_dim``, else Hutch++ from
    ``trace_matvecs`` (default 99) products; sampled mode: Hutch++ from ``trace_matvecs``
    products, by default ``max(m, 6)`` (about ``2m`` Hessian products in all, whatever D),
    exact when D is within that budget. ``exact_trace=True``/``False`` forces either.

    Args:
        problem: model, loss and data, at the model's current parameters.
        batch_size: mini-batch size b of the SGD noise (``Σ_b``), in ``[1, N]``.
        num_samples: ``None`` for exact, or the number m ∈ [2, N] of sampled examples.
        seed, generator: randomness for sampling examples, then for Hutch++ (the generator wins;
            else a fresh generator seeded with ``seed``, default 0).
        replacement: whether SGD's mini-batches are drawn with replacement (scales ``Σ_b``).
        block_size: Hessian products per batch (fewer where that many columns of D numbers
            exceed 256 MB, ``linalg.trace.BLOCK_BYTES``).
        exact_trace_max_dim, trace_matvecs, exact_trace: Tr(H) policy (see above).
        context: a :class:`MeasurementContext` for this problem: Σ_b, Tr Σ_b, Tr H and the exact
            quadratic forms computed by earlier calls at the same θ are reused (``None``: none).

    Returns:
        :class:`~sgdnoise.results.EscapeIndicator`: Python floats (``tr_HS`` in loss units per
        squared parameter unit times squared gradient units), with standard errors; ``ratio``
        is dimensionless and ``ratio_stderr`` its standard error.

    Raises:
        ValueError: b outside ``[1, N]``, ``num_samples`` outside ``[2, N]``, or a context made
            for another problem. RuntimeError: BatchNorm/dropout in training mode.

    Source: Zhu et al. (ICML 2019), Eq. 6 (indicator) and Sec. 3.2 (isotropic equivalent Σ̄).
    """
    N, D = problem.num_samples, problem.dim
    batch_scale(N, batch_size, replacement)  # validates b
    gen = resolve_generator(seed, generator)
    check_num_samples(num_samples, N)
    ctx = _context(context, problem, "escape_indicator")
    cov = ctx.covariance(batch_size, replacement)
    tr_S = ctx.noise_trace(batch_size, replacement)
    est = _indicator_tr_HS(ctx, cov, num_samples, gen, block_size)
    budget, want_exact = _trace_policy(est, D, trace_matvecs, exact_trace)
    tr_H, tr_H_se, tr_H_exact = ctx.hessian_trace(
        exact_max_dim=exact_trace_max_dim, num_matvecs=budget, generator=gen, exact=want_exact
    )
    _warn_unresolved_trace(tr_H, tr_H_se, tr_H_exact, budget)
    iso = tr_H * tr_S / D
    return EscapeIndicator(
        tr_HS=est.value,
        tr_HS_iso=iso,
        ratio=est.value / iso if iso != 0 else float("nan"),
        tr_H=tr_H,
        tr_S=tr_S,
        dim=D,
        batch_size=batch_size,
        num_samples=est.num_matvecs,
        exact=est.method == "exact",
        stderr=est.stderr,
        tr_H_exact=tr_H_exact,
        tr_H_stderr=tr_H_se,
    )


def _check_k(k: int, D: int, N: int | None) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= D:
        raise ValueError(f"k must be an integer in [1, D] = [1, {D}], got {k!r}")
    if N is not None and k > N - 1:
        raise ValueError(
            f"alignment: k = {k} exceeds the rank of Σ (at most N − 1 = {N - 1} for N = {N} "
            f"samples), so its top-{k} eigenspace is not defined; pass k ≤ {max(N - 1, 1)}"
            + (" with more samples" if N <= 1 else "")
        )


def _check_noise_rank(noise: EigenPairs, k: int, dtype: torch.dtype, N: int | None) -> None:
    """Refuse k above the numerical rank of Σ (its k-th eigenvalue numerically zero)."""
    mu = noise.eigenvalues
    mu1, muk = float(mu[0]), float(mu[-1])
    floor = max(noise.tol**2, 10 * torch.finfo(dtype).eps) * mu1
    if muk <= floor:
        rank = int((mu > floor).sum())
        bound = (
            "" if N is None else f" (≤ N − 1 = {N - 1}; duplicated or equivalent samples lower it)"
        )
        raise ValueError(
            f"alignment: k = {k} exceeds the numerical rank of Σ: its {k}-th eigenvalue is "
            f"numerically zero ({muk:.3g} vs μ₁ = {mu1:.3g}, floor {floor:.3g}), Σ has "
            f"numerical rank {rank}{bound}, so its top-{k} eigenspace is not defined; "
            f"pass k ≤ {rank}"
        )


def _alignment_of(
    hess: EigenPairs,
    noise: EigenPairs,
    S: LinearOperator,
    tr_H: float,
    tr_H_exact: bool,
    tr_S: float,
    k: int,
    tr_H_stderr: float = 0.0,
) -> Alignment:
    """``a`` and the overlap from the top eigenpairs of H and Σ and the two traces."""
    lam, U_H = hess
    mu, U_S = noise
    sigma_zero = tr_S == 0 or float(mu[0]) <= 0
    # Eigenvectors come back in float32 for 16-bit models: products need the operator's dtype.
    u1 = U_H[:, 0]
    u1_S_u1 = float(u1.double() @ (S @ u1.to(S.dtype)).double())
    lam1 = float(lam[0])
    nan = float("nan")
    return Alignment(
        a=u1_S_u1 * tr_H / (lam1 * tr_S) if lam1 != 0 and tr_S != 0 else nan,
        overlap=nan if sigma_zero else float((U_H.T @ U_S).double().pow(2).sum()) / k,
        k=k,
        lambda_1=lam1,
        u1_S_u1=u1_S_u1,
        tr_H=tr_H,
        tr_S=tr_S,
        tr_H_exact=tr_H_exact,
        hessian_eigenvalues=lam.tolist(),
        noise_eigenvalues=mu.tolist(),
        tr_H_stderr=tr_H_stderr,
    )


def alignment(
    H: Problem | LinearOperator,
    S: LinearOperator | int | None = None,
    k: int = 1,
    *,
    batch_size: int | None = None,
    seed: int | None = 0,
    generator: torch.Generator | int | None = None,
    replacement: bool = True,
    tol: float | None = None,
    exact_trace_max_dim: int = EXACT_TRACE_MAX_DIM,
    trace_matvecs: int = 99,
    context: MeasurementContext | None = None,
) -> Alignment:
    """Proposition 1's alignment coefficient and the overlap of the top-k eigenspaces.

    ``a = u₁ᵀ Σ u₁ · Tr(H) / (λ₁ · Tr(Σ))`` with ``(λ₁, u₁)`` the top eigenpair of H, and
    ``overlap = ‖U_Hᵀ U_Σ‖_F² / k`` with ``U_H``, ``U_Σ`` the top-k eigenvectors of H and Σ
    (Lanczos on both). ``a`` does not depend on b (Σ_b scales out).

    Two call forms: ``alignment(H, S, k)`` on two symmetric operators (e.g. a Hessian or
    Gauss–Newton operator and a noise covariance; ``Tr S`` from ``S.trace()``), and
    ``alignment(problem, b, k)`` (or ``batch_size=b``) on H and Σ_b of a
    :class:`~sgdnoise.Problem` at its current θ, shared with ``context`` when given.

    The top-k eigenspace of Σ is defined only for k up to its rank (at most ``min(N − 1, D)``
    for N centred per-sample gradients), so k is refused above N − 1 (noise covariances) and
    when the computed k-th eigenvalue of Σ is numerically zero relative to the first
    (``μ_k ≤ max(tol², 10 ε) μ_1``, ε the machine epsilon of the dtype). When Σ = 0 altogether
    (b = N without replacement, or equal per-sample gradients) ``a`` and ``overlap`` are NaN.

    Args:
        H: a symmetric operator ``[D, D]``, or a :class:`~sgdnoise.Problem`.
        S: a symmetric PSD operator ``[D, D]`` (operator form), or the mini-batch size b
            (problem form; default 1).
        k: eigenspace dimension, in ``[1, D]``.
        batch_size: b by keyword (problem form).
        seed, generator: randomness of the Lanczos starts and Hutch++ (the generator wins; else
            a fresh generator seeded with ``seed``, default 0).
        replacement: SGD's mini-batch sampling (problem form).
        tol: Lanczos relative tolerance (``None``: the dtype's default).
        exact_trace_max_dim, trace_matvecs: Tr(H) policy, as in :func:`hessian_trace`.
        context: problem form only; reuses H, Σ_b, their eigenpairs and traces.

    Returns:
        :class:`~sgdnoise.results.Alignment` (Python floats; eigenvalues as lists).

    Raises:
        ValueError: k outside ``[1, D]``, or above the (numerical) rank of Σ (the message gives
            the rank; pass a smaller k). TypeError: S is not an operator in the operator form.

    Source: Zhu et al. (ICML 2019), Proposition 1 (condition 2: ``u₁ᵀΣu₁ ≥ a λ₁ Tr Σ / Tr H``).
    """
    if isinstance(H, Problem):
        b = batch_size if batch_size is not None else (1 if S is None else S)
        opts = (replacement, tol, exact_trace_max_dim, trace_matvecs, context)
        return _problem_alignment(H, b, k, *opts, seed=seed, generator=generator)
    check_operator(H, "H", "alignment(H, S, k)")
    if not isinstance(S, LinearOperator):
        raise TypeError(
            f"alignment(H, S, k): S must be a LinearOperator like H, got {type(S).__name__}; "
            "for a Problem call alignment(problem, batch_size, k)"
        )
    N = S.problem.num_samples if isinstance(S, GradientNoiseCovariance) else None
    _check_k(k, H.shape[0], N)
    gen = resolve_generator(seed, generator)
    hess = top_eigenpairs(H, k, tol=tol, generator=gen)
    noise = top_eigenpairs(S, k, tol=tol, generator=gen)
    tr_S = float(S.trace())
    if tr_S != 0 and float(noise.eigenvalues[0]) > 0 and k > 1:
        _check_noise_rank(noise, k, H.dtype, N)
    tr_H, tr_H_se, tr_H_exact = hessian_trace(
        H, exact_max_dim=exact_trace_max_dim, num_matvecs=trace_matvecs, generator=gen
    )
    return _alignment_of(hess, noise, S, tr_H, tr_H_exact, tr_S, k, tr_H_se)


def _problem_alignment(
    problem: Problem,
    batch_size: object,
    k: int,
    replacement: bool,
    tol: float | None,
    exact_trace_max_dim: int,
    trace_matvecs: int,
    context: MeasurementContext | None,
    *,
    seed: int | None,
    generator: torch.Generator | int | None,
) -> Alignment:
    """The problem form of :func:`alignment`: H and Σ_b from (and cached in) a context."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
        raise TypeError(f"alignment(problem, b, k): b must be an int, got {batch_size!r}")
    _check_k(k, problem.dim, problem.num_samples)
    gen = resolve_generator(seed, generator)
    ctx = _context(context, problem, "alignment")
    cov = ctx.covariance(batch_size, replacement)
    hess = ctx.top_eigenpairs(k, of="hessian", tol=tol, generator=gen)
    noise = ctx.top_eigenpairs(
        k, of="noise", tol=tol, generator=gen, batch_size=batch_size, replacement=replacement
    )
    tr_S = ctx.noise_trace(batch_size, replacement)
    if tr_S != 0 and float(noise.eigenvalues[0]) > 0 and k > 1:
        _check_noise_rank(noise, k, problem.dtype, problem.num_samples)
    tr_H, tr_H_se, tr_H_exact = ctx.hessian_trace(
        exact_max_dim=exact_trace_max_dim, num_matvecs=trace_matvecs, generator=gen
    )
    return _alignment_of(hess, noise, cov, tr_H, tr_H_exact, tr_S, k, tr_H_se)
