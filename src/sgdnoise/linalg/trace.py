"""Stochastic trace estimation: Hutchinson and Hutch++ (Meyer, Musco, Musco & Woodruff, 2021).

For float16/bfloat16 operators the probe vectors, the sketch's QR and every sum are in float32
(PyTorch has no 16-bit QR); only the operator products run in the operator's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._utils import as_generator, rademacher
from .lanczos import work_dtype
from .operators import LinearOperator

__all__ = ["TraceEstimate", "trace_estimate"]


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


def _apply(op: LinearOperator, V: torch.Tensor) -> torch.Tensor:
    """``op @ V`` with ``V`` in the working dtype: cast down for a 16-bit product, result cast up."""
    if V.dtype == op.dtype:
        return op @ V
    return (op @ V.to(op.dtype)).to(V.dtype)


def _hutchinson_terms(op: LinearOperator, Z: torch.Tensor) -> torch.Tensor:
    return (Z * _apply(op, Z)).sum(0)


def trace_estimate(
    op: LinearOperator,
    num_matvecs: int,
    *,
    method: str = "hutch++",
    generator: torch.Generator | int,
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
        generator: a ``torch.Generator`` or int seed (required: results are reproducible).

    The value is a Python float in every case; for float16/bfloat16 operators it carries the
    products' ~1e-2 relative rounding (the estimator's own arithmetic is float32/float64).
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"unknown method {method!r}; choose 'hutch++' or 'hutchinson'")
    need = 4 if method == "hutch++" else 2
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int) or num_matvecs < need:
        raise ValueError(f"{method} needs num_matvecs >= {need} (an integer), got {num_matvecs!r}")
    gen = as_generator(generator)
    D = op.shape[0]
    kw = {"generator": gen, "dtype": work_dtype(op.dtype), "device": op.device}
    if method == "hutchinson":
        terms = _hutchinson_terms(op, rademacher((D, num_matvecs), **kw)).double()
        return TraceEstimate(
            float(terms.mean()), float(terms.std() / num_matvecs**0.5), num_matvecs, method
        )
    s = min(num_matvecs // 3, D)
    g = num_matvecs - 2 * s
    S = rademacher((D, s), **kw)
    Q, _ = torch.linalg.qr(_apply(op, S))
    AQ = _apply(op, Q)
    exact = float((Q * AQ).double().sum())
    if Q.shape[1] >= D:  # the sketch spans R^D: Tr(QᵀAQ) is the trace itself
        return TraceEstimate(exact, 0.0, 2 * s, method)
    assert g >= 2  # num_matvecs >= 4 leaves at least two residual probes
    Z = rademacher((D, g), **kw)
    Zp = Z - Q @ (Q.T @ Z)
    terms = (Zp * _apply(op, Zp)).double().sum(0)
    return TraceEstimate(
        exact + float(terms.mean()), float(terms.std() / g**0.5), 2 * s + g, method
    )
