"""``hessian`` and ``hessian_top1``: noise shaped like the curvature, with SGD's magnitude."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..linalg.hessian import HessianOperator
from ..linalg.lanczos import EigenPairs, top_eigenpairs
from ..linalg.operators import LowRankOperator
from ._base import NoiseModel, register_noise
from .leading import _check_eigen_option

__all__ = ["HessianNoise", "HessianTop1Noise"]


class _HessianEigenNoise(NoiseModel):
    """Shared part: top eigenpairs of ``H = ∇²L`` by Lanczos on Hessian-vector products."""

    option_defaults: ClassVar[dict[str, Any]] = {
        "k": 20,
        "tol": None,
        "max_matvecs": None,
        "on_nonconvergence": "warn",
        "warm_start": True,
    }

    @classmethod
    def _check_option(cls, key: str, value: Any) -> None:
        _check_eigen_option(cls.name, key, value)

    def _hessian_pairs(self, k: int) -> EigenPairs:
        o = self.options
        prev = getattr(self, "eigenvectors", None)
        v0 = prev if (o["warm_start"] and prev is not None) else None
        pairs = top_eigenpairs(
            HessianOperator(self.problem),
            min(k, self.problem.dim),
            v0=v0,
            tol=o["tol"],
            max_matvecs=o["max_matvecs"],
            on_nonconvergence=o["on_nonconvergence"],
        )
        self.num_matvecs = pairs.num_matvecs
        # top_eigenpairs works in float32 for 16-bit problems: the structure keeps the model's
        # dtype, so that its covariance and its draws are in the dtype of the parameters.
        dtype = self.problem.dtype
        self.hessian_eigenvalues = pairs.eigenvalues.to(dtype)
        self.eigenvectors = pairs.eigenvectors.to(dtype)
        return pairs

    @property
    def unit_dim(self) -> int:
        return self.eigenvectors.shape[1]

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        return (z * self._std) @ self.eigenvectors.T


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

    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        trace = self._sigma(per_sample).trace()
        self._hessian_pairs(self.options["k"])
        lam = self.hessian_eigenvalues.clamp_min(0)
        total = lam.sum()
        self.degenerate = not bool(total > 0)
        s = torch.zeros_like(lam) if self.degenerate else lam * (trace / total)
        self._std = s.sqrt()
        self.covariance = LowRankOperator(self.eigenvectors, s)


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
    option_defaults: ClassVar[dict[str, Any]] = {
        k: v for k, v in _HessianEigenNoise.option_defaults.items() if k != "k"
    }

    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        trace = self._sigma(per_sample).trace()
        self._hessian_pairs(1)
        s = trace.reshape(1).clamp_min(0).to(self.problem.dtype)
        self._std = s.sqrt()
        self.covariance = LowRankOperator(self.eigenvectors, s)
