"""Products with the Jacobian of the model's outputs, ``J_i = ∂f(x_i; θ)/∂θ``, for curvature
operators built on the outputs (Gauss–Newton: ``G = (1/n) Σ_i J_iᵀ ∇²_f ℓ_i J_i``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.func import jvp, vjp, vmap

from ._base import ProblemBase
from ._helpers import _math_attention, map_columns, raise_if_out_of_memory


def _jvp_of(
    f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v ↦ ∂f(θ)/∂θ · v`` (forward mode)."""
    return lambda v: jvp(f, (theta,), (v,))[1]


def _tensor_outputs(out: object) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            "output Jacobian products need a model that returns one tensor [n, ...], got "
            f"{type(out).__name__}; wrap the model so that forward returns a tensor"
        )
    return out


class OutputJacobian(ProblemBase):
    """``J V`` and ``Jᵀ U`` for :class:`~sgdnoise.problem.Problem` (mixin)."""

    def output_jvp(
        self,
        V: torch.Tensor,
        theta: torch.Tensor | None = None,
        indices: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Output Jacobian times vectors: ``(J V)[i] = ∂f(x_i; θ)/∂θ · V``.

        Forward mode (``torch.func.jvp`` of :meth:`outputs`), chunk by chunk over the samples,
        the columns of V vmapped. The model must return one tensor ``[n, *out_shape]``. In a
        sharded problem (``process_group``) each rank computes its own rows and every rank gets
        all n rows (one collective, an exact copy).

        Args:
            V: directions ``[D]`` or ``[D, k]`` (problem dtype and device).
            theta: evaluation point ``[D]`` (``None``: the model's current parameters).
            indices: samples (``None``: all N).

        Returns:
            ``[n, *out_shape, k]`` (``[n, *out_shape]`` for ``V`` ``[D]``), n the selected samples.

        Raises:
            ValueError: V or theta of another shape, dtype or device. TypeError: the model's output is not a tensor.
            RuntimeError: BatchNorm/dropout in training mode (see :meth:`check_decoupled`).
        """
        self.check_decoupled("output_jvp")
        self.check_directions(V)
        vector = V.ndim == 1
        V2 = V[:, None] if vector else V
        theta = self.point(theta)
        idx = self.check_indices(indices)
        parts = []
        with torch.no_grad(), _math_attention():
            for x, _, _ in self.chunks(idx, self.plan_rows("hvp", min(V2.shape[1], 16))):

                def f(th: torch.Tensor, x: object = x) -> torch.Tensor:
                    return _tensor_outputs(self.outputs(th, x))

                parts.append(map_columns(_jvp_of(f, theta), V2))
            if self._shard is not None:
                if not parts:  # none of the selection here: [0, *out_shape, k] rows
                    shape = _tensor_outputs(self.outputs(theta, self._first_sample())).shape[1:]
                    parts.append(V2.new_zeros(0, *shape, V2.shape[1]))
        out = torch.cat(parts)
        if self._shard is not None:
            sh = self._shard
            out = sh.gather_rows(sh.split(idx)[0], sh.count(idx), [out])[0]
        return out[..., 0] if vector else out

    def output_vjp(
        self,
        U: torch.Tensor,
        theta: torch.Tensor | None = None,
        indices: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Transposed output Jacobian times output-space vectors, summed over samples:
        ``Jᵀ U = Σ_i (∂f(x_i; θ)/∂θ)ᵀ U[i]``.

        Reverse mode (``torch.func.vjp`` of :meth:`outputs`), chunk by chunk over the samples,
        the k columns vmapped. Not divided by n: ``(1/n) Jᵀ U`` is the mean.

        Args:
            U: ``[n, *out_shape, k]`` (one slice per selected sample and column).
            theta: evaluation point ``[D]`` (``None``: the model's current parameters).
            indices: samples (``None``: all N), the rows of U in this order.

        Returns:
            ``[D, k]``.

        Raises:
            ValueError: U's first dimension is not the number of selected samples, or ``theta``
                is not ``[D]`` in the model's dtype and on its device.
            TypeError: the model's output is not a tensor.
        """
        self.check_decoupled("output_vjp")
        theta = self.point(theta)
        idx = self.check_indices(indices)
        n = self.num_samples if idx is None else int(idx.numel())
        if U.ndim < 2 or U.shape[0] != n:
            raise ValueError(
                f"U must have shape [n, *out_shape, k] with n = {n} selected samples, got "
                f"{list(U.shape)}"
            )
        k = U.shape[-1]
        if self._shard is not None:  # this rank's rows of U, positions as self.chunks counts them
            U = U[self._shard.split(idx)[0]]
        total = torch.zeros(self.dim, k, dtype=self.dtype, device=self.device)
        with torch.no_grad(), _math_attention():
            for x, _, pos in self.chunks(idx, self.plan_rows("hvp", min(k, 16))):

                def f(th: torch.Tensor, x: object = x) -> torch.Tensor:
                    return _tensor_outputs(self.outputs(th, x))

                pullback = vjp(f, theta)[1]
                Uc = U[pos].movedim(-1, 0)  # [k, n_c, *out_shape]
                try:
                    total += vmap(lambda u, pb=pullback: pb(u)[0], out_dims=1)(Uc)
                except (RuntimeError, NotImplementedError) as exc:
                    raise_if_out_of_memory(exc)
                    total += torch.stack([pullback(u)[0] for u in Uc], dim=1)
        return total if self._shard is None else self._shard.all_reduce(total)
