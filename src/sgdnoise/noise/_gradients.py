"""Gradient passes shared by the noise structures and the optimizers.

Both helpers make *one* pass over the data (chunked like the rest of sgdnoise) and return what
several consumers need, so that nothing is computed twice:

* :func:`per_sample_gradients_and_losses` gives ``G`` ``[N, D]`` and the losses ``[N]``; the
  full-batch gradient is ``G.mean(0)`` and the loss ``losses.mean()`` — no second pass;
* :func:`weighted_gradients` gives ``(1/N) Σ_i w_ji ∇ℓ_i`` for m weight vectors ``w_j`` with one
  forward and one (m-column) backward pass, without forming per-sample gradients.
"""

from __future__ import annotations

import torch

from ..problem import Problem

__all__ = ["per_sample_gradients_and_losses", "weighted_gradients"]


def per_sample_gradients_and_losses(
    problem: Problem, theta: torch.Tensor | None = None, *, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients ``G[i] = ∇ℓ(x_i; θ)`` ``[N, D]`` and losses ``ℓ(x_i; θ)`` ``[N]``.

    ``G`` comes from :meth:`Problem.per_sample_gradients` (layer hooks where the model allows it,
    else ``vmap(grad)``), the losses from the same pass. Use ``G.mean(0)`` as the
    full-batch gradient ``∇L(θ)`` and ``losses.mean()`` as ``L(θ)`` instead of a second backward
    pass; pass ``G`` on to :class:`~sgdnoise.GradientNoiseCovariance` (``per_sample=G``) or a noise
    model's ``refresh``.

    Args:
        problem: model, loss and data.
        theta: the flat parameters (default: the model's current θ).
        out: an ``[N, D]`` buffer to fill (see :meth:`Problem.per_sample_gradients_and_losses`).

    Returns:
        ``(G [N, D], losses [N])`` in the problem's dtype and device.

    Raises:
        RuntimeError: BatchNorm/dropout in training mode, or a non-finite result; ValueError:
            a loss that is not the mean of per-sample losses.
    """
    theta = (problem.theta() if theta is None else theta).detach()
    return problem.per_sample_gradients_and_losses(theta=theta, out=out)


def weighted_gradients(
    problem: Problem, weights: torch.Tensor, theta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1/N) Σ_i W[j, i] ∇ℓ(x_i; θ)`` for each row j of ``W`` ``[m, N]``, plus the losses ``[N]``.

    This is the gradient of the re-weighted loss ``(1/N) Σ_i W[j, i] ℓ_i``: one forward pass per
    chunk and one vector-Jacobian product per weight row (vmapped), never the ``[N, D]`` matrix.
    ``W = 1`` gives ``∇L``; rows ``1 + ε`` give ``∇L + (1/N) Σ_i ε_i g_i`` (multiplicative noise).

    Args:
        problem: model, loss and data.
        weights: ``[m, N]`` (or ``[N]``, treated as one row), same dtype/device as the problem.
        theta: the flat parameters (default: the model's current θ).

    Returns:
        ``(grads [m, D], losses [N])`` (``grads`` is ``[D]`` when ``weights`` was ``[N]``).

    Raises:
        ValueError, RuntimeError: as :meth:`Problem.weighted_gradients`.
    """
    return problem.weighted_gradients(weights, theta)
