"""sgdnoise: measure and simulate the structure of SGD's gradient noise.

Public API (names and meanings are fixed; see the README for the conventions):

* :class:`Problem` — model + mean loss + data as a function of the flat parameter vector θ.
* :func:`per_sample_gradients`, :func:`hessian`, :func:`gradient_noise_covariance` — the
  ingredients, as tensors or matrix-free :class:`~sgdnoise.linalg.LinearOperator` s.
* :func:`top_eigenpairs` (Lanczos), :func:`trace_estimate` (Hutchinson / Hutch++).
* Measures on operators: :func:`tr_HS` (Tr(HΣ)), :func:`hessian_trace`, :func:`alignment`
  ``(H, S, k)``; on a problem: :func:`escape_indicator` (Tr(HΣ) vs Tr(HΣ̄)),
  ``alignment(problem, b, k)``, :func:`expected_sharpness`.
* :func:`gradient_noise_scale` — B_simple = Tr Σ₁ / ‖∇L‖², exact or from two batch sizes.
* :func:`noise_model` / :func:`noise_structures` — registered gradient-noise structures.
* :class:`GLD`, :class:`GD`, :class:`MinibatchSGD`, :func:`make_optimizer`, :func:`run_dynamics`,
  :func:`gld_step` — noise-injected dynamics sharing one code path.
* :class:`Monitor` — these measures every K steps of a training loop, as JSON lines.

Conventions shared by every function:

* **Randomness.** Every function that draws random numbers takes ``seed: int | None`` and
  ``generator: torch.Generator | None`` (keywords). The generator wins (its state advances);
  otherwise a fresh generator seeded with ``seed`` is used, ``None`` and the default meaning 0 —
  deterministic by default. Nothing draws from PyTorch's global random state.
* **Return types.** Scalar results are Python floats (ints, bools); vectors and matrices are
  tensors; results with several fields are frozen dataclasses whose ``print`` is a short table
  (``value ± standard error`` where there is one) and ``to_dict()`` their fields.
* **Normalisation.** ``L = (1/N) Σ_i ℓ_i``; ``Σ_1 = (1/N) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ``;
  ``Σ_b = Σ_1 / b`` with replacement, ``Σ_1 (N − b)/(b (N − 1))`` without (gradient level).
"""

from .blocks import LayerTable, by_layer
from .diagnostics import CheckReport, check
from .linalg import (
    ConvergenceError,
    DenseOperator,
    DiagonalOperator,
    EigenPairs,
    GaussNewtonOperator,
    GradientNoiseCovariance,
    HessianOperator,
    LinearOperator,
    LowRankOperator,
    ScaledIdentityOperator,
    SumOperator,
    TraceEstimate,
    batch_scale,
    gauss_newton,
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
    hessian_trace,
    tr_HS,
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
from .problem import Problem, local_range, per_sample_gradients

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
    "GaussNewtonOperator",
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
    "gauss_newton",
    "gld_step",
    "gradient_noise_covariance",
    "gradient_noise_scale",
    "hessian",
    "hessian_trace",
    "local_range",
    "make_optimizer",
    "noise_model",
    "noise_structures",
    "per_sample_gradients",
    "per_sample_gradients_and_losses",
    "run_dynamics",
    "top_eigenpairs",
    "tr_HS",
    "trace_estimate",
    "weighted_gradients",
]
