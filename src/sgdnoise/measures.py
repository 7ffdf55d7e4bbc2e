"""The paper's measurements: the escape indicator Tr(HΣ), alignment, expected sharpness.

All quantities use the conventions of :mod:`sgdnoise.problem` and
:mod:`sgdnoise.linalg.covariance`: ``Σ_b`` is the gradient-level covariance of a size-b
mini-batch mean gradient (``Σ_1 = (1/N) Σ_i c_i c_iᵀ``, ``c_i = g_i − ḡ``), ``H = ∇²L``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._utils import as_generator, check_finite, randn
from .linalg.covariance import GradientNoiseCovariance, batch_scale
from .linalg.hessian import HessianOperator
from .linalg.lanczos import top_eigenpairs
from .linalg.trace import trace_estimate
from .problem import Problem

__all__ = [
    "Alignment",
    "EscapeIndicator",
    "ExpectedSharpness",
    "alignment",
    "escape_indicator",
    "expected_sharpness",
    "hessian_trace",
]

#: Tr(H) is computed exactly (D products) up to this dimension, estimated with Hutch++ above it.
EXACT_TRACE_MAX_DIM = 2048


@dataclass(frozen=True)
class _Result:
    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class EscapeIndicator(_Result):
    """Tr(HΣ_b) against its isotropic equivalent.

    Attributes:
        tr_HS: ``Tr(H Σ_b)`` (exact, or an unbiased estimate when ``exact`` is False).
        tr_HS_iso: ``Tr(H Σ̄) = Tr(H) · Tr(Σ_b) / D``, with ``Σ̄ = (Tr Σ_b / D) I`` of equal trace.
        ratio: ``tr_HS / tr_HS_iso``.
        tr_H, tr_S: ``Tr(H)`` and ``Tr(Σ_b)`` (the latter always exact).
        dim: D. batch_size: b. num_samples: examples used for Tr(HΣ) (N when exact).
        exact: whether ``tr_HS`` is exact. stderr: its standard error (0.0 when exact).
        tr_H_exact: whether ``Tr(H)`` is exact (D products) or a Hutch++ estimate.
        tr_H_stderr: standard error of ``tr_H`` (0.0 when exact).
    """

    tr_HS: float
    tr_HS_iso: float
    ratio: float
    tr_H: float
    tr_S: float
    dim: int
    batch_size: int
    num_samples: int
    exact: bool
    stderr: float
    tr_H_exact: bool
    tr_H_stderr: float


@dataclass(frozen=True)
class Alignment(_Result):
    """Proposition 1's alignment of Σ_b with H.

    Attributes:
        a: ``u₁ᵀ Σ_b u₁ · Tr(H) / (λ₁ · Tr(Σ_b))`` (condition 2 holds with this coefficient).
        overlap: ``‖U_Hᵀ U_Σ‖_F² / k`` of the top-k eigenspaces (1 = identical, k/D = random).
        k: eigenspace dimension. lambda_1: top Hessian eigenvalue. u1_S_u1: ``u₁ᵀ Σ_b u₁``.
        tr_H, tr_S: traces; tr_H_exact: whether ``Tr(H)`` is exact.
        hessian_eigenvalues, noise_eigenvalues: top-k eigenvalues of H and Σ_b.
    """

    a: float
    overlap: float
    k: int
    lambda_1: float
    u1_S_u1: float
    tr_H: float
    tr_S: float
    tr_H_exact: bool
    hessian_eigenvalues: list[float]
    noise_eigenvalues: list[float]


@dataclass(frozen=True)
class ExpectedSharpness(_Result):
    """Expected sharpness under isotropic Gaussian perturbations ν ~ N(0, σ² I).

    Attributes:
        signed: the poster's ``E_ν[L(θ+ν)] − L(θ)`` (Monte-Carlo mean).
        absolute: the released code's ``E_ν|L(θ+ν) − L(θ)|``.
        signed_stderr, absolute_stderr: standard errors of the two means.
        loss: ``L(θ)``. sigma: σ. num_samples: number of draws.
    """

    signed: float
    absolute: float
    signed_stderr: float
    absolute_stderr: float
    loss: float
    sigma: float
    num_samples: int


def hessian_trace(
    H: HessianOperator,
    *,
    exact_max_dim: int = EXACT_TRACE_MAX_DIM,
    num_matvecs: int = 99,
    generator: torch.Generator | int | None = None,
) -> tuple[float, float, bool]:
    """``(Tr H, stderr, exact)``: exact from D products when D ≤ ``exact_max_dim``, else Hutch++."""
    D = H.shape[0]
    if D <= exact_max_dim:
        return float(H.to_dense(max_dim=exact_max_dim).diagonal().sum()), 0.0, True
    est = trace_estimate(
        H,
        num_matvecs,
        method="hutch++",
        generator=as_generator(0 if generator is None else generator),
    )
    return est.value, est.stderr, False


def _quadratic_forms(H: HessianOperator, C: torch.Tensor, block: int) -> torch.Tensor:
    """``c_iᵀ H c_i`` for the rows c_i of ``C`` ``[n, D]``, ``block`` Hessian products at a time."""
    out = []
    for start in range(0, C.shape[0], block):
        Cb = C[start : start + block]
        out.append((Cb.T * (H @ Cb.T.contiguous())).sum(0))
    return torch.cat(out)


def escape_indicator(
    problem: Problem,
    batch_size: int = 1,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | int | None = None,
    replacement: bool = True,
    block_size: int = 32,
    exact_trace_max_dim: int = EXACT_TRACE_MAX_DIM,
    trace_matvecs: int = 99,
) -> EscapeIndicator:
    """The escape indicator ``Tr(H Σ_b)`` and its isotropic equivalent ``Tr(H) Tr(Σ_b) / D``.

    Exact mode (``num_samples=None``): ``Tr(H Σ_1) = (1/N) Σ_i c_iᵀ H c_i`` with N Hessian-vector
    products, batched ``block_size`` at a time — never a D×D matrix. Sampled mode
    (``num_samples=m``): m examples drawn uniformly without replacement from ``generator``;
    ``(s/m) Σ_{i∈S} c_iᵀ H c_i`` is unbiased for ``Tr(H Σ_b)`` and its standard error carries the
    finite-population correction ``√(1 − m/N)``. ``ḡ`` is always the exact full gradient, and
    ``Tr(Σ_b)`` is always exact (one per-sample gradient pass).

    ``Tr(H)`` is exact (D products) when D ≤ ``exact_trace_max_dim``, otherwise a Hutch++
    estimate from ``trace_matvecs`` products (``tr_H_exact`` says which).

    Args:
        problem: model, loss and data, at the model's current parameters.
        batch_size: mini-batch size b of the SGD noise (``Σ_b``).
        num_samples: ``None`` for exact, or the number m ≥ 2 of sampled examples.
        generator: randomness for sampling examples and for Hutch++ (``None``: seed 0).
        replacement: whether SGD's mini-batches are drawn with replacement (scales ``Σ_b``).
        block_size: Hessian products per batch.
        exact_trace_max_dim, trace_matvecs: Tr(H) policy (see above).
    """
    N, D = problem.num_samples, problem.dim
    s = batch_scale(N, batch_size, replacement)
    gen = as_generator(0 if generator is None else generator)
    if num_samples is not None and (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, int)
        or not 2 <= num_samples <= N
    ):
        raise ValueError(
            f"num_samples must be None (exact) or an integer in [2, N] = [2, {N}], got {num_samples!r}"
        )
    H = HessianOperator(problem)
    cov = GradientNoiseCovariance(problem, batch_size, replacement)
    tr_S = float(cov.trace())
    if num_samples is None or num_samples == N:
        if cov.centered is not None:
            q = _quadratic_forms(H, cov.centered, block_size)
        else:
            parts = []
            for start in range(0, N, block_size):
                idx = torch.arange(start, min(N, start + block_size), device=problem.device)
                C = problem.per_sample_gradients(idx, theta=cov.theta) - cov.mean_gradient
                parts.append(_quadratic_forms(H, C, block_size))
            q = torch.cat(parts)
        tr_HS, stderr, m, exact = float(q.double().mean()) * s, 0.0, N, True
    else:
        m = num_samples
        idx = torch.randperm(N, generator=gen, device=gen.device)[:m].to(problem.device)
        if cov.centered is not None:
            C = cov.centered[idx]
        else:
            C = problem.per_sample_gradients(idx, theta=cov.theta) - cov.mean_gradient
        q = _quadratic_forms(H, C, block_size).double()
        fpc = (1.0 - m / N) ** 0.5
        tr_HS, stderr, exact = float(q.mean()) * s, float(q.std() / m**0.5) * s * fpc, False
    tr_H, tr_H_se, tr_H_exact = hessian_trace(
        H, exact_max_dim=exact_trace_max_dim, num_matvecs=trace_matvecs, generator=gen
    )
    tr_HS_iso = tr_H * tr_S / D
    ratio = tr_HS / tr_HS_iso if tr_HS_iso != 0 else float("nan")
    return EscapeIndicator(
        tr_HS=tr_HS,
        tr_HS_iso=tr_HS_iso,
        ratio=ratio,
        tr_H=tr_H,
        tr_S=tr_S,
        dim=D,
        batch_size=batch_size,
        num_samples=m,
        exact=exact,
        stderr=stderr,
        tr_H_exact=tr_H_exact,
        tr_H_stderr=tr_H_se,
    )


def alignment(
    problem: Problem,
    batch_size: int = 1,
    k: int = 1,
    *,
    generator: torch.Generator | int | None = None,
    replacement: bool = True,
    tol: float | None = None,
    exact_trace_max_dim: int = EXACT_TRACE_MAX_DIM,
    trace_matvecs: int = 99,
) -> Alignment:
    """Proposition 1's alignment coefficient and the overlap of the top-k eigenspaces.

    ``a = u₁ᵀ Σ_b u₁ · Tr(H) / (λ₁ · Tr(Σ_b))`` with ``(λ₁, u₁)`` the top Hessian eigenpair, and
    ``overlap = ‖U_Hᵀ U_Σ‖_F² / k`` with ``U_H``, ``U_Σ`` the top-k eigenvectors of H and Σ_b
    (Lanczos on both, from ``generator``). ``a`` does not depend on b (Σ_b scales out).

    The top-k eigenspace of Σ_b is defined only for k up to its rank, which is at most
    ``min(N − 1, D)`` (N centred per-sample gradients sum to zero); beyond it any basis of the null
    space would do and the overlap would change with the seed. So k is refused when it exceeds
    N − 1, and also when the computed k-th eigenvalue of Σ_b is numerically zero relative to the
    first (``μ_k ≤ max(tol², 10 ε) μ_1``, with ``tol`` the Lanczos tolerance used and ε the
    machine epsilon of the model's dtype: e.g. duplicated samples lower the rank). When Σ_b = 0
    altogether (b = N without replacement, or equal per-sample gradients) ``a`` and ``overlap``
    are NaN.

    Raises:
        ValueError: k outside ``[1, D]``, or above the (numerical) rank of Σ_b (the message gives
            the rank; pass a smaller k).
    """
    D, N = problem.dim, problem.num_samples
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= D:
        raise ValueError(f"k must be an integer in [1, D] = [1, {D}], got {k!r}")
    if k > N - 1:
        raise ValueError(
            f"alignment: k = {k} exceeds the rank of Σ (at most N − 1 = {N - 1} for N = {N} "
            f"samples), so its top-{k} eigenspace is not defined; pass k ≤ {max(N - 1, 1)}"
            + (" with more samples" if N <= 1 else "")
        )
    gen = as_generator(0 if generator is None else generator)
    H = HessianOperator(problem)
    cov = GradientNoiseCovariance(problem, batch_size, replacement)
    lam, U_H = top_eigenpairs(H, k, tol=tol, generator=gen)
    noise_pairs = top_eigenpairs(cov, k, tol=tol, generator=gen)
    mu, U_S = noise_pairs
    tr_S = float(cov.trace())
    mu1, muk = float(mu[0]), float(mu[-1])
    sigma_zero = tr_S == 0 or mu1 <= 0
    if not sigma_zero and k > 1:
        floor = max(noise_pairs.tol**2, 10 * torch.finfo(problem.dtype).eps) * mu1
        if muk <= floor:
            rank = int((mu > floor).sum())
            raise ValueError(
                f"alignment: k = {k} exceeds the numerical rank of Σ: its {k}-th eigenvalue is "
                f"numerically zero ({muk:.3g} vs μ₁ = {mu1:.3g}, floor {floor:.3g}), Σ has "
                f"numerical rank {rank} (≤ N − 1 = {N - 1}; duplicated or equivalent samples "
                f"lower it), so its top-{k} eigenspace is not defined; pass k ≤ {rank}"
            )
    tr_H, _, tr_H_exact = hessian_trace(
        H, exact_max_dim=exact_trace_max_dim, num_matvecs=trace_matvecs, generator=gen
    )
    # Eigenvectors come back in float32 for 16-bit models: products need the operator's dtype.
    u1 = U_H[:, 0]
    u1_S_u1 = float(u1.double() @ (cov @ u1.to(cov.dtype)).double())
    lam1 = float(lam[0])
    nan = float("nan")
    a = u1_S_u1 * tr_H / (lam1 * tr_S) if lam1 != 0 and tr_S != 0 else nan
    overlap = nan if sigma_zero else float((U_H.T @ U_S).double().pow(2).sum()) / k
    return Alignment(
        a=a,
        overlap=overlap,
        k=k,
        lambda_1=lam1,
        u1_S_u1=u1_S_u1,
        tr_H=tr_H,
        tr_S=tr_S,
        tr_H_exact=tr_H_exact,
        hessian_eigenvalues=lam.tolist(),
        noise_eigenvalues=mu.tolist(),
    )


def expected_sharpness(
    problem: Problem,
    sigma: float,
    num_samples: int,
    *,
    generator: torch.Generator | int,
    draws_per_batch: int = 16,
    vectorize: bool | None = None,
) -> ExpectedSharpness:
    """Expected sharpness ``E_ν[L(θ+ν)] − L(θ)`` and ``E_ν|L(θ+ν) − L(θ)|``, ν ~ N(0, σ² I_D).

    Draws are made ``draws_per_batch`` at a time and evaluated either with one vmapped forward
    pass over the data (``vectorize=True``) or one plain forward pass per draw (``False``). The
    model is never modified: its parameters are bit-for-bit unchanged afterwards.

    Args:
        problem: model, loss and data (the training loss L).
        sigma: perturbation standard deviation σ > 0 (the poster uses 0.01).
        num_samples: number of draws (the poster uses 1000), ≥ 2.
        generator: a ``torch.Generator`` or int seed.
        draws_per_batch: draws made (and, vectorized, evaluated) at once; memory ∝ draws × chunk
            of data. The draws do not depend on ``vectorize``.
        vectorize: vmap the forward pass over the draws. ``None`` (default) picks ``False`` for
            models with convolutions — vmap turns a convolution with per-draw weights into a
            grouped convolution, which is slower on CPU than separate passes — and ``True``
            otherwise.
    """
    if not (
        isinstance(sigma, int | float) and sigma > 0 and sigma == sigma and sigma != float("inf")
    ):
        raise ValueError(
            f"sigma must be a positive finite number (the perturbation std), got {sigma!r}"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(
            f"num_samples must be an integer >= 2 (number of draws), got {num_samples!r}"
        )
    if not isinstance(draws_per_batch, int) or draws_per_batch < 1:
        raise ValueError(f"draws_per_batch must be a positive integer, got {draws_per_batch!r}")
    if vectorize is None:
        vectorize = not any(isinstance(m, nn.modules.conv._ConvNd) for m in problem.model.modules())
    gen = as_generator(generator)
    theta = problem.theta()
    L0 = problem.loss(theta)
    diffs = []
    for start in range(0, num_samples, draws_per_batch):
        B = min(draws_per_batch, num_samples - start)
        nu = randn((B, problem.dim), generator=gen, dtype=problem.dtype, device=problem.device)
        thetas = theta[None, :] + sigma * nu
        if vectorize:
            losses = problem.batched_loss(thetas)
        else:
            with torch.no_grad():
                losses = torch.stack(
                    [
                        problem.reduce_mean(lambda x, y, th=th: problem._batch_loss(th, x, y))
                        for th in thetas
                    ]
                )
        diffs.append(losses - L0)
    d = torch.cat(diffs).double()
    check_finite(d, "a perturbed loss", "Lower sigma: the perturbed model produced NaN/inf.")
    m = d.numel()
    return ExpectedSharpness(
        signed=float(d.mean()),
        absolute=float(d.abs().mean()),
        signed_stderr=float(d.std() / m**0.5),
        absolute_stderr=float(d.abs().std() / m**0.5),
        loss=float(L0),
        sigma=float(sigma),
        num_samples=m,
    )
