"""sgdnoise: measure and simulate the structure of SGD's gradient noise.

Public API (names and meanings are fixed; see the README for the conventions):

* :class:`Problem` — model + mean loss + data as a function of the flat parameter vector θ.
* :func:`per_sample_gradients`, :func:`hessian`, :func:`gradient_noise_covariance` — the
  ingredients, as tensors or matrix-free :class:`~sgdnoise.linalg.LinearOperator` s.
* :func:`top_eigenpairs` (Lanczos), :func:`trace_estimate` (Hutchinson / Hutch++).
* :func:`escape_indicator` (Tr(HΣ) vs Tr(HΣ̄)), :func:`alignment`, :func:`expected_sharpness`.
* :func:`gradient_noise_scale` — B_simple = Tr Σ₁ / ‖∇L‖², exact or from two batch sizes.
* :func:`noise_model` / :func:`noise_structures` — registered gradient-noise structures.
* :class:`GLD`, :class:`GD`, :class:`MinibatchSGD`, :func:`make_optimizer`, :func:`run_dynamics`,
  :func:`gld_step` — noise-injected dynamics sharing one code path.
* :class:`Monitor` — these measures every K steps of a training loop, as JSON lines.
"""

from .blocks import LayerTable, by_layer
from .diagnostics import CheckReport, check
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
    MeasurementContext,
    alignment,
    at_theta,
    escape_indicator,
    expected_sharpness,
)
from .monitor import Monitor
from .noise import (
    NoiseModel,
    noise_model,
    noise_structures,
    per_sample_gradients_and_losses,
    weighted_gradients,
)
from .noise_scale import GradientNoiseScale, gradient_noise_scale
from .optim import (
    GD,
    GLD,
    MinibatchSGD,
    StepInfo,
    dynamics_names,
    gld_step,
    make_optimizer,
    run_dynamics,
)
from .problem import Problem, per_sample_gradients

__version__ = "0.1.0"

__all__ = [
    "GD",
    "GLD",
    "Alignment",
    "CheckReport",
    "ConvergenceError",
    "DenseOperator",
    "DiagonalOperator",
    "EigenPairs",
    "EscapeIndicator",
    "ExpectedSharpness",
    "GradientNoiseCovariance",
    "GradientNoiseScale",
    "HessianOperator",
    "LayerTable",
    "LinearOperator",
    "LowRankOperator",
    "MeasurementContext",
    "MinibatchSGD",
    "Monitor",
    "NoiseModel",
    "Problem",
    "ScaledIdentityOperator",
    "StepInfo",
    "SumOperator",
    "TraceEstimate",
    "__version__",
    "alignment",
    "at_theta",
    "batch_scale",
    "by_layer",
    "check",
    "dynamics_names",
    "escape_indicator",
    "expected_sharpness",
    "gld_step",
    "gradient_noise_covariance",
    "gradient_noise_scale",
    "hessian",
    "make_optimizer",
    "noise_model",
    "noise_structures",
    "per_sample_gradients",
    "per_sample_gradients_and_losses",
    "run_dynamics",
    "top_eigenpairs",
    "trace_estimate",
    "weighted_gradients",
]
