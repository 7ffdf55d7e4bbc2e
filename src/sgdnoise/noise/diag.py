"""``diag``: the diagonal of SGD's noise covariance, ``Cov(n) = diag Σ_b`` (GLD diag)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..linalg.operators import DiagonalOperator
from ._base import BatchedStatistics, NoiseModel, register_noise


@register_noise
class DiagNoise(NoiseModel):
    """``n = √(diag Σ_b) ⊙ z``, ``z ~ N(0, I_D)``: independent coordinates with SGD's variances.

    ``diag Σ_b = s (1/N) Σ_i c_i ⊙ c_i`` (exact, centred first); ``Tr Cov(n) = Tr Σ_b``. No options.
    """

    name = "diag"
    label = "GLD diag"
    family = "isotropic"

    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        d = self._sigma(per_sample).diagonal().clamp_min(0)
        self._std = d.sqrt()
        self.covariance = DiagonalOperator(d)

    @property
    def unit_dim(self) -> int:
        return self.problem.dim

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._std

    @classmethod
    def batched_factor(
        cls, stats: BatchedStatistics, trace: float, options: Mapping[str, Any]
    ) -> torch.Tensor:
        """``diag(√(T · diag Σ_1 / Tr Σ_1))`` ``[R, D, D]``."""
        d = torch.diagonal(stats.second_moment(), dim1=1, dim2=2)
        return torch.diag_embed((d / d.sum(-1, keepdim=True) * trace).sqrt())
