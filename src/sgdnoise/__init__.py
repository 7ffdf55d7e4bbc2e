"""sgdnoise: measure and simulate the structure of SGD's gradient noise.

Public API (names and meanings are fixed; see the README for the conventions):

* :class:`Problem` — model + mean loss + data as a function of the flat parameter vector θ.
* :func:`per_sample_gradients`, :func:`hessian`, :func:`gradient_noise_covariance` — the
  ingredients, as tensors or matrix-free :class:`~sgdnoise.linalg.LinearOperator` s.
* :func:`top_eigenpairs` (Lanczos), :func:`trace_estimate` (Hutchinson / Hutch++).
* :func:`escape_indicator` (Tr(HΣ) vs Tr(HΣ̄)), :func:`alignment`, :func:`expected_sharpness`.
"""

from .linalg import (
    ConvergenceError,
    DenseOperator,
    DiagonalOperator,
    EigenPairs,
    GradientNoiseCovariance,
    HessianOperator,
    LinearOperator,
    LowRankOperator,
    ScaledIdentityOperator,
    SumOperator,
    TraceEstimate,
    batch_scale,
    gradient_noise_covariance,
    hessian,
    top_eigenpairs,
    trace_estimate,
)
from .measures import (
    Alignment,
    EscapeIndicator,
    ExpectedSharpness,
    alignment,
    escape_indicator,
    expected_sharpness,
)
from .problem import Problem, per_sample_gradients

__version__ = "0.1.0"

__all__ = [
    "Alignment",
    "ConvergenceError",
    "DenseOperator",
    "DiagonalOperator",
    "EigenPairs",
    "EscapeIndicator",
    "ExpectedSharpness",
    "GradientNoiseCovariance",
    "HessianOperator",
    "LinearOperator",
    "LowRankOperator",
    "Problem",
    "ScaledIdentityOperator",
    "SumOperator",
    "TraceEstimate",
    "__version__",
    "alignment",
    "batch_scale",
    "escape_indicator",
    "expected_sharpness",
    "gradient_noise_covariance",
    "hessian",
    "per_sample_gradients",
    "top_eigenpairs",
    "trace_estimate",
]
