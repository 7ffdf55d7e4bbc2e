"""``full``: Gaussian noise with exactly SGD's covariance, ``Cov(n) = Σ_b``, matrix-free."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..linalg.covariance import GradientNoiseCovariance
from ._base import BatchedStatistics, NoiseModel, register_noise


@register_noise
class FullNoise(NoiseModel):
    """``n = L z``, ``z ~ N(0, I_N)``, with ``L = √(s/N) Cᵀ`` ``[D, N]`` the per-sample factor.

    ``L Lᵀ = (s/N) Σ_i c_i c_iᵀ = Σ_b`` exactly, so this is SGD's covariance with Gaussian
    (instead of sampling) noise; no D×D matrix is formed. ``covariance`` is the
    :class:`~sgdnoise.GradientNoiseCovariance` itself, stored or streamed by its memory rule
    (``N·D ≤ MATERIALIZE_LIMIT``): with the ``[N, D]`` centred gradients a draw is one ``[N]×[N, D]``
    product; above the limit it is ``√(s/N) (Gᵀz − ḡ (1ᵀz))``, one weighted-gradient pass over the
    data at the refresh's θ (:meth:`~sgdnoise.GradientNoiseCovariance.sample_factor_product`) —
    the same draw for the same z, to rounding. No options.
    """

    name = "full"
    label = "GLD full Σ"

    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        cov = self._sigma(per_sample)
        self.covariance = cov

    @property
    def unit_dim(self) -> int:
        return self.problem.num_samples

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        cov = self.covariance
        assert isinstance(cov, GradientNoiseCovariance)
        return cov.sample_factor_product(z)

    @classmethod
    def batched_factor(
        cls, stats: BatchedStatistics, trace: float, options: Mapping[str, Any]
    ) -> torch.Tensor:
        """The per-sample factor ``L = Cᵀ √(T / (N Tr Σ_1))`` ``[R, D, N]`` (draws ``z ∈ R^N``)."""
        C = stats.centered
        tr = torch.diagonal(stats.second_moment(), dim1=1, dim2=2).sum(-1)
        return C.transpose(1, 2) * (trace / (C.shape[1] * tr)).sqrt()[:, None, None]
