"""``full``: Gaussian noise with exactly SGD's covariance, ``Cov(n) = Σ_b``, matrix-free."""

from __future__ import annotations

import torch

from ..linalg.covariance import GradientNoiseCovariance
from ._base import NoiseModel, register_noise


@register_noise
class FullNoise(NoiseModel):
    """``n = L z``, ``z ~ N(0, I_N)``, with ``L = √(s/N) Cᵀ`` ``[D, N]`` the per-sample factor.

    ``L Lᵀ = (s/N) Σ_i c_i c_iᵀ = Σ_b`` exactly, so this is SGD's covariance with Gaussian
    (instead of sampling) noise; a draw costs one ``[D, N]`` product and no D×D matrix is formed.
    Needs the ``[N, D]`` centred per-sample gradients in memory. ``covariance`` is the
    :class:`~sgdnoise.GradientNoiseCovariance` itself. No options.
    """

    name = "full"

    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        cov = self._sigma(per_sample, materialize=True)
        self.covariance = cov

    @property
    def unit_dim(self) -> int:
        return self.problem.num_samples

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        cov = self.covariance
        assert isinstance(cov, GradientNoiseCovariance)
        return cov.sample_factor_product(z)
