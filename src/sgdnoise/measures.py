"""The paper's measurements: the escape indicator Tr(HΣ), alignment, expected sharpness.

All quantities use the conventions of :mod:`sgdnoise.problem` and
:mod:`sgdnoise.linalg.covariance`: ``Σ_b`` is the gradient-level covariance of a size-b
mini-batch mean gradient (``Σ_1 = (1/N) Σ_i c_i c_iᵀ``, ``c_i = g_i − ḡ``), ``H = ∇²L``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ._utils import as_generator, check_finite, randn
from .linalg.covariance import GradientNoiseCovariance, batch_scale
from .linalg.hessian import HessianOperator
from .linalg.lanczos import EigenPairs, default_tol, top_eigenpairs
from .linalg.trace import trace_estimate
from .problem import Problem

__all__ = [
    "Alignment",
    "EscapeIndicator",
    "ExpectedSharpness",
    "MeasurementContext",
    "alignment",
    "at_theta",
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
    exact: bool | None = None,
) -> tuple[float, float, bool]:
    """``(Tr H, stderr, exact)``.

    Args:
        H: the Hessian operator.
        exact_max_dim: with ``exact=None``, Tr H is exact (D products) when D ≤ this, else Hutch++.
        num_matvecs: Hutch++ budget (products).
        generator: randomness of Hutch++ (``None``: seed 0).
        exact: ``True`` always computes the exact trace (D products, in blocks of unit vectors —
            no D×D matrix above ``exact_max_dim``), ``False`` always estimates it with Hutch++
            from ``num_matvecs`` products, ``None`` (default) decides by ``exact_max_dim``.
    """
    D = H.shape[0]
    if exact is None:
        exact = D <= exact_max_dim
    if exact:
        if D <= exact_max_dim:
            return float(H.to_dense(max_dim=exact_max_dim).diagonal().sum()), 0.0, True
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, D, 256):
            stop = min(D, start + 256)
            E = torch.zeros(D, stop - start, dtype=H.dtype, device=H.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            total += (H @ E)[start:stop].diagonal().double().sum().cpu()
        return float(total), 0.0, True
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


class MeasurementContext:
    """Measurements at one θ that share their products: H, Σ_b, Tr H, Tr Σ_b, eigenpairs.

    ``escape_indicator``, ``alignment``, ``hessian_trace`` and ``top_eigenpairs`` called through
    one context (its methods, or the functions with ``context=``) reuse what an earlier call at
    the same θ computed instead of recomputing it:

    * one :class:`~sgdnoise.linalg.HessianOperator` (so ``context.hessian.num_products`` counts
      every Hessian product spent at this θ);
    * the noise covariance ``Σ_b`` per ``(batch_size, replacement)`` (its per-sample gradient
      pass) and its exact trace;
    * ``Tr H``: an exact value is reused by every later request (exact or not: it is better and
      free); a Hutch++ estimate is reused by a request for a Hutch++ estimate with a budget no
      larger than its own, else recomputed (and kept if its budget is larger);
    * the N quadratic forms ``c_iᵀ H c_i`` of the exact indicator (independent of b);
    * top eigenpairs of H or Σ_b: a result for ``(k', tol')`` serves any request with ``k ≤ k'``
      and ``tol ≥ tol'`` (its first k pairs).

    A reused quantity equals the one the first call computed, bit for bit; a call served from the
    cache draws nothing from its generator, so later *random* quantities in the same call may
    differ from an uncached call (within their error bars). Exact quantities are identical.

    Never stale: every access compares the problem's current θ with the snapshot taken when the
    cache was filled and, if they differ (an optimizer step, ``set_theta``), drops everything and
    starts afresh at the new θ. :meth:`invalidate` does the same by hand (e.g. after changing the
    data in place, which the context cannot see). Usable as a context manager (the cache is freed
    on exit).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from sgdnoise.measures import MeasurementContext
        >>> import sgdnoise
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(16, 3, generator=g, dtype=torch.float64)
        >>> y = torch.randn(16, 1, generator=g, dtype=torch.float64)
        >>> problem = sgdnoise.Problem(nn.Linear(3, 1).double(), nn.functional.mse_loss, x, y)
        >>> with MeasurementContext(problem, batch_size=4) as m:
        ...     ind = m.escape_indicator()
        ...     before = m.hessian.num_products
        ...     al = m.alignment(k=1)  # reuses Tr H, Σ_b and its trace: only Lanczos products
        >>> ind.tr_H == al.tr_H
        True

    Args:
        problem: model, loss and data.
        batch_size: default mini-batch size b of ``Σ_b`` for the methods.
        replacement: default sampling of SGD's mini-batches.
    """

    def __init__(self, problem: Problem, batch_size: int = 1, *, replacement: bool = True) -> None:
        if not isinstance(problem, Problem):
            raise TypeError(
                f"MeasurementContext needs a sgdnoise.Problem, got {type(problem).__name__}"
            )
        batch_scale(problem.num_samples, batch_size, replacement)  # validates b
        self.problem = problem
        self.batch_size = batch_size
        self.replacement = bool(replacement)
        self.num_invalidations = 0
        self._fill_at_current_theta()

    # ------------------------------------------------------------------ cache state
    def _fill_at_current_theta(self) -> None:
        self._hessian = HessianOperator(self.problem)  # snapshots θ
        self._theta = self._hessian.theta
        self._covs: dict[tuple[int, bool], GradientNoiseCovariance] = {}
        self._tr_S: dict[tuple[int, bool], float] = {}
        self._tr_H: tuple[float, float, bool, int] | None = None  # value, stderr, exact, budget
        self._quad: torch.Tensor | None = None  # exact c_iᵀ H c_i, i = 1..N
        self._pairs: dict[object, EigenPairs] = {}

    def invalidate(self) -> None:
        """Drop every cached quantity and re-snapshot θ (done automatically when θ changes)."""
        self.num_invalidations += 1
        self._fill_at_current_theta()

    def _sync(self) -> None:
        theta = self.problem.theta()
        if not torch.equal(theta, self._theta):
            self.invalidate()

    def __enter__(self) -> MeasurementContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self._covs, self._pairs, self._quad = {}, {}, None

    def __repr__(self) -> str:
        return (
            f"MeasurementContext(D={self.problem.dim}, batch_size={self.batch_size}, "
            f"replacement={self.replacement}, hessian_products={self._hessian.num_products}, "
            f"cached={self._cached_names()})"
        )

    def _cached_names(self) -> list[str]:
        names = []
        if self._tr_H is not None:
            names.append("tr_H" + ("" if self._tr_H[2] else "~"))
        names += [f"sigma_b{b}" for b, _ in self._covs]
        if self._quad is not None:
            names.append("quadratic_forms")
        names += [f"eig_{key[0]}" for key in self._pairs]  # type: ignore[index]
        return names

    def _key(self, batch_size: int | None, replacement: bool | None) -> tuple[int, bool]:
        b = self.batch_size if batch_size is None else batch_size
        r = self.replacement if replacement is None else bool(replacement)
        return b, r

    # ------------------------------------------------------------------ shared quantities
    @property
    def hessian(self) -> HessianOperator:
        """The Hessian at the current θ (one operator per θ: its ``num_products`` counts all)."""
        self._sync()
        return self._hessian

    def covariance(
        self, batch_size: int | None = None, replacement: bool | None = None
    ) -> GradientNoiseCovariance:
        """``Σ_b`` at the current θ (one per ``(batch_size, replacement)``)."""
        self._sync()
        key = self._key(batch_size, replacement)
        if key not in self._covs:
            self._covs[key] = GradientNoiseCovariance(self.problem, key[0], key[1])
        return self._covs[key]

    def noise_trace(self, batch_size: int | None = None, replacement: bool | None = None) -> float:
        """Exact ``Tr Σ_b`` at the current θ."""
        key = self._key(batch_size, replacement)
        cov = self.covariance(*key)
        if key not in self._tr_S:
            self._tr_S[key] = float(cov.trace())
        return self._tr_S[key]

    def hessian_trace(
        self,
        *,
        exact_max_dim: int = EXACT_TRACE_MAX_DIM,
        num_matvecs: int = 99,
        generator: torch.Generator | int | None = None,
        exact: bool | None = None,
    ) -> tuple[float, float, bool]:
        """:func:`hessian_trace` at the current θ, cached as described in the class docstring."""
        H = self.hessian
        D = H.shape[0]
        want_exact = D <= exact_max_dim if exact is None else exact
        cached = self._tr_H
        if cached is not None and (
            cached[2] or (not want_exact and exact is not True and cached[3] >= num_matvecs)
        ):
            return cached[0], cached[1], cached[2]
        value, se, is_exact = hessian_trace(
            H,
            exact_max_dim=exact_max_dim,
            num_matvecs=num_matvecs,
            generator=generator,
            exact=exact,
        )
        if cached is None or is_exact or num_matvecs > cached[3]:
            self._tr_H = (value, se, is_exact, D if is_exact else num_matvecs)
        return value, se, is_exact

    def top_eigenpairs(
        self,
        k: int,
        *,
        of: str = "hessian",
        tol: float | None = None,
        generator: torch.Generator | int | None = None,
        batch_size: int | None = None,
        replacement: bool | None = None,
    ) -> EigenPairs:
        """Top-k eigenpairs of H (``of="hessian"``) or ``Σ_b`` (``of="noise"``), cached.

        A cached result for ``(k', tol')`` with ``k' ≥ k`` and ``tol' ≤ tol`` is reused (its first
        k pairs; ``num_matvecs`` is that of the computation that produced it).
        """
        if of == "hessian":
            op: Any = self.hessian
            key: tuple[object, ...] = ("hessian",)
        elif of == "noise":
            bkey = self._key(batch_size, replacement)
            op = self.covariance(*bkey)
            key = ("noise", *bkey)
        else:
            raise ValueError(f"of must be 'hessian' or 'noise', got {of!r}")
        want_tol = default_tol(op.dtype) if tol is None else tol
        hit = self._pairs.get(key)
        if hit is not None and hit.eigenvalues.numel() >= k and hit.tol <= want_tol:
            if hit.eigenvalues.numel() == k:
                return hit
            return EigenPairs(
                hit.eigenvalues[:k],
                hit.eigenvectors[:, :k],
                residuals=hit.residuals[:k],
                num_matvecs=hit.num_matvecs,
                converged=hit.converged,
                tol=hit.tol,
            )
        pairs = top_eigenpairs(
            op, k, tol=tol, generator=as_generator(0 if generator is None else generator)
        )
        if hit is None or pairs.eigenvalues.numel() >= hit.eigenvalues.numel():
            self._pairs[key] = pairs
        return pairs

    def quadratic_forms(self, block_size: int = 32) -> torch.Tensor:
        """The N values ``c_iᵀ H c_i`` (centred per-sample gradients; independent of b), cached."""
        self._sync()
        if self._quad is None:
            # Any Σ_b already made holds the same centred gradients (b only scales it).
            cov = next(iter(self._covs.values())) if self._covs else self.covariance()
            H, problem, N = self._hessian, self.problem, self.problem.num_samples
            if cov.centered is not None:
                self._quad = _quadratic_forms(H, cov.centered, block_size)
            else:
                parts = []
                for start in range(0, N, block_size):
                    idx = torch.arange(start, min(N, start + block_size), device=problem.device)
                    C = problem.per_sample_gradients(idx, theta=cov.theta) - cov.mean_gradient
                    parts.append(_quadratic_forms(H, C, block_size))
                self._quad = torch.cat(parts)
        return self._quad

    # ------------------------------------------------------------------ the measures
    def escape_indicator(self, batch_size: int | None = None, **kwargs: Any) -> EscapeIndicator:
        """:func:`escape_indicator` at the current θ, sharing this context's products."""
        b, r = self._key(batch_size, kwargs.pop("replacement", None))
        return escape_indicator(self.problem, b, replacement=r, context=self, **kwargs)

    def alignment(self, k: int = 1, batch_size: int | None = None, **kwargs: Any) -> Alignment:
        """:func:`alignment` at the current θ, sharing this context's products."""
        b, r = self._key(batch_size, kwargs.pop("replacement", None))
        return alignment(self.problem, b, k, replacement=r, context=self, **kwargs)


def at_theta(
    problem: Problem, batch_size: int = 1, *, replacement: bool = True
) -> MeasurementContext:
    """A :class:`MeasurementContext` at the problem's current θ:
    ``with at_theta(problem, 32) as m: m.escape_indicator(); m.alignment(k=5)``."""
    return MeasurementContext(problem, batch_size, replacement=replacement)


def _context(context: MeasurementContext | None, problem: Problem, who: str) -> MeasurementContext:
    if context is None:
        return MeasurementContext(problem)
    if not isinstance(context, MeasurementContext):
        raise TypeError(
            f"{who}: context must be a MeasurementContext, got {type(context).__name__}"
        )
    if context.problem is not problem:
        raise ValueError(
            f"{who}: the context was made for another Problem; make one with "
            "MeasurementContext(problem) for this problem"
        )
    return context


def escape_indicator(
    problem: Problem,
    batch_size: int = 1,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | int | None = None,
    replacement: bool = True,
    block_size: int = 32,
    exact_trace_max_dim: int = EXACT_TRACE_MAX_DIM,
    trace_matvecs: int | None = None,
    exact_trace: bool | None = None,
    context: MeasurementContext | None = None,
) -> EscapeIndicator:
    """The escape indicator ``Tr(H Σ_b)`` and its isotropic equivalent ``Tr(H) Tr(Σ_b) / D``.

    Exact mode (``num_samples=None``): ``Tr(H Σ_1) = (1/N) Σ_i c_iᵀ H c_i`` with N Hessian-vector
    products, batched ``block_size`` at a time — never a D×D matrix. Sampled mode
    (``num_samples=m``): m examples drawn uniformly without replacement from ``generator``;
    ``(s/m) Σ_{i∈S} c_iᵀ H c_i`` is unbiased for ``Tr(H Σ_b)`` and its standard error carries the
    finite-population correction ``√(1 − m/N)``. ``ḡ`` is always the exact full gradient, and
    ``Tr(Σ_b)`` is always exact (one per-sample gradient pass).

    ``Tr(H)`` (``tr_H_exact`` says how it was obtained, ``tr_H_stderr`` its standard error):

    * exact mode: exact (D products) when D ≤ ``exact_trace_max_dim``, otherwise a Hutch++
      estimate from ``trace_matvecs`` (default 99) products;
    * sampled mode: a Hutch++ estimate from ``trace_matvecs`` products, by default ``max(m, 6)``
      — comparable to the m products of the sample, so that the sampled indicator costs about
      ``2m`` Hessian products (plus the per-sample gradient pass) whatever D is, and not the D
      products of an exact trace. When ``D ≤`` that budget the trace is exact (it costs no more).
    * ``exact_trace=True`` forces the exact trace (D products), ``False`` forces Hutch++.

    Args:
        problem: model, loss and data, at the model's current parameters.
        batch_size: mini-batch size b of the SGD noise (``Σ_b``).
        num_samples: ``None`` for exact, or the number m ≥ 2 of sampled examples.
        generator: randomness for sampling examples and for Hutch++ (``None``: seed 0).
        replacement: whether SGD's mini-batches are drawn with replacement (scales ``Σ_b``).
        block_size: Hessian products per batch.
        exact_trace_max_dim, trace_matvecs, exact_trace: Tr(H) policy (see above).
        context: a :class:`MeasurementContext` for this problem: Σ_b, Tr Σ_b, Tr H and the exact
            quadratic forms computed by earlier calls at the same θ are reused (``None``: none).
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
    ctx = _context(context, problem, "escape_indicator")
    H = ctx.hessian
    cov = ctx.covariance(batch_size, replacement)
    tr_S = ctx.noise_trace(batch_size, replacement)
    sampled = not (num_samples is None or num_samples == N)
    if not sampled:
        q = ctx.quadratic_forms(block_size)
        tr_HS, stderr, m, exact = float(q.double().mean()) * s, 0.0, N, True
        budget = 99 if trace_matvecs is None else trace_matvecs
        want_exact = exact_trace
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
        budget = max(m, 6) if trace_matvecs is None else trace_matvecs
        # Exact when D is within the budget: it costs no more than the estimate.
        want_exact = (D <= budget) if exact_trace is None else exact_trace
    tr_H, tr_H_se, tr_H_exact = ctx.hessian_trace(
        exact_max_dim=exact_trace_max_dim, num_matvecs=budget, generator=gen, exact=want_exact
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
    context: MeasurementContext | None = None,
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

    With ``context`` (a :class:`MeasurementContext` for this problem) H's eigenpairs, Σ_b's
    eigenpairs, Tr H, Σ_b and Tr Σ_b computed by earlier calls at the same θ (e.g.
    :func:`escape_indicator`'s exact Tr H) are reused instead of recomputed.

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
    ctx = _context(context, problem, "alignment")
    cov = ctx.covariance(batch_size, replacement)
    lam, U_H = ctx.top_eigenpairs(k, of="hessian", tol=tol, generator=gen)
    noise_pairs = ctx.top_eigenpairs(
        k, of="noise", tol=tol, generator=gen, batch_size=batch_size, replacement=replacement
    )
    mu, U_S = noise_pairs
    tr_S = ctx.noise_trace(batch_size, replacement)
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
    tr_H, _, tr_H_exact = ctx.hessian_trace(
        exact_max_dim=exact_trace_max_dim, num_matvecs=trace_matvecs, generator=gen
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


def _float32_twin(problem: Problem) -> Problem:
    """The same model (a float32 copy at the same, upcast, weights), loss, data and block."""
    model = copy.deepcopy(problem.model).to(torch.float32)
    return Problem(
        model,
        problem.loss_fn,
        problem._source.recast(problem.device, torch.float32),
        None,
        chunk_size=problem.chunk_size,
        reduction=problem.reduction,
        params=list(problem.param_names),
        memory_budget=problem._budget_arg,
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

    float16/bfloat16 models are evaluated on a float32 copy at the same (upcast) weights, with
    float32 draws: 16-bit rounding of a loss (relative ~1e-3) and of θ + ν would otherwise bias
    the difference by more than typical sharpness values, without showing in the standard error.

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
    if problem.dtype in (torch.float16, torch.bfloat16):
        problem = _float32_twin(problem)
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
