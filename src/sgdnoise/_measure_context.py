"""Measurements at one θ that share their products (:class:`MeasurementContext`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ._utils import resolve_generator
from .linalg.covariance import GradientNoiseCovariance, batch_scale
from .linalg.hessian import HessianOperator
from .linalg.lanczos import EigenPairs, default_tol, top_eigenpairs
from .linalg.trace import EXACT_TRACE_MAX_DIM, hessian_trace, quadratic_forms
from .problem import Problem

if TYPE_CHECKING:
    from .results import Alignment, EscapeIndicator

__all__ = ["MeasurementContext", "at_theta"]


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
                block_size=hit.block_size,
            )
        pairs = top_eigenpairs(op, k, tol=tol, generator=resolve_generator(0, generator))
        if hit is None or pairs.eigenvalues.numel() >= hit.eigenvalues.numel():
            self._pairs[key] = pairs
        return pairs

    def quadratic_forms(self, block_size: int = 32) -> torch.Tensor:
        """The N values ``c_iᵀ H c_i`` (centred per-sample gradients; independent of b), cached."""
        self._sync()
        if self._quad is None:
            # Any Σ_b already made holds the same centred gradients (b only scales it).
            cov = next(iter(self._covs.values())) if self._covs else self.covariance()
            self._quad = quadratic_forms(self._hessian, cov, None, block_size)
        return self._quad

    # ------------------------------------------------------------------ the measures
    def escape_indicator(self, batch_size: int | None = None, **kwargs: Any) -> EscapeIndicator:
        """:func:`escape_indicator` at the current θ, sharing this context's products."""
        from .measures import escape_indicator

        b, r = self._key(batch_size, kwargs.pop("replacement", None))
        return escape_indicator(self.problem, b, replacement=r, context=self, **kwargs)

    def alignment(self, k: int = 1, batch_size: int | None = None, **kwargs: Any) -> Alignment:
        """:func:`alignment` at the current θ, sharing this context's products."""
        from .measures import alignment

        b, r = self._key(batch_size, kwargs.pop("replacement", None))
        return alignment(self.problem, b, k, replacement=r, context=self, **kwargs)


def at_theta(
    problem: Problem, batch_size: int = 1, *, replacement: bool = True
) -> MeasurementContext:
    """A :class:`MeasurementContext` at the problem's current θ, so that several measurements
    share H, Σ_b, their eigenpairs and traces:
    ``with at_theta(problem, 32) as m: m.escape_indicator(); m.alignment(k=5)``.

    Args:
        problem: model, loss and data (θ is read now; change it and build a new context).
        batch_size: b of Σ_b. replacement: SGD's mini-batch sampling.

    Returns:
        A :class:`MeasurementContext` (a context manager; its measures share products).

    Raises:
        ValueError: ``batch_size`` outside ``[1, N]`` (``[1, N − 1]`` without replacement).
    """
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
