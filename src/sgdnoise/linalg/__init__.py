"""Matrix-free linear algebra: operators, the Hessian, Σ_b, Lanczos and trace estimation."""

from .covariance import GradientNoiseCovariance, batch_scale, gradient_noise_covariance
from .gauss_newton import GaussNewtonOperator, gauss_newton
from .hessian import HessianOperator, hessian
from .lanczos import ConvergenceError, EigenPairs, top_eigenpairs
from .operators import (
    DenseOperator,
    DiagonalOperator,
    HouseholderBasis,
    LinearOperator,
    LowRankOperator,
    RotatedDiagonalOperator,
    ScaledIdentityOperator,
    SumOperator,
)
from .trace import TraceEstimate, hessian_trace, tr_HS, trace_estimate

__all__ = [
    "ConvergenceError",
    "DenseOperator",
    "DiagonalOperator",
    "EigenPairs",
    "GaussNewtonOperator",
    "GradientNoiseCovariance",
    "HessianOperator",
    "HouseholderBasis",
    "LinearOperator",
    "LowRankOperator",
    "RotatedDiagonalOperator",
    "ScaledIdentityOperator",
    "SumOperator",
    "TraceEstimate",
    "batch_scale",
    "gauss_newton",
    "gradient_noise_covariance",
    "hessian",
    "hessian_trace",
    "top_eigenpairs",
    "tr_HS",
    "trace_estimate",
]
