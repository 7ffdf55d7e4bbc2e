"""``multiplicative``: random per-example loss weights whose gradient noise has covariance Σ_b."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._utils import randn, resolve_generator
from ..linalg import covariance as _cov
from ..linalg.covariance import GradientNoiseCovariance
from ..linalg.operators import LinearOperator
from ._base import NoiseModel, register_noise
from ._gradients import weighted_gradients
from .full import FullNoise

__all__ = ["MultiplicativeNoise"]

_DISTRIBUTIONS = ("gaussian", "sgd")


@register_noise
class MultiplicativeNoise(NoiseModel):
    """Noise from re-weighting the examples: one full-batch gradient per step, no Σ at all.

    With weights ``w = 1 + ε`` (``E ε = 0``) the gradient of the weighted loss
    ``(1/N) Σ_i w_i ℓ_i`` is ``ḡ + n`` with

        n = (1/N) Σ_i ε_i g_i.

    If ``Σ_i ε_i = 0`` then ``n = (1/N) Σ_i ε_i c_i`` (because ``Σ_i ε_i ḡ = 0``), and if moreover
    ``Cov(ε) = s N (I − 11ᵀ/N)`` then, using ``Cᵀ1 = 0``,

        Cov(n) = (1/N²) Cᵀ Cov(ε) C = (s/N) Cᵀ C = Σ_b       exactly.

    Two weight laws meet both conditions:

    * ``"gaussian"`` (default): ``ε = √(sN) (z − z̄ 1)``, ``z ~ N(0, I_N)``. Then
      ``n = √(s/N) Cᵀ z = L z`` — the same vector the ``full`` structure draws from the same z, so
      this is Gaussian with covariance exactly ``Σ_b`` (``unit_dim = N``, ``transform`` exists).
    * ``"sgd"``: the weights of an actual mini-batch, ``w_i = (N/b) · #{times i is drawn}`` (b
      draws with replacement, or a uniform size-b subset without, following ``replacement``).
      ``(1/N) Σ w_i g_i`` is then *exactly* the mini-batch gradient, so the dynamics is SGD computed
      through a weighted full-batch pass (a consistency check; not Gaussian, no ``transform``).

    In :class:`~sgdnoise.GLD` the step is :meth:`noisy_gradient`: :meth:`sample_weights` and the
    gradient of the weighted loss at the *current* θ (one forward + one backward pass, no
    per-sample gradients), so the noise always follows θ and ``refresh_every`` does not matter. ``covariance`` (``Σ_b`` at the θ
    of the last refresh) and :meth:`sample` exist for inspection and tests; the covariance is built
    lazily on first access.

    Options:
        distribution: ``"gaussian"`` or ``"sgd"``.
    """

    name = "multiplicative"
    label = "multiplicative"
    option_defaults: ClassVar[dict[str, Any]] = {"distribution": "gaussian"}
    needs_per_sample = False
    forms_gradient = True

    @classmethod
    def _check_option(cls, key: str, value: Any) -> None:
        if key == "distribution" and value not in _DISTRIBUTIONS:
            raise ValueError(
                f"noise structure 'multiplicative': option distribution must be one of "
                f"{_DISTRIBUTIONS}, got {value!r}"
            )

    @property
    def gaussian(self) -> bool:  # type: ignore[override]
        return self.options["distribution"] == "gaussian"

    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        self._per_sample = per_sample
        self._cov: GradientNoiseCovariance | None = None
        if per_sample is not None:
            self._build_cov()

    def _build_cov(self) -> GradientNoiseCovariance:
        if self._cov is None:
            G = self._per_sample
            if G is None and self.problem.num_samples * self.problem.dim <= _cov.MATERIALIZE_LIMIT:
                G = self.problem.per_sample_gradients(theta=self.theta)
            if G is not None:
                self._cov = GradientNoiseCovariance(
                    self.problem, self.batch_size, self.replacement, per_sample=G
                )
            else:
                self._cov = GradientNoiseCovariance(
                    self.problem, self.batch_size, self.replacement, materialize=False
                )
            self.sigma_trace = self._cov.trace()
        return self._cov

    @property
    def covariance(self) -> LinearOperator:  # type: ignore[override]
        """``Σ_b`` at the θ of the last refresh (built on first access)."""
        return self._build_cov()

    # ------------------------------------------------------------------ weights
    def weights_from_unit(self, z: torch.Tensor) -> torch.Tensor:
        """Gaussian weights ``w = 1 + √(sN) (z − z̄)`` for ``z`` ``[num, N]``."""
        N = self.problem.num_samples
        return 1 + (self.scale * N) ** 0.5 * (z - z.mean(dim=1, keepdim=True))

    def sample_weights(
        self, num: int, *, seed: int | None = 0, generator: torch.Generator | int | None = None
    ) -> torch.Tensor:
        """``num`` independent weight vectors ``[num, N]`` with ``E w = 1`` (randomness: the
        package's rule, the generator wins, else a fresh one seeded with ``seed``)."""
        num = self._check_num(num)
        gen = resolve_generator(seed, generator)
        p, N, b = self.problem, self.problem.num_samples, self.batch_size
        if self.options["distribution"] == "gaussian":
            z = randn((num, N), generator=gen, dtype=p.dtype, device=p.device)
            return self.weights_from_unit(z)
        if self.replacement:
            idx = torch.randint(0, N, (num, b), generator=gen, device=gen.device)
        else:
            idx = torch.stack(
                [torch.randperm(N, generator=gen, device=gen.device)[:b] for _ in range(num)]
            ).reshape(num, b)
        counts = torch.zeros(num, N, dtype=p.dtype, device=gen.device)
        counts.scatter_add_(1, idx, torch.ones(num, b, dtype=p.dtype, device=gen.device))
        return (counts * (N / b)).to(p.device)

    def noise_from_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """``n_j = (1/N) Σ_i (w_ji − 1) g_i`` at the θ of the last refresh, ``[num, D]``."""
        eps = weights - 1
        C = self._cov.centered if self._cov is not None else None
        if C is None and self._per_sample is not None:
            C = self._build_cov().centered
        if C is None:  # no per-sample gradients at hand: one weighted backward pass per row
            return weighted_gradients(self.problem, eps, self.theta)[0]
        # Both weight laws have Σ_i ε_i = 0, so (1/N) Σ ε_i g_i = (1/N) Σ ε_i c_i (better rounding).
        return eps @ C / self.problem.num_samples

    def noisy_gradient(
        self, theta: torch.Tensor, *, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and ``∇L + n`` at θ in one weighted-gradient pass (fresh weights, current θ).

        Args:
            theta: θ ``[D]``. generator: the source of the weights.

        Returns:
            ``(L(θ) (0-dim), (1/N) Σ_i w_i ∇ℓ_i(θ) [D])``.
        """
        w = self.sample_weights(1, generator=generator)[0]
        g_noisy, losses = weighted_gradients(self.problem, w, theta)
        return losses.mean(), g_noisy

    # ------------------------------------------------------------------ sampling
    @property
    def unit_dim(self) -> int:
        return self.problem.num_samples

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """``n = (1/N) Σ_i ε_i g_i`` with Gaussian weights from ``z`` ``[num, N]`` (= ``L z``)."""
        if not self.gaussian:
            raise TypeError(
                "transform(z) exists only for distribution='gaussian'; use sample() or "
                "sample_weights() + noise_from_weights() for 'sgd' weights"
            )
        return self.noise_from_weights(self.weights_from_unit(z))

    def sample(
        self, num: int, *, seed: int | None = 0, generator: torch.Generator | int | None = None
    ) -> torch.Tensor:
        return self.noise_from_weights(self.sample_weights(num, seed=seed, generator=generator))

    #: Gaussian weights (the default law) draw ``n = L z`` with ``full``'s per-sample factor.
    batched_factor = FullNoise.batched_factor
