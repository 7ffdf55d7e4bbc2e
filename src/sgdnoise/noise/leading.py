"""``leading``: the top-k eigen-approximation of SGD's noise covariance (GLD leading)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..linalg import covariance as _cov
from ._base import BatchedStatistics, register_noise, scaled_top_eigen_factor
from ._eigen import EIGEN_OPTIONS, EigenNoise, check_eigen_option

__all__ = ["LeadingNoise", "safe_eigh"]

_SOLVERS = ("auto", "gram", "lanczos")


def safe_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``eigh`` of a small symmetric float64 matrix, with fallbacks; returns ``(vals, vecs, path)``.

    ``torch.linalg.eigh`` can fail to converge on ill-conditioned, nearly rank-deficient matrices
    (seen on CUDA with the Gram matrix of centred per-sample gradients). Fallbacks, in order: the
    same matrix on the CPU, then ``M + δI`` with ``δ = 1e-10 · max(Tr M / n, tiny)`` on the CPU
    (the shift is subtracted from the eigenvalues again; the eigenvectors are those of ``M`` up to
    the rounding the shift avoids). ``path`` is ``"eigh"``, ``"cpu"`` or ``"shifted"``.
    """
    try:
        vals, vecs = torch.linalg.eigh(M)
        return vals, vecs, "eigh"
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        pass
    Mc = M.cpu()
    try:
        vals, vecs = torch.linalg.eigh(Mc)
        return vals.to(M.device), vecs.to(M.device), "cpu"
    except RuntimeError:
        pass
    n = M.shape[0]
    delta = 1e-10 * max(float(Mc.diagonal().sum()) / n, torch.finfo(M.dtype).tiny)
    vals, vecs = torch.linalg.eigh(Mc + delta * torch.eye(n, dtype=Mc.dtype))
    return (vals - delta).to(M.device), vecs.to(M.device), "shifted"


@register_noise
class LeadingNoise(EigenNoise):
    """``Cov(n) = Σ_k = Σ_{j≤k} γ_j v_j v_jᵀ``, the k largest eigenpairs of ``Σ_b``.

    ``n = V (√γ ⊙ z)``, ``z ~ N(0, I_k)``. As in the released code the trace is *not* rescaled
    (``Tr Σ_k = Σ_{j≤k} γ_j ≤ Tr Σ_b``) unless ``match_trace=True``, which multiplies γ by
    ``Tr Σ_b / Σ_j γ_j``. Since ``rank Σ_b ≤ N − 1``, only eigenvalues above rounding level are kept
    (``rank`` says how many; at most k).

    Solvers:

    * ``gram`` (default when the per-sample gradients fit in memory, ``N·D ≤ MATERIALIZE_LIMIT``;
      asking for it above the limit is a ``ValueError``): with ``L = √(s/N) Cᵀ``
      ``[D, N]``, ``Σ_b = L Lᵀ`` and the Gram matrix ``M = Lᵀ L`` ``[N, N]`` share their non-zero
      eigenvalues; ``M = W Λ Wᵀ`` (float64 ``eigh`` with CPU / shifted fallbacks, see
      :func:`safe_eigh`) gives ``v_j = L w_j / √λ_j``. Exact, no iteration.
    * ``lanczos``: :func:`~sgdnoise.top_eigenpairs` on the matrix-free ``Σ_b`` (streaming mode for
      models whose ``[N, D]`` gradients do not fit), warm-started from the previous refresh.

    Options:
        k: number of eigenpairs (default 20; capped at D).
        match_trace: rescale to ``Tr Σ_b`` (default False, as the released code).
        solver: ``"auto"``, ``"gram"`` or ``"lanczos"``.
        tol, max_matvecs, on_nonconvergence: passed to ``top_eigenpairs`` (lanczos only).
        warm_start: start Lanczos from the previous eigenvectors (default True).

    Attributes:
        eigenvalues ``[r]`` (γ, before any trace matching), eigenvectors ``[D, r]``, rank r,
        eigh_path (``"eigh"``, ``"cpu"``, ``"shifted"`` or ``"lanczos"``), num_matvecs.
    """

    name = "leading"
    label = "GLD leading"
    default_refresh = 10
    option_defaults: ClassVar[dict[str, Any]] = {
        "k": 20,
        "match_trace": False,
        "solver": "auto",
        **{k: v for k, v in EIGEN_OPTIONS.items() if k != "k"},
    }
    experiment_options: ClassVar[dict[str, tuple[str, ...]]] = {
        "k": ("k",),
        "match_trace": ("leading_match_trace",),
    }

    @classmethod
    def _check_option(cls, key: str, value: Any) -> None:
        check_eigen_option(cls.name, key, value)
        if key == "solver" and value not in _SOLVERS:
            raise ValueError(
                f"noise structure 'leading': option solver must be one of {_SOLVERS}, got {value!r}"
            )

    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        o = self.options
        p = self.problem
        solver = o["solver"]
        N, D = p.num_samples, p.dim
        if solver == "gram" and per_sample is None and N * D > _cov.MATERIALIZE_LIMIT:
            raise ValueError(
                f"noise structure 'leading': solver='gram' needs the [N, D] = [{N}, {D}] per-sample "
                f"gradients ({N * D:,} numbers > MATERIALIZE_LIMIT = {_cov.MATERIALIZE_LIMIT:,}); "
                "use solver='auto' or 'lanczos' (streams), or raise "
                "sgdnoise.linalg.covariance.MATERIALIZE_LIMIT if you have the memory"
            )
        cov = self._sigma(per_sample, materialize=True if solver == "gram" else None)
        if solver == "auto":
            solver = "gram" if cov.centered is not None else "lanczos"
        k = min(o["k"], p.dim)
        self.num_matvecs = 0
        if solver == "gram":
            L = cov.factor().double()
            M = L.T @ L
            M = (M + M.T) / 2
            vals, W, self.eigh_path = safe_eigh(M)
            vals, W = vals.flip(0), W.flip(1)
            floor = max(float(vals[0]), 0.0) * M.shape[0] * torch.finfo(torch.float64).eps * 10
            r = int(min(k, int((vals > floor).sum())))
            gamma = vals[:r]
            V = (L @ (W[:, :r] / gamma.sqrt())).to(p.dtype)
            gamma = gamma.to(p.dtype)
        else:
            pairs = self._top_pairs(cov, k)
            # top_eigenpairs works in float32 for 16-bit problems: back to the model's dtype.
            gamma = pairs.eigenvalues.clamp_min(0).to(p.dtype)
            V = pairs.eigenvectors.to(p.dtype)
            self.eigh_path = "lanczos"
        self.eigenvalues = gamma
        s = gamma
        if o["match_trace"] and float(gamma.sum()) > 0:
            s = gamma * (cov.trace() / gamma.sum())
        self._set_low_rank(V, s)

    @property
    def rank(self) -> int:
        """r, the number of eigenpairs kept (at most k)."""
        return self.eigenvectors.shape[1]

    @classmethod
    def batched_factor(
        cls, stats: BatchedStatistics, trace: float, options: Mapping[str, Any]
    ) -> torch.Tensor:
        """Factor of ``T · Σ_k / Tr Σ_k`` from the runs' ``Σ_1`` (top-k eigenpairs, k ≤ D)."""
        k = min(options.get("k", 20), stats.centered.shape[-1])
        return scaled_top_eigen_factor(stats.second_moment(), trace, k)
