"""The Hessian ``H = ∇²L(θ)`` as a matrix-free operator."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..problem import Problem
from .operators import LinearOperator

__all__ = ["HessianOperator", "hessian"]


class HessianOperator(LinearOperator):
    """``H = ∇²L(θ) = (1/n) Σ_i ∇²ℓ(x_i; θ)`` at the θ the model had when the operator was made.

    Products use :meth:`Problem.hvp` (forward-over-reverse with the columns vmapped, or double
    backward — the gradient graph built once per data chunk and differentiated against each of
    the k columns of ``V`` ``[D, k]`` — by the route that method chooses for the model).
    θ is snapshotted at construction, so the operator stays one fixed matrix while the model trains
    (make a new one to follow the parameters).

    Attributes:
        problem: the :class:`Problem`.
        theta: the snapshotted θ ``[D]``.
        indices: the samples the loss averages over (``None`` = all N).
        num_products: number of Hessian-vector products computed so far (columns, not calls).
    """

    def __init__(
        self, problem: Problem, indices: torch.Tensor | Sequence[int] | None = None
    ) -> None:
        super().__init__(problem.dim, problem.dtype, problem.device)
        self.problem = problem
        self.theta = problem.theta()
        self.indices = problem.check_indices(indices)
        self.num_products = 0
        self._graph: dict | None = None  # the gradient's graph kept within a session

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Within it, products by double backward keep the gradient's graph between calls when
        the selected samples fit one chunk of the memory budget (the budget the graph was planned
        in; see :meth:`LinearOperator.session`): a block of k products then costs k backwards of
        the kept graph, with no new forward pass. The graph is dropped on exit, and rebuilt when
        θ, a parameter or buffer of the model, the data tensors or the indices change in place
        (their version counters); a change that bypasses them (``.data``, a NumPy view) is not
        seen, so leave the model and data alone while a session is open."""
        if self._graph is not None:  # nested: the outer session keeps the graph
            yield
            return
        self._graph = {}
        try:
            yield
        finally:
            self._graph = None

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.num_products += V.shape[1]
        return self.problem.hvp(V, self.theta, self.indices, _graph=self._graph)


def hessian(
    problem: Problem, indices: torch.Tensor | Sequence[int] | None = None
) -> HessianOperator:
    """The Hessian ``H = ∇²L(θ)`` of the mean loss at the model's current parameters.

    Args:
        problem: model, loss and data.
        indices: restrict the loss to these samples (``None``: all N samples).

    Returns:
        A :class:`HessianOperator` (``H @ v`` for ``v`` ``[D]`` or ``[D, k]``; ``to_dense()`` for
        small D; use :func:`sgdnoise.trace_estimate` or :func:`sgdnoise.top_eigenpairs` for large D).

    Raises:
        IndexError, TypeError, ValueError: invalid ``indices``. Products raise RuntimeError for a
        model with BatchNorm/dropout in training mode or without second derivatives.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sgdnoise
        >>> model = nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> H = sgdnoise.hessian(sgdnoise.Problem(model, nn.functional.mse_loss, x, y))
        >>> H.shape
        (4, 4)
    """
    return HessianOperator(problem, indices)
