"""What the eigen-based structures (``leading``, ``hessian``, ``hessian_top1``) share.

Each keeps eigenvectors ``V`` ``[D, r]`` and standard deviations ``√s`` ``[r]`` with
``Cov(n) = V diag(s) Vᵀ``, draws ``n = V (√s ⊙ z)``, ``z ~ N(0, I_r)``, and finds its eigenpairs by
Lanczos (:func:`~sgdnoise.top_eigenpairs`) warm-started from the previous refresh.
"""

from __future__ import annotations

from typing import Any

import torch

from ..linalg.lanczos import EigenPairs, top_eigenpairs
from ..linalg.operators import LinearOperator, LowRankOperator
from ._base import NoiseModel

_ON_NONCONVERGENCE = ("raise", "warn", "ignore")

#: The options every eigen-based structure takes (``k`` where it applies).
EIGEN_OPTIONS: dict[str, Any] = {
    "k": 20,
    "tol": None,
    "max_matvecs": None,
    "on_nonconvergence": "warn",
    "warm_start": True,
}


class EigenNoise(NoiseModel):
    """Base of the low-rank Gaussian structures: ``n = V (√s ⊙ z)``, ``Cov(n) = V diag(s) Vᵀ``.

    Attributes:
        eigenvectors: ``V`` ``[D, r]``. num_matvecs: operator products of the last refresh.
    """

    eigenvectors: torch.Tensor
    _std: torch.Tensor
    num_matvecs: int

    @classmethod
    def _check_option(cls, key: str, value: Any) -> None:
        check_eigen_option(cls.name, key, value)

    def _top_pairs(self, op: LinearOperator, k: int) -> EigenPairs:
        """The k algebraically largest eigenpairs of ``op`` by Lanczos (warm start, options)."""
        o = self.options
        prev = getattr(self, "eigenvectors", None)
        use_prev = o["warm_start"] and prev is not None and prev.shape[1]
        pairs = top_eigenpairs(
            op,
            k,
            v0=prev if use_prev else None,
            tol=o["tol"],
            max_matvecs=o["max_matvecs"],
            on_nonconvergence=o["on_nonconvergence"],
        )
        self.num_matvecs = pairs.num_matvecs
        return pairs

    def _set_low_rank(self, V: torch.Tensor, s: torch.Tensor) -> None:
        """Store ``Cov(n) = V diag(s) Vᵀ`` and its sampling state."""
        self.eigenvectors = V
        self._std = s.sqrt()
        self.covariance = LowRankOperator(V, s)

    @property
    def unit_dim(self) -> int:
        return self.eigenvectors.shape[1]

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        return (z * self._std) @ self.eigenvectors.T


def check_eigen_option(name: str, key: str, value: Any) -> None:
    """Value checks shared by the eigen-based structures (``ValueError`` saying what is wrong)."""
    if key == "k":
        NoiseModel._positive_int(name, key, value)
    elif key in ("match_trace", "warm_start") and not isinstance(value, bool):
        raise ValueError(
            f"noise structure {name!r}: option {key} must be True or False, got {value!r}"
        )
    elif (
        key == "tol"
        and value is not None
        and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1)
    ):
        raise ValueError(
            f"noise structure {name!r}: option tol must be None or a number in (0, 1) (relative "
            f"Ritz residual), got {value!r}"
        )
    elif key == "max_matvecs" and value is not None:
        NoiseModel._positive_int(name, key, value)
    elif key == "on_nonconvergence" and value not in _ON_NONCONVERGENCE:
        raise ValueError(
            f"noise structure {name!r}: option on_nonconvergence must be one of "
            f"{_ON_NONCONVERGENCE}, got {value!r}"
        )
