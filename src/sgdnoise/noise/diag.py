"""``diag``: the diagonal of SGD's noise covariance, ``Cov(n) = diag Σ_b`` (GLD diag)."""

from __future__ import annotations

import torch

from ..linalg.operators import DiagonalOperator
from ._base import NoiseModel, register_noise


@register_noise
class DiagNoise(NoiseModel):
    """``n = √(diag Σ_b) ⊙ z``, ``z ~ N(0, I_D)``: independent coordinates with SGD's variances.

    ``diag Σ_b = s (1/N) Σ_i c_i ⊙ c_i`` (exact, centred first); ``Tr Cov(n) = Tr Σ_b``. No options.
    """

    name = "diag"

    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        d = self._sigma(per_sample).diagonal().clamp_min(0)
        self._std = d.sqrt()
        self.covariance = DiagonalOperator(d)

    @property
    def unit_dim(self) -> int:
        return self.problem.dim

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._std
