"""The generalised Gauss–Newton matrix ``G = (1/n) Σ_i J_iᵀ ∇²_f ℓ_i J_i`` as a linear operator.

``f_i = f(x_i; θ)`` is the model output of sample i (``o`` numbers, any shape), ``J_i = ∂f_i/∂θ``
its ``[o, D]`` Jacobian and ``Λ_i = ∇²_f ℓ_i`` the ``[o, o]`` Hessian of the per-sample loss as a
function of that output. The split ``∇²L = G + (1/n) Σ_i Σ_a (∂ℓ_i/∂f_ia) ∇²_θ f_ia`` (Schraudolph
2002, "Fast curvature matrix-vector products for second-order gradient descent"; Martens 2020,
"New insights and perspectives on the natural gradient method", Sec. 8) shows ``G = ∇²L`` wherever
the outputs are piecewise linear in θ, e.g. a ReLU network whose last layer is fixed (Zhu et al.,
ICML 2019, Sec. 5.2: the one-hidden-layer networks of the escape-indicator experiment). ``G`` is
PSD when every ``Λ_i`` is (mean squared error, cross-entropy).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch.func import grad, jacrev, jvp, vjp, vmap

from .._data import batch_size_of
from ..problem import Problem
from ..problem._helpers import _map_tensors, _slice, map_columns, raise_if_out_of_memory
from .operators import LinearOperator

__all__ = ["DENSE_JACOBIAN_MAX_BYTES", "GaussNewtonOperator", "gauss_newton"]

#: The dense fast path materialises ``J`` (``n·o·D`` numbers) and ``Λ`` (``n·o²``) when they take
#: at most this many bytes. A fixed number (not a share of free memory), so that the route, and
#: with it every bit of the products, is the same on every machine.
DENSE_JACOBIAN_MAX_BYTES = 64 * 2**20


def _row(t: torch.Tensor, i: int) -> torch.Tensor:
    return t[i]


def _unsqueeze(x: Any) -> Any:
    """A batch of one from one sample (tensors, tuples/lists and dicts of tensors)."""
    if isinstance(x, torch.Tensor):
        return x[None]
    if isinstance(x, dict):
        return {k: _unsqueeze(v) for k, v in x.items()}
    return type(x)(_unsqueeze(v) for v in x)


def _mean_loss(problem: Problem, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """The problem's mean loss of a batch as a function of the model's outputs."""
    loss = problem.loss_fn(outputs, targets)
    return loss.mean() if problem.reduction == "none" else loss


def _tensor(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            "the Gauss–Newton operator needs a model that returns one tensor of outputs, got "
            f"{type(out).__name__}; wrap the model so that forward returns the tensor loss_fn "
            "takes (e.g. the logits)"
        )
    return out


class GaussNewtonOperator(LinearOperator):
    """``G = (1/n) Σ_i J_iᵀ Λ_i J_i`` at a fixed θ, over all (or the selected) n samples.

    ``J_i`` ``[o, D]`` is the Jacobian of sample i's model output ``f_i`` (``o`` numbers) with
    respect to θ and ``Λ_i = ∇²_f ℓ_i`` ``[o, o]`` the Hessian of its loss in output space (for
    ``reduction="mean"`` the loss of a batch of one, as :class:`~sgdnoise.Problem` defines ℓ_i).
    Products ``G @ V`` (``V`` ``[D, k]``) take one of two routes:

    * **matrix-free** (any size): per data chunk, ``J V`` by forward mode through the model
      output, ``Λ (J V)`` by reverse-over-reverse on the loss in output space, and ``Jᵀ(·)`` by one
      reverse pass, batched over the k columns — about the cost of a Hessian-vector product,
      without second derivatives of the model;
    * **dense** (when ``J`` and ``Λ`` fit in ``dense_max_bytes``): ``J`` ``[n, o, D]`` and ``Λ``
      are materialised once (per-sample reverse passes, vmapped) and kept by the operator; each
      product is then ``Jᵀ(Λ(J V))/n``, two matrix products. Samples whose Jacobian is exactly
      zero (e.g. a clipped output) are dropped from the products; they contribute nothing.

    The two routes agree to floating-point order. θ is snapshotted at construction (make a new
    operator to follow training), like :class:`~sgdnoise.linalg.HessianOperator`.

    On a problem sharded over processes (``process_group``), each rank works on its own samples
    and every product is all-reduced once (both routes; the route is the same on every rank, as
    it depends on N, o and D only); the dense ``J`` and ``Λ`` hold this rank's rows.

    Args:
        problem: model, loss and data; the model must return one tensor of outputs (batch first)
            and treat samples independently (no BatchNorm in training mode, no dropout).
        theta: flat parameters ``[D]`` (default: the model's current θ).
        indices: average over these samples only (``None``: all N; integers or a boolean mask).
        dense: ``True`` forces the dense route, ``False`` the matrix-free one, ``None`` (default)
            picks dense when ``J`` and ``Λ`` take at most ``dense_max_bytes``.
        dense_max_bytes: size limit of the dense route in bytes.

    Attributes:
        problem, theta (``[D]``), indices (``None`` or a long tensor), num_samples (n).
        num_products: columns multiplied so far.

    Raises:
        ValueError: ``theta`` of the wrong shape, dtype or device; bad ``indices``.
        RuntimeError: the model couples samples (training-mode BatchNorm, dropout).
        TypeError: the model does not return a tensor (at the first product).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sgdnoise
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(8, 3, generator=g, dtype=torch.float64)
        >>> y = torch.randn(8, 1, generator=g, dtype=torch.float64)
        >>> problem = sgdnoise.Problem(nn.Linear(3, 1).double(), nn.functional.mse_loss, x, y)
        >>> G = sgdnoise.linalg.gauss_newton(problem)
        >>> bool(torch.allclose(G.to_dense(), sgdnoise.hessian(problem).to_dense()))
        True
    """

    def __init__(
        self,
        problem: Problem,
        theta: torch.Tensor | None = None,
        indices: torch.Tensor | Sequence[int] | None = None,
        *,
        dense: bool | None = None,
        dense_max_bytes: int = DENSE_JACOBIAN_MAX_BYTES,
    ) -> None:
        super().__init__(problem.dim, problem.dtype, problem.device)
        problem.check_decoupled("the Gauss–Newton operator")
        if theta is None:
            theta = problem.theta()
        else:
            problem.check_vector(theta, "theta")
        self.problem = problem
        self.theta = theta.detach().clone()
        self.indices = problem.check_indices(indices)
        self.num_samples = (
            problem.num_samples if self.indices is None else int(self.indices.numel())
        )
        self.num_products = 0
        self._dense = dense
        self._dense_max_bytes = int(dense_max_bytes)
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ model pieces
    def _outputs(self, theta: torch.Tensor, x: Any) -> torch.Tensor:
        return _tensor(self.problem.outputs(theta, x))

    def _sample_output(self, theta: torch.Tensor, xi: Any) -> torch.Tensor:
        return self._outputs(theta, _unsqueeze(xi))[0]

    def _sample_loss(self, f: torch.Tensor, yi: Any) -> torch.Tensor:
        return _mean_loss(self.problem, f[None], _unsqueeze(yi))

    def output_size(self) -> int:
        """``o``: the number of model outputs of one sample (one forward pass on one sample)."""
        shard = self.problem.shard
        if shard is not None:  # this rank's first sample (the selection may hold none of it)
            first = torch.tensor([shard.offset], device=self.problem.device)
        elif self.indices is not None:
            first = self.indices[:1]
        else:
            first = torch.zeros(1, dtype=torch.long, device=self.problem.device)
        x, _ = self.problem.take(first)
        with torch.no_grad():
            return int(self._outputs(self.theta, x)[0].numel())

    def uses_dense(self) -> bool:
        """Whether products take the dense route (see the class docstring)."""
        if self._dense is None:
            o = self.output_size()
            size = torch.finfo(self.dtype).bits // 8
            need = self.num_samples * o * (self.shape[0] + o) * size
            self._dense = need <= self._dense_max_bytes
        return self._dense

    # ------------------------------------------------------------------ dense route
    def _chunk_jacobian(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``J`` ``[c, o, D]`` and ``Λ`` ``[c, o, o]`` of one chunk of samples: vmapped over the
        samples, or sample by sample for layers without a batching rule (LSTM)."""
        try:
            return self._chunk_jacobian_vmap(x, y)
        except (RuntimeError, NotImplementedError) as exc:
            raise_if_out_of_memory(exc)
        Js, lams = [], []
        for i in range(batch_size_of(x)):
            th = self.theta.clone().requires_grad_(True)
            with torch.enable_grad():
                out = self._outputs(th, _slice(x, i))[0]  # one sample's outputs, any shape
                F = out.reshape(-1)
                rows = [
                    torch.autograd.grad(F[a], th, retain_graph=True)[0] for a in range(F.numel())
                ]
            Js.append(torch.stack(rows))
            yi = _map_tensors(partial(_row, i=i), y)
            lam = jacrev(jacrev(self._sample_loss))(out.detach(), yi)
            lams.append(lam.reshape(F.numel(), F.numel()))
        return torch.stack(Js), torch.stack(lams)

    def _chunk_jacobian_vmap(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        th = self.theta
        F = vmap(self._sample_output, in_dims=(None, 0))(th, x)
        c = F.shape[0]
        # A scalar output per sample takes grad (one reverse pass), otherwise the full jacrev.
        jac = grad if F.ndim == 1 else jacrev
        J = vmap(jac(self._sample_output), in_dims=(None, 0))(th, x).reshape(c, -1, self.shape[0])
        o = J.shape[1]
        lam = vmap(jacrev(jacrev(self._sample_loss)))(F.detach(), y).reshape(c, o, o)
        return J, lam

    def jacobian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense pieces ``(J, Λ)``: ``[n, o, D]`` and ``[n, o, o]``, computed once and kept.

        Row i of ``J`` is ``∂f_i/∂θ`` for the i-th selected sample (outputs flattened row-major);
        on a sharded problem, for the i-th selected sample *held by this rank*.

        Returns:
            ``(J, Λ)`` in the operator's dtype and device.
        """
        if self._cache is None:
            self.problem.check_decoupled("the Gauss–Newton operator")
            size = self.problem.per_sample_chunk_size()
            parts = [
                self._chunk_jacobian(x, y) for x, y, _ in self.problem.chunks(self.indices, size)
            ]
            if parts:
                J = torch.cat([p[0] for p in parts])
                lam = torch.cat([p[1] for p in parts])
            else:  # a rank that holds none of the selected samples
                o, D = self.output_size(), self.shape[0]
                J = torch.zeros(0, o, D, dtype=self.dtype, device=self.device)
                lam = torch.zeros(0, o, o, dtype=self.dtype, device=self.device)
            live = (J.flatten(1) != 0).any(dim=1)
            self._cache = (J, lam, J[live].reshape(-1, self.shape[0]), lam[live])
        return self._cache[0], self._cache[1]

    def _dense_matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.jacobian()
        assert self._cache is not None
        J, lam = self._cache[2], self._cache[3]
        m, o = lam.shape[0], lam.shape[1]
        k = V.shape[1]
        U = torch.bmm(lam, (J @ V).reshape(m, o, k)).reshape(m * o, k)
        out = J.T @ U * (1.0 / self.num_samples)
        shard = self.problem.shard
        return out if shard is None else shard.all_reduce(out)

    # ------------------------------------------------------------------ matrix-free route
    def _chunk_product(self, V: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
        """``(1/c) Σ_{i∈chunk} J_iᵀ Λ_i J_i V`` for ``V`` ``[D, k]``: the chunk's mean."""
        th = self.theta

        def out(t: torch.Tensor) -> torch.Tensor:
            return self._outputs(t, x)

        primal = vjp(out, th)
        F, pull = primal[0].detach(), primal[1]

        # Λ (J v) by reverse-over-reverse in output space (Λ is symmetric): forward mode through
        # a loss whose targets carry no tangent trips on immutable zero tangents (mse_loss).
        def loss_grad(f: torch.Tensor) -> torch.Tensor:
            return _mean_loss(self.problem, f, y)

        lam = vjp(grad(loss_grad), F)[1]

        def one(v: torch.Tensor) -> torch.Tensor:
            return pull(lam(jvp(out, (th,), (v,))[1])[0])[0]

        return map_columns(one, V)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.num_products += V.shape[1]
        if self.uses_dense():
            return self._dense_matmat(V)
        problem = self.problem
        cols, rows = problem.plan_columns(V.shape[1])

        def fn(x: Any, y: Any) -> torch.Tensor:
            blocks = [
                self._chunk_product(V[:, j : j + cols], x, y) for j in range(0, V.shape[1], cols)
            ]
            return torch.cat(blocks, dim=1)

        return problem.reduce_mean(fn, self.indices, rows=rows)


def gauss_newton(
    problem: Problem,
    theta: torch.Tensor | None = None,
    indices: torch.Tensor | Sequence[int] | None = None,
    **options: Any,
) -> GaussNewtonOperator:
    """The Gauss–Newton matrix ``G = (1/n) Σ_i J_iᵀ ∇²_f ℓ_i J_i`` of the mean loss.

    Args:
        problem: model, loss and data (the model returns one tensor of outputs).
        theta: flat parameters ``[D]`` (default: the model's current θ).
        indices: restrict the average to these samples (``None``: all N).
        **options: ``dense`` and ``dense_max_bytes`` of :class:`GaussNewtonOperator`.

    Returns:
        A :class:`GaussNewtonOperator` ``[D, D]`` (``G @ V``; ``to_dense()`` for small D).

    Raises:
        ValueError, RuntimeError: as :class:`GaussNewtonOperator`.
    """
    return GaussNewtonOperator(problem, theta, indices, **options)
