"""``full``: Gaussian noise with exactly SGD's covariance, ``Cov(n) = Σ_b``, matrix-free."""

from __future__ import annotations

import torch

from ..linalg.covariance import GradientNoiseCovariance
from ._base import NoiseModel, register_noise


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
