"""``dynamic``: isotropic noise with SGD's magnitude, ``Cov(n) = (Tr Σ_b / D) I`` (GLD dynamic)."""

from __future__ import annotations

import torch

from ..linalg.operators import ScaledIdentityOperator
from ._base import NoiseModel, register_noise
from .const import ConstNoise


@register_noise
class DynamicNoise(NoiseModel):
    """``n = √(Tr Σ_b / D) · z``, ``z ~ N(0, I_D)``: the isotropic equivalent ``Σ̄`` of ``Σ_b``.

    ``Tr Cov(n) = Tr Σ_b`` exactly (``Tr Σ_b = s (1/N) Σ_i ‖c_i‖²`` from the centred per-sample
    gradients). No options.
    """

    name = "dynamic"
    label = "GLD dynamic"
    family = "isotropic"

    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        p = self.problem
        trace = self._sigma(per_sample).trace()
        self._variance = trace / p.dim
        self.covariance = ScaledIdentityOperator(
            self._variance, p.dim, dtype=p.dtype, device=p.device
        )

    @property
    def unit_dim(self) -> int:
        return self.problem.dim

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._variance.sqrt()

    #: ``√(T/D) I`` per run: the same as ``const`` once the trace is fixed.
    batched_factor = ConstNoise.batched_factor
