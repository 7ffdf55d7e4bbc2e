"""Symmetric linear operators on R^D.

Every curvature or covariance matrix in sgdnoise is a :class:`LinearOperator`: it has ``shape``,
``dtype`` and ``device``, multiplies a vector ``[D]`` or a block of vectors ``[D, k]`` with ``@``
(inputs are validated once, in the base class), and can be turned into a dense matrix for small D
with :meth:`LinearOperator.to_dense`. Subclasses implement one private hook, ``_matmat(V)`` for
``V`` of shape ``[D, k]``; they never modify ``V`` in place.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch

__all__ = [
    "DenseOperator",
    "DiagonalOperator",
    "HouseholderBasis",
    "LinearOperator",
    "LowRankOperator",
    "RotatedDiagonalOperator",
    "ScaledIdentityOperator",
    "SumOperator",
]

#: ``to_dense`` refuses operators larger than this (a D×D float64 matrix of this size is 200 MB).
DEFAULT_MAX_DENSE_DIM = 5000


class LinearOperator(ABC):
    """A symmetric linear operator A: R^D → R^D, used only through products ``A @ V``.

    Attributes:
        shape: ``(D, D)``.
        dtype: floating dtype of the products.
        device: device of the products.
        symmetric: always ``True`` for the operators in this package.
        psd: ``True`` when the operator is known to be positive semi-definite (covariances).
    """

    symmetric: bool = True
    psd: bool = False

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if dim < 1:
            raise ValueError(f"an operator needs dimension D >= 1, got {dim}")
        self._dim = int(dim)
        self._dtype = dtype
        self._device = torch.device(device)

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int]:
        return (self._dim, self._dim)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )

    # ------------------------------------------------------------------ products
    @abstractmethod
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` for a checked ``V`` of shape ``[D, k]`` (subclasses)."""

    def holding(self, nbytes: int) -> contextlib.AbstractContextManager[Any]:
        """A context in which ``nbytes`` held by the caller (an estimator's probes or Krylov
        basis) count against the memory budget of this operator's products: the problem's
        :meth:`~sgdnoise.Problem.holding` for operators built on a Problem (attribute
        ``problem``: Hessian, Σ_b, Gauss–Newton), nothing for operators without a budget."""
        hold = getattr(getattr(self, "problem", None), "holding", None)
        return hold(nbytes) if callable(hold) else contextlib.nullcontext()

    def session(self) -> contextlib.AbstractContextManager[Any]:
        """A context for a run of products with this operator (one solver call): inside it, an
        operator may keep what all its products share (the Hessian keeps the gradient's graph when
        the data fits one chunk, so each further product costs one backward, not a forward and two
        backwards). Use it together with :meth:`holding`, which makes what the caller holds count
        against the budget that the kept state was planned within. Nothing for operators without
        shared state (and for sums: one part's kept state would sit outside the plan of another
        part's passes); nested sessions keep the outermost one's state."""
        return contextlib.nullcontext()

    def _check_input(self, V: torch.Tensor) -> None:
        if not isinstance(V, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__} @ V needs a torch.Tensor, got {type(V).__name__}"
            )
        D = self._dim
        if V.ndim not in (1, 2) or V.shape[0] != D:
            raise ValueError(
                f"{type(self).__name__} of shape {self.shape} multiplies a vector of shape [{D}] "
                f"or a block [{D}, k]; got a tensor of shape {list(V.shape)}. Flatten parameters "
                "with Problem.flatten() (order: model.parameters() with requires_grad, row-major)."
            )
        if V.dtype != self._dtype:
            raise TypeError(
                f"{type(self).__name__} has dtype {self._dtype}, got a vector of dtype {V.dtype}; "
                f"convert it with V.to({self._dtype})."
            )
        if V.device != self._device:
            raise ValueError(
                f"{type(self).__name__} lives on {self._device}, got a vector on {V.device}; "
                f"move it with V.to('{self._device}')."
            )

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for ``V`` of shape ``[D]`` or ``[D, k]`` (validated)."""
        self._check_input(V)
        if V.ndim == 1:
            return self._matmat(V[:, None])[:, 0]
        if V.shape[1] == 0:
            return V.clone()
        return self._matmat(V)

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        return self.matmat(V)

    # ------------------------------------------------------------------ dense views
    def to_dense(
        self, *, max_dim: int = DEFAULT_MAX_DENSE_DIM, block_size: int = 256
    ) -> torch.Tensor:
        """The dense ``[D, D]`` matrix, built from products with blocks of unit vectors.

        Args:
            max_dim: refuse operators with D above this (a dense matrix costs D² memory and D
                products); raise it explicitly if you really want a large dense matrix.
            block_size: number of unit vectors multiplied at once.
        """
        D = self._dim
        if D > max_dim:
            raise MemoryError(
                f"refusing to build a dense {D}×{D} matrix for {type(self).__name__} (max_dim="
                f"{max_dim}). Use the matrix-free tools instead (top_eigenpairs, trace_estimate, "
                "op @ V), or pass a larger max_dim if you have the memory."
            )
        cols = []
        for start in range(0, D, block_size):
            stop = min(D, start + block_size)
            E = torch.zeros(D, stop - start, dtype=self._dtype, device=self._device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append(self._matmat(E))
        return torch.cat(cols, dim=1)

    def diagonal(self) -> torch.Tensor:
        """The diagonal ``[D]``; the generic version builds the dense matrix (small D only)."""
        return torch.diagonal(self.to_dense()).clone()

    def trace(self) -> torch.Tensor:
        """The exact trace; the generic version needs the diagonal (small D only).

        For a large operator without a cheap exact trace, use :func:`sgdnoise.trace_estimate`.
        """
        return self.diagonal().sum()

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: LinearOperator) -> LinearOperator:
        return SumOperator([self, other])

    def scaled(self, factor: float) -> LinearOperator:
        """The operator ``factor · A``."""
        return SumOperator([self], weights=[float(factor)])


class DenseOperator(LinearOperator):
    """An explicit symmetric matrix (small D: tests, 2-D toys, reference computations)."""

    def __init__(self, matrix: torch.Tensor, *, psd: bool = False) -> None:
        if not isinstance(matrix, torch.Tensor):
            raise TypeError(
                f"DenseOperator needs a torch.Tensor, got {type(matrix).__name__}; convert with "
                "torch.as_tensor(M, dtype=torch.float64)"
            )
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix, got shape {list(matrix.shape)}")
        if matrix.is_complex() or not matrix.is_floating_point():
            raise TypeError(
                f"DenseOperator needs a real floating-point matrix, got dtype {matrix.dtype}; "
                "convert integers with .double(); for a Hermitian M use the real symmetric "
                "[[Re M, −Im M], [Im M, Re M]] (its eigenvalues are M's, each twice)"
            )
        m = matrix.double()
        asym = float((m - m.T).abs().max()) if m.numel() else 0.0
        tol = 100 * torch.finfo(matrix.dtype).eps * max(float(m.abs().max()), 1e-300)
        if asym > tol:
            raise ValueError(
                f"DenseOperator needs a symmetric matrix (every sgdnoise operator is symmetric: "
                f"Lanczos and the trace estimators rely on it); max |A − Aᵀ| = {asym:.3g}. Pass "
                "(A + A.T) / 2 if the asymmetry is rounding."
            )
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix
        self.psd = psd

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V

    def to_dense(self, **_: object) -> torch.Tensor:
        return self.matrix.clone()

    def diagonal(self) -> torch.Tensor:
        return torch.diagonal(self.matrix).clone()


class DiagonalOperator(LinearOperator):
    """``diag(d)`` for a vector ``d`` ``[D]`` (exact ``trace``, ``diagonal`` and products)."""

    def __init__(self, diag: torch.Tensor) -> None:
        if diag.ndim != 1:
            raise ValueError(f"DiagonalOperator needs a vector [D], got shape {list(diag.shape)}")
        super().__init__(diag.shape[0], diag.dtype, diag.device)
        self.diag = diag
        self.psd = bool((diag >= 0).all())

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.diag[:, None] * V

    def diagonal(self) -> torch.Tensor:
        return self.diag.clone()

    def trace(self) -> torch.Tensor:
        return self.diag.sum()


class ScaledIdentityOperator(LinearOperator):
    """``c · I`` on R^D (e.g. the isotropic equivalent Σ̄ = (Tr Σ / D) I of Zhu et al., Prop. 1)."""

    def __init__(
        self,
        scale: float | torch.Tensor,
        dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__(dim, dtype, device)
        self.scale = torch.as_tensor(scale, dtype=dtype, device=device)
        self.psd = bool(self.scale >= 0)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.scale * V

    def diagonal(self) -> torch.Tensor:
        return self.scale.expand(self._dim).clone()

    def trace(self) -> torch.Tensor:
        return self.scale * self._dim


class LowRankOperator(LinearOperator):
    """``U diag(s) Uᵀ`` with ``U`` of shape ``[D, r]`` (columns need not be orthonormal)."""

    def __init__(self, U: torch.Tensor, s: torch.Tensor | None = None) -> None:
        if U.ndim != 2:
            raise ValueError(f"LowRankOperator needs U of shape [D, r], got {list(U.shape)}")
        super().__init__(U.shape[0], U.dtype, U.device)
        if s is None:
            s = torch.ones(U.shape[1], dtype=U.dtype, device=U.device)
        if s.shape != (U.shape[1],):
            raise ValueError(
                f"LowRankOperator: s must have shape [{U.shape[1]}], got {list(s.shape)}"
            )
        self.U = U
        self.s = s
        self.psd = bool((s >= 0).all())

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.U @ (self.s[:, None] * (self.U.T @ V))

    def diagonal(self) -> torch.Tensor:
        return (self.U * self.U) @ self.s

    def trace(self) -> torch.Tensor:
        return (self.U * self.U).sum(0) @ self.s


class SumOperator(LinearOperator):
    """``Σ_j w_j A_j`` of operators with the same shape, dtype and device (weights default 1)."""

    def __init__(self, operators: list[LinearOperator], weights: list[float] | None = None) -> None:
        if not operators:
            raise ValueError("SumOperator needs at least one operator")
        first = operators[0]
        for op in operators[1:]:
            if op.shape != first.shape or op.dtype != first.dtype or op.device != first.device:
                raise ValueError(
                    f"cannot add operators of different shape/dtype/device: {first!r} and {op!r}"
                )
        super().__init__(first.shape[0], first.dtype, first.device)
        self.operators = list(operators)
        self.weights = [1.0] * len(operators) if weights is None else [float(w) for w in weights]
        self.psd = all(op.psd for op in operators) and all(w >= 0 for w in self.weights)

    def holding(self, nbytes: int) -> contextlib.AbstractContextManager[Any]:
        stack, seen = contextlib.ExitStack(), set()
        for op in self.operators:  # once per problem: H and Σ_b of one Problem share a budget
            key = id(getattr(op, "problem", op))
            if key not in seen:
                seen.add(key)
                stack.enter_context(op.holding(nbytes))
        return stack

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = None
        for w, op in zip(self.weights, self.operators, strict=True):
            term = op._matmat(V) * w
            out = term if out is None else out + term
        assert out is not None
        return out

    def diagonal(self) -> torch.Tensor:
        return sum(w * op.diagonal() for w, op in zip(self.weights, self.operators, strict=True))  # type: ignore[return-value]

    def trace(self) -> torch.Tensor:
        return sum(w * op.trace() for w, op in zip(self.weights, self.operators, strict=True))  # type: ignore[return-value]


class HouseholderBasis:
    """An orthogonal ``Q = P_1 P_2 ⋯ P_m`` with reflections ``P_j = I − 2 v_j v_jᵀ`` (‖v_j‖ = 1).

    Applying Q or Qᵀ to ``[D, k]`` costs O(m·D·k); column ``j`` of Q is ``Q e_j``. A random
    orthogonal basis without a D×D matrix (used to build test Hessians and covariances with a
    chosen spectrum, e.g. Proposition 1 of Zhu et al., ICML 2019).

    Args:
        dim: D. reflections: m (random unit vectors v_j from ``generator``).
        generator: the random stream. dtype: of the vectors (default float64).
    """

    def __init__(
        self,
        dim: int,
        reflections: int,
        *,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        V = torch.randn(dim, reflections, generator=generator, dtype=dtype)
        self.vectors = V / V.norm(dim=0, keepdim=True)

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """``Q X`` (a new tensor; ``X`` is not modified)."""
        X = X.clone()
        for j in reversed(range(self.vectors.shape[1])):
            v = self.vectors[:, j : j + 1]
            X.addmm_(v, v.T @ X, alpha=-2.0)
        return X

    def apply_t(self, X: torch.Tensor) -> torch.Tensor:
        """``Qᵀ X`` (a new tensor; ``X`` is not modified)."""
        X = X.clone()
        for j in range(self.vectors.shape[1]):
            v = self.vectors[:, j : j + 1]
            X.addmm_(v, v.T @ X, alpha=-2.0)
        return X

    def column(self, j: int) -> torch.Tensor:
        """``Q e_j`` ``[D]``."""
        e = torch.zeros(self.vectors.shape[0], 1, dtype=self.vectors.dtype)
        e[j] = 1.0
        return self.apply(e)[:, 0]


class RotatedDiagonalOperator(LinearOperator):
    """``Q diag(s) Qᵀ`` with a :class:`HouseholderBasis` Q (symmetric; PSD when s ≥ 0)."""

    def __init__(self, basis: HouseholderBasis, diag: torch.Tensor) -> None:
        super().__init__(diag.shape[0], diag.dtype, diag.device)
        self.basis = basis
        self.diag = diag
        self.psd = bool((diag >= 0).all())

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.basis.apply(self.diag[:, None] * self.basis.apply_t(V))


def check_operator(op: object, name: str, who: str) -> None:
    """Raise ``TypeError`` (one line, with the fix) unless ``op`` is a :class:`LinearOperator`."""
    if not isinstance(op, LinearOperator):
        raise TypeError(
            f"{who}: {name} must be a sgdnoise LinearOperator, got {type(op).__name__}; wrap a "
            "matrix as sgdnoise.DenseOperator(M), or build one with sgdnoise.hessian(problem), "
            "sgdnoise.gauss_newton(problem) or sgdnoise.gradient_noise_covariance(problem, b)"
        )
