"""``const``: isotropic noise of fixed size, ``Cov(n) = σ² I`` (GLD const)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..linalg.operators import ScaledIdentityOperator
from ._base import BatchedStatistics, NoiseModel, register_noise


@register_noise
class ConstNoise(NoiseModel):
    """``n = σ z``, ``z ~ N(0, I_D)``: ``Cov(n) = σ² I``, independent of θ and of Σ_b.

    ``σ`` is *gradient-level* (the step is ``θ − η(∇L + n)``, so the parameter std is ``η σ``).
    The default ``σ = 1e-3`` is the released FashionMNIST/SVHN/CIFAR code's value. ``batch_size``
    is accepted for a uniform interface and ignored. Refreshing costs nothing.

    Options:
        sigma: gradient-level standard deviation per coordinate (≥ 0).
    """

    name = "const"
    label = "GLD const"
    family = "isotropic"
    option_defaults: ClassVar[dict[str, Any]] = {"sigma": 1e-3}
    experiment_options: ClassVar[dict[str, tuple[str, ...]]] = {"sigma": ("const_sigma",)}
    needs_per_sample = False

    @classmethod
    def _check_option(cls, key: str, value: Any) -> None:
        if key == "sigma" and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(
                f"noise structure 'const': option sigma must be a finite number >= 0 "
                f"(gradient-level std), got {value!r}"
            )

    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        p = self.problem
        sigma = float(self.options["sigma"])
        self.covariance = ScaledIdentityOperator(sigma**2, p.dim, dtype=p.dtype, device=p.device)

    @property
    def unit_dim(self) -> int:
        return self.problem.dim

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        return z * float(self.options["sigma"])

    @classmethod
    def batched_factor(
        cls, stats: BatchedStatistics, trace: float, options: Mapping[str, Any]
    ) -> torch.Tensor:
        """``√(T/D) I`` ``[R, D, D]`` per run (σ is irrelevant once the trace is fixed)."""
        R, _, D = stats.centered.shape
        C = stats.centered
        eye = torch.eye(D, dtype=C.dtype, device=C.device) * math.sqrt(trace / D)
        return eye.expand(R, D, D)
