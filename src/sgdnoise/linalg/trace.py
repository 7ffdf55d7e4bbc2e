"""Stochastic trace estimation: Hutchinson and Hutch++ (Meyer, Musco, Musco & Woodruff, 2021).

For float16/bfloat16 operators the probe vectors, the sketch's QR and every sum are in float32
(PyTorch has no 16-bit QR); only the operator products run in the operator's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._utils import rademacher, resolve_generator
from ..results import format_table
from ._orth import orthonormal_basis
from .covariance import GradientNoiseCovariance
from .lanczos import work_dtype
from .operators import LinearOperator, LowRankOperator, check_operator

__all__ = [
    "EXACT_TRACE_MAX_DIM",
    "TraceEstimate",
    "hessian_trace",
    "quadratic_forms",
    "tr_HS",
    "trace_estimate",
]


@dataclass(frozen=True)
class TraceEstimate:
    """An unbiased estimate of ``Tr(A)`` with its standard error.

    Attributes:
        value: the estimate.
        stderr: its standard error (sample standard deviation of the Hutchinson terms / √m; for
            Hutch++ only the residual part is random, the sketched part is exact).
        num_matvecs: operator products used.
        method: ``"hutchinson"`` or ``"hutch++"``.
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        se = None if self.stderr == 0.0 and self.method == "exact" else self.stderr
        return format_table(
            "TraceEstimate",
            [("trace", self.value, se)],
            f"{self.method}, {self.num_matvecs} products",
        )


def _apply(op: LinearOperator, V: torch.Tensor) -> torch.Tensor:
    """``op @ V`` with ``V`` in the working dtype: cast down for a 16-bit product, result cast up."""
    if V.dtype == op.dtype:
        return op @ V
    return (op @ V.to(op.dtype)).to(V.dtype)


#: The estimators apply the operator to their ``[D, m]`` probes this many bytes of columns at a
#: time, so that products and temporaries hold a few ``[D, c]`` blocks, never several ``[D, m]``
#: ones (ResNet-18, D = 11.2M, m = 33: 1.5 GB per ``[D, m]`` block in float32).
BLOCK_BYTES = 2**28


def _columns_per_block(D: int, dtype: torch.dtype) -> int:
    """Columns of ``D`` entries of ``dtype`` in :data:`BLOCK_BYTES` (at least 1)."""
    return max(1, BLOCK_BYTES // max(1, D * torch.finfo(dtype).bits // 8))


def _hutchinson_terms(op: LinearOperator, Z: torch.Tensor) -> torch.Tensor:
    """``[z_jᵀ A z_j]_j`` (float64), column block by column block."""
    c = _columns_per_block(Z.shape[0], Z.dtype)
    return torch.cat(
        [
            (Z[:, a : a + c] * _apply(op, Z[:, a : a + c])).sum(0, dtype=torch.float64)
            for a in range(0, Z.shape[1], c)
        ]
    )


def _probes(D: int, num: int, kw: dict[str, Any]) -> torch.Tensor:
    """``[D, num]`` Rademacher probes drawn one column after the other, so that a block of
    columns holds the same probes whatever the block size (:data:`BLOCK_BYTES`)."""
    return torch.cat([rademacher((D, 1), **kw) for _ in range(num)], dim=1)


def _probe_terms(
    apply: Callable[[torch.Tensor], torch.Tensor],
    D: int,
    num: int,
    kw: dict[str, Any],
    Q: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[z_jᵀ A z_j]_j`` (float64, ``A z = apply(z)``) for ``num`` Rademacher probes drawn a
    column block at a time (never a ``[D, num]`` matrix), each block deflated by ``I − QQᵀ``
    when ``Q`` is given."""
    c = _columns_per_block(D, kw["dtype"])
    terms = []
    for a in range(0, num, c):
        Z = _probes(D, min(c, num - a), kw)
        if Q is not None:
            Z -= Q @ (Q.T @ Z)
        terms.append((Z * apply(Z)).sum(0, dtype=torch.float64))
    return torch.cat(terms)


def trace_estimate(
    op: LinearOperator,
    num_matvecs: int,
    *,
    method: str = "hutch++",
    seed: int | None = 0,
    generator: torch.Generator | int | None = None,
) -> TraceEstimate:
    """Estimate ``Tr(A)`` from ``num_matvecs`` products with Rademacher vectors.

    * ``"hutchinson"``: ``(1/m) Σ_j z_jᵀ A z_j``; standard error ``std(z_jᵀ A z_j)/√m``.
    * ``"hutch++"``: a third of the budget sketches ``S``, ``Q = orth(A S)``; ``Tr(QᵀAQ)`` is exact
      and Hutchinson with the last third estimates the trace of the deflated
      ``(I − QQᵀ) A (I − QQᵀ)``. Far lower variance when a few eigenvalues dominate (Hessians).

    Args:
        op: a symmetric linear operator.
        num_matvecs: product budget (≥ 2 for Hutchinson's error bar; ≥ 4 for Hutch++, whose
            residual part needs at least two probes to be unbiased and to have an error bar).
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        seed, generator: randomness of the probes (the generator wins; else a fresh generator
            seeded with ``seed``, default 0).

    The value is a Python float in every case; for float16/bfloat16 operators it carries the
    products' ~1e-2 relative rounding (the estimator's own arithmetic is float32/float64).

    Returns:
        :class:`TraceEstimate` (value and standard error as Python floats, in A's units).

    Raises:
        ValueError: unknown method, or ``num_matvecs`` below the method's minimum.
        TypeError: a generator or seed of another type.

    Source: Hutchinson (1990); Meyer, Musco, Musco & Woodruff, "Hutch++" (SOSA 2021), Alg. 1.
    """
    check_operator(op, "op", "trace_estimate")
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"unknown method {method!r}; choose 'hutch++' or 'hutchinson'")
    need = 4 if method == "hutch++" else 2
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int) or num_matvecs < need:
        raise ValueError(f"{method} needs num_matvecs >= {need} (an integer), got {num_matvecs!r}")
    gen = resolve_generator(seed, generator)
    D = op.shape[0]
    kw: dict[str, Any] = {"generator": gen, "dtype": work_dtype(op.dtype), "device": op.device}
    item = torch.finfo(kw["dtype"]).bits // 8
    if method == "hutchinson":  # a probe block, its product and their product held
        c = min(_columns_per_block(D, kw["dtype"]), num_matvecs)
        with op.holding(3 * c * D * item), op.session():
            terms = _probe_terms(lambda Z: _apply(op, Z), D, num_matvecs, kw)
        return TraceEstimate(
            float(terms.mean()), float(terms.std() / num_matvecs**0.5), num_matvecs, method
        )
    s = min(num_matvecs // 3, D)
    g = num_matvecs - 2 * s
    # Memory: the [D, s] sketch (then Q, orthonormalised in place) and about three [D, c] column
    # blocks (probes, their deflation, the products) are held while the operator's passes run,
    # and counted against their budget (op.holding); probes are drawn a column block at a time.
    c = min(_columns_per_block(D, kw["dtype"]), max(s, g))
    with op.holding((s + 3 * c) * D * item), op.session():
        AS = torch.empty(D, s, **{k: kw[k] for k in ("dtype", "device")})
        for a in range(0, s, c):
            AS[:, a : a + c] = _apply(op, _probes(D, min(c, s - a), kw))
        Q = orthonormal_basis(AS)
        exact = float(_hutchinson_terms(op, Q).sum()) if Q.shape[1] else 0.0
        if Q.shape[1] >= D:  # the sketch spans R^D: Tr(QᵀAQ) is the trace itself
            return TraceEstimate(exact, 0.0, 2 * s, method)
        assert g >= 2  # num_matvecs >= 4 leaves at least two residual probes
        terms = _probe_terms(lambda Z: _apply(op, Z), D, g, kw, Q)  # (I − QQᵀ) z_j
    return TraceEstimate(
        exact + float(terms.mean()), float(terms.std() / g**0.5), 2 * s + g, method
    )


# ---------------------------------------------------------------------- measures on operators
#: Tr(H) is computed exactly (D products) up to this dimension, estimated with Hutch++ above it.
EXACT_TRACE_MAX_DIM = 2048


def hessian_trace(
    H: LinearOperator,
    *,
    exact_max_dim: int = EXACT_TRACE_MAX_DIM,
    num_matvecs: int = 99,
    seed: int | None = 0,
    generator: torch.Generator | int | None = None,
    exact: bool | None = None,
) -> tuple[float, float, bool]:
    """``(Tr A, stderr, exact)`` of a symmetric operator (the Hessian, Σ_b, a Gauss–Newton matrix).

    Exact: ``Σ_j e_jᵀ A e_j`` from D products (in blocks of 256 unit vectors; no D×D matrix above
    ``exact_max_dim``). Otherwise Hutch++ (Meyer, Musco, Musco & Woodruff, 2021, Algorithm 1)
    from ``num_matvecs`` products, unbiased, with its standard error.

    Args:
        H: a symmetric :class:`~sgdnoise.linalg.LinearOperator` ``[D, D]``.
        exact_max_dim: with ``exact=None``, the trace is exact when D ≤ this, else Hutch++.
        num_matvecs: Hutch++ budget (products, ≥ 4).
        seed, generator: randomness of Hutch++ (the generator wins; else a fresh generator
            seeded with ``seed``, default 0). Nothing is drawn for an exact trace.
        exact: ``True`` always exact (D products), ``False`` always Hutch++, ``None`` (default)
            decides by ``exact_max_dim``.

    Returns:
        ``(value, stderr, exact)``: Python floats (stderr 0.0 when exact) and a bool; the value
        is in H's units (for the loss Hessian: loss per squared parameter unit, summed over D).

    Raises:
        ValueError: ``num_matvecs`` below Hutch++'s minimum of 4 when Hutch++ is used.
    """
    check_operator(H, "H", "hessian_trace")
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
        H, num_matvecs, method="hutch++", generator=resolve_generator(seed, generator)
    )
    return est.value, est.stderr, False


def _forms(H: LinearOperator, C: torch.Tensor, block: int) -> torch.Tensor:
    """``c_iᵀ H c_i`` for the rows c_i of ``C`` ``[n, D]``, ``block`` products at a time (fewer
    when ``block`` columns of D numbers exceed :data:`BLOCK_BYTES`)."""
    out = []
    block = min(block, _columns_per_block(C.shape[1], C.dtype))
    # the block's columns, their products and the elementwise product are held between products
    # (and the Hessian's graph is kept between blocks where it fits: H.session)
    with H.holding(3 * block * C.shape[1] * C.element_size()), H.session():
        for start in range(0, C.shape[0], block):
            Cb = C[start : start + block]
            out.append((Cb.T * (H @ Cb.T.contiguous())).sum(0))
    return torch.cat(out)


def quadratic_forms(
    H: LinearOperator,
    S: GradientNoiseCovariance,
    indices: torch.Tensor | None = None,
    block_size: int = 32,
) -> torch.Tensor:
    """``c_iᵀ H c_i`` ``[n]`` for the centred per-sample gradients ``c_i = g_i − ḡ`` of ``S``.

    ``indices=None``: all N samples, taken ``block_size`` at a time (streaming Σ_b computes each
    block's gradients in turn); otherwise the given samples. ``block_size`` H-products per batch.
    Independent of b: ``Tr(H Σ_b) = (s/N) Σ_i c_iᵀ H c_i`` with ``s`` = :attr:`S.scale`.
    """
    if indices is not None:
        return _forms(H, S.centered_rows(indices), block_size)
    N = S.problem.num_samples
    if S.centered is not None:
        return _forms(H, S.centered, block_size)
    parts = []
    for start in range(0, N, block_size):
        idx = torch.arange(start, min(N, start + block_size), device=S.device)
        parts.append(_forms(H, S.centered_rows(idx), block_size))
    return torch.cat(parts)


def check_num_samples(num_samples: int | None, N: int) -> None:
    """Refuse a sample count of the sampled ``Tr(HΣ)`` outside ``[2, N]`` (``None``: exact)."""
    if num_samples is not None and (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, int)
        or not 2 <= num_samples <= N
    ):
        raise ValueError(
            f"num_samples must be None (exact) or an integer in [2, N] = [2, {N}], got {num_samples!r}"
        )


def tr_HS(
    H: LinearOperator,
    S: LinearOperator,
    *,
    num_samples: int | None = None,
    block_size: int = 32,
    seed: int | None = 0,
    generator: torch.Generator | int | None = None,
    exact_max_dim: int = EXACT_TRACE_MAX_DIM,
    num_matvecs: int = 99,
) -> TraceEstimate:
    """``Tr(H S)`` for two symmetric operators — the escape indicator ``Tr(H Σ_b)`` of Zhu et al.
    (ICML 2019, Eq. 6 / Theorem 3.1) when S is SGD's noise covariance.

    By S's structure:

    * :class:`~sgdnoise.linalg.GradientNoiseCovariance` ``Σ_b = (s/N) Σ_i c_i c_iᵀ``: exact
      (``num_samples=None`` or N) ``Tr(H Σ_b) = (s/N) Σ_i c_iᵀ H c_i`` from N products, or sampled
      from m examples drawn uniformly without replacement, ``(s/m) Σ_{i∈S} c_iᵀ H c_i``,
      unbiased, its standard error with the finite-population correction ``√(1 − m/N)``
      (``method`` ``"exact"`` / ``"sampled"``, ``num_matvecs`` the H products);
    * :class:`~sgdnoise.linalg.LowRankOperator` ``U diag(s) Uᵀ``: exact, ``Σ_j s_j u_jᵀ H u_j``
      (r products);
    * any other operator: exact ``Σ_jk H_jk S_kj`` from dense matrices when D ≤
      ``exact_max_dim``, else Hutchinson ``(1/m) Σ_j z_jᵀ H (S z_j)`` with ``num_matvecs``
      Rademacher probes (``method="hutchinson"``).

    Args:
        H, S: symmetric operators ``[D, D]`` of one dtype and device.
        num_samples: sampled examples m ∈ [2, N] (noise covariance only; ``None``: exact).
        block_size: H products per batch.
        seed, generator: randomness (generator wins; else a fresh generator seeded with
            ``seed``, default 0).
        exact_max_dim, num_matvecs: the generic case's dense limit and probe budget.

    Returns:
        A :class:`~sgdnoise.linalg.TraceEstimate` (value and stderr Python floats; stderr 0.0
        when exact).

    Raises:
        ValueError: shapes differ, or ``num_samples`` outside ``[2, N]`` or given for an
            operator that is not a noise covariance.
    """
    check_operator(H, "H", "tr_HS")
    check_operator(S, "S", "tr_HS")
    if H.shape != S.shape:
        raise ValueError(f"tr_HS: H and S must have the same shape, got {H.shape} and {S.shape}")
    if H.dtype != S.dtype or H.device != S.device:
        raise ValueError(
            f"tr_HS: H and S must share dtype and device, got {H.dtype} on {H.device} and "
            f"{S.dtype} on {S.device}; build both from the same problem or convert one"
        )
    if isinstance(S, GradientNoiseCovariance):
        N = S.problem.num_samples
        check_num_samples(num_samples, N)
        if num_samples is None or num_samples == N:
            q = quadratic_forms(H, S, None, block_size)
            return TraceEstimate(float(q.double().mean()) * S.scale, 0.0, N, "exact")
        gen = resolve_generator(seed, generator)
        idx = torch.randperm(N, generator=gen, device=gen.device)[:num_samples].to(S.device)
        return sampled_tr_HS(quadratic_forms(H, S, idx, block_size), N, S.scale)
    if num_samples is not None:
        raise ValueError(
            "tr_HS: num_samples needs S to be a GradientNoiseCovariance (sampling its examples), "
            f"got {type(S).__name__}"
        )
    if isinstance(S, LowRankOperator):
        value = float((S.U * (H @ S.U)).sum(0).double() @ S.s.double())
        return TraceEstimate(value, 0.0, S.rank, "exact")
    D = H.shape[0]
    if D <= exact_max_dim:
        Hd, Sd = H.to_dense(max_dim=exact_max_dim), S.to_dense(max_dim=exact_max_dim)
        return TraceEstimate(float((Hd * Sd.T).double().sum()), 0.0, 2 * D, "exact")
    gen = resolve_generator(seed, generator)
    kw: dict[str, Any] = {"generator": gen, "dtype": work_dtype(H.dtype), "device": H.device}
    terms = _probe_terms(lambda Z: _apply(H, _apply(S, Z)), D, num_matvecs, kw)
    return TraceEstimate(
        float(terms.mean()), float(terms.std() / num_matvecs**0.5), 2 * num_matvecs, "hutchinson"
    )


def sampled_tr_HS(q: torch.Tensor, N: int, scale: float) -> TraceEstimate:
    """The sampled ``Tr(H Σ_b)`` from m quadratic forms ``c_iᵀ H c_i`` of examples drawn without
    replacement from N: ``(s/m) Σ q_i`` and its standard error with ``√(1 − m/N)``."""
    q = q.double()
    m = q.numel()
    fpc = (1.0 - m / N) ** 0.5
    return TraceEstimate(
        float(q.mean()) * scale, float(q.std() / m**0.5) * scale * fpc, m, "sampled"
    )
