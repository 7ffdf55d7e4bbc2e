"""``hessian`` and ``hessian_top1``: noise shaped like the curvature, with SGD's magnitude."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..linalg.hessian import HessianOperator
from ..linalg.lanczos import EigenPairs
from ..linalg.operators import LinearOperator
from ._base import BatchedStatistics, register_noise, scaled_top_eigen_factor
from ._eigen import EIGEN_OPTIONS, EigenNoise

__all__ = ["HessianNoise", "HessianTop1Noise"]


class _HessianEigenNoise(EigenNoise):
    """Shared part: top eigenpairs of ``H = ∇²L`` by Lanczos on Hessian-vector products."""

    option_defaults: ClassVar[dict[str, Any]] = dict(EIGEN_OPTIONS)
    experiment_options: ClassVar[dict[str, tuple[str, ...]]] = {
        "k": ("k",),
        "tol": ("lanczos_tol",),
        "max_matvecs": ("eigen_max_matvecs",),
    }
    batched_needs_hessian = True

    @classmethod
    def options_from(cls, settings: Any) -> dict[str, Any]:
        """As :meth:`NoiseModel.options_from`; a Lanczos budget (``max_matvecs``) is deliberate,
        so running out of it is not reported (``on_nonconvergence="ignore"``)."""
        opts = super().options_from(settings)
        if opts.get("max_matvecs") is not None:
            opts["on_nonconvergence"] = "ignore"
        return opts

    #: eigenpairs found outside (:meth:`use_pairs`) for the next refresh, else ``None``.
    _given_pairs: EigenPairs | None = None

    def num_pairs(self) -> int:
        """How many eigenpairs a refresh finds (k, capped at D)."""
        return min(int(self.options.get("k", 1)), self.problem.dim)

    def find_pairs(self, op: LinearOperator) -> EigenPairs:
        """What a refresh runs on the Hessian, on the operator ``op`` instead: Lanczos with this
        structure's options, warm-started from its last eigenvectors. With :meth:`use_pairs`,
        lets :class:`~sgdnoise.BatchedEngine` run the Lanczos of several members in lock-step
        (:func:`~sgdnoise.linalg.lockstep.run_lockstep`) and then refresh each member."""
        return self._top_pairs(op, self.num_pairs())

    def use_pairs(self, pairs: EigenPairs) -> None:
        """Make the next refresh use ``pairs`` (from :meth:`find_pairs` on this structure's
        Hessian at the θ of that refresh) instead of running Lanczos itself."""
        if pairs.eigenvectors.ndim != 2 or pairs.eigenvectors.shape[0] != self.problem.dim:
            raise ValueError(
                f"use_pairs needs eigenvectors [D, k] with D = {self.problem.dim}, got "
                f"{list(pairs.eigenvectors.shape)}"
            )
        self._given_pairs = pairs

    def _hessian_pairs(self, k: int) -> EigenPairs:
        pairs, self._given_pairs = self._given_pairs, None
        if pairs is None:
            pairs = self._top_pairs(HessianOperator(self.problem), min(k, self.problem.dim))
        # top_eigenpairs works in float32 for 16-bit problems: the structure keeps the model's
        # dtype, so that its covariance and its draws are in the dtype of the parameters.
        dtype = self.problem.dtype
        self.hessian_eigenvalues = pairs.eigenvalues.to(dtype)
        self.eigenvectors = pairs.eigenvectors.to(dtype)
        return pairs

    @classmethod
    def batched_factor(
        cls, stats: BatchedStatistics, trace: float, options: Mapping[str, Any]
    ) -> torch.Tensor:
        """Factor of ``T · H_k⁺ / Tr H_k⁺`` from the runs' mean Hessians (k capped at D)."""
        if stats.hessian is None:
            raise ValueError(f"noise structure {cls.name!r} needs the mean Hessian")
        D = stats.hessian.shape[-1]
        return scaled_top_eigen_factor(stats.hessian, trace, min(options["k"], D))


@register_noise
class HessianNoise(_HessianEigenNoise):
    """``Cov(n) = Tr Σ_b · H_k⁺ / Tr H_k⁺`` with ``H_k⁺ = Σ_{j≤k} max(λ_j, 0) u_j u_jᵀ`` (GLD Hessian).

    ``(λ_j, u_j)`` are the k algebraically largest eigenpairs of ``H`` (Lanczos on Hessian-vector
    products, warm-started from the previous refresh); negative eigenvalues are clipped to 0 (the
    released code's ``eigsh(which='LM')`` could pick them and mixed |λ| with signed sums), and the
    result is rescaled so that ``Tr Cov(n) = Tr Σ_b`` exactly. ``n = U (√s ⊙ z)``, ``z ~ N(0, I_k)``.
    If every clipped eigenvalue is 0 (no positive curvature among the top k) the noise is zero and
    ``degenerate`` is True.

    Options:
        k: number of eigenpairs (default 20; capped at D).
        tol, max_matvecs, on_nonconvergence: passed to :func:`~sgdnoise.top_eigenpairs`
            (default: warn rather than raise when the budget runs out during training).
        warm_start: start from the previous refresh's eigenvectors (default True).

    Attributes:
        hessian_eigenvalues ``[k]`` (signed), eigenvectors ``[D, k]``, degenerate, num_matvecs.
    """

    name = "hessian"
    label = "GLD Hessian"
    default_refresh = 10

    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        trace = self._sigma(per_sample).trace()
        self._hessian_pairs(self.options["k"])
        lam = self.hessian_eigenvalues.clamp_min(0)
        total = lam.sum()
        self.degenerate = not bool(total > 0)
        s = torch.zeros_like(lam) if self.degenerate else lam * (trace / total)
        self._set_low_rank(self.eigenvectors, s)


@register_noise
class HessianTop1Noise(_HessianEigenNoise):
    """``Cov(n) = Tr Σ_b · u₁u₁ᵀ`` with ``u₁`` the top eigenvector of ``H`` (GLD 1st eigvec(H)).

    The trace-constrained optimum of ``Tr(H Cov(n))`` (= ``λ₁ Tr Σ_b``). ``n = √(Tr Σ_b) · z · u₁``
    with scalar ``z ~ N(0, 1)``. ``u₁`` by Lanczos (algebraically largest eigenvalue), warm-started
    from the previous refresh — not the released code's 30 power iterations, which converge to
    the largest |λ|.

    Options: ``tol``, ``max_matvecs``, ``on_nonconvergence``, ``warm_start`` as for ``hessian``.
    """

    name = "hessian_top1"
    label = "GLD 1st eigvec(H)"
    option_defaults: ClassVar[dict[str, Any]] = {k: v for k, v in EIGEN_OPTIONS.items() if k != "k"}
    experiment_options: ClassVar[dict[str, tuple[str, ...]]] = {
        "tol": ("lanczos_tol",),
        "max_matvecs": ("top1_max_matvecs",),
    }

    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        trace = self._sigma(per_sample).trace()
        self._hessian_pairs(1)
        s = trace.reshape(1).clamp_min(0).to(self.problem.dtype)
        self._set_low_rank(self.eigenvectors, s)

    @classmethod
    def batched_factor(
        cls, stats: BatchedStatistics, trace: float, options: Mapping[str, Any]
    ) -> torch.Tensor:
        """Factor ``√T u₁`` ``[R, D, 1]`` from the runs' mean Hessians."""
        return super().batched_factor(stats, trace, {**options, "k": 1})
