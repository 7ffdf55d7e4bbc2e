"""Expected sharpness under isotropic Gaussian weight perturbations."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._utils import check_finite, randn, resolve_generator
from .problem import Problem
from .results import ExpectedSharpness

__all__ = ["expected_sharpness", "expected_sharpness_members"]


def _loss_at(problem: Problem, theta: torch.Tensor) -> Callable[[Any, Any], torch.Tensor]:
    """``(x, y) ↦`` the mean loss of the batch at ``theta`` (for ``problem.reduce_mean``)."""
    return lambda x, y: problem.batch_loss(theta, x, y)


def _check_arguments(sigma: float, num_samples: int, draws_per_batch: int) -> None:
    if not (
        isinstance(sigma, int | float) and sigma > 0 and sigma == sigma and sigma != float("inf")
    ):
        raise ValueError(
            f"sigma must be a positive finite number (the perturbation std), got {sigma!r}"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(
            f"num_samples must be an integer >= 2 (number of draws), got {num_samples!r}"
        )
    if not isinstance(draws_per_batch, int) or draws_per_batch < 1:
        raise ValueError(f"draws_per_batch must be a positive integer, got {draws_per_batch!r}")


def expected_sharpness(
    problem: Problem,
    sigma: float,
    num_samples: int,
    *,
    seed: int | None = 0,
    generator: torch.Generator | int | None = None,
    draws_per_batch: int = 16,
    vectorize: bool | None = None,
) -> ExpectedSharpness:
    """Expected sharpness ``E_ν[L(θ+ν)] − L(θ)`` and ``E_ν|L(θ+ν) − L(θ)|``, ν ~ N(0, σ² I_D).

    Draws are made ``draws_per_batch`` at a time and evaluated either with one vmapped forward
    pass over the data (``vectorize=True``) or one plain forward pass per draw (``False``). The
    model is never modified: its parameters are bit-for-bit unchanged afterwards.

    float16/bfloat16 models are evaluated on a float32 copy at the same (upcast) weights, with
    float32 draws: 16-bit rounding of a loss (relative ~1e-3) and of θ + ν would otherwise bias
    the difference by more than typical sharpness values, without showing in the standard error.

    Args:
        problem: model, loss and data (the training loss L).
        sigma: perturbation standard deviation σ > 0 (the poster uses 0.01).
        num_samples: number of draws (the poster uses 1000), ≥ 2.
        seed, generator: randomness of the draws (the generator wins; else a fresh generator
            seeded with ``seed``, default 0).
        draws_per_batch: draws made (and, vectorized, evaluated) at once; memory ∝ draws × chunk
            of data. The draws do not depend on ``vectorize``.
        vectorize: vmap the forward pass over the draws. ``None`` (default) picks ``False`` for
            models with convolutions — vmap turns a convolution with per-draw weights into a
            grouped convolution, which is slower on CPU than separate passes — and ``True``
            otherwise.

    Returns:
        :class:`~sgdnoise.results.ExpectedSharpness` (Python floats, loss units; standard errors
        of the Monte-Carlo means).

    Raises:
        ValueError: sigma not positive and finite, num_samples < 2, draws_per_batch < 1.
        FloatingPointError: a perturbed loss is NaN/inf (lower sigma).

    Source: Zhu et al. (ICML 2019), Sec. 5 (expected sharpness of Keskar et al., 2017).
    """
    _check_arguments(sigma, num_samples, draws_per_batch)
    if vectorize is None:
        vectorize = not any(isinstance(m, nn.modules.conv._ConvNd) for m in problem.model.modules())
    gen = resolve_generator(seed, generator)
    if problem.dtype in (torch.float16, torch.bfloat16):
        problem = problem.with_dtype(torch.float32)
    theta = problem.theta()
    L0 = problem.loss(theta)
    diffs = []
    for start in range(0, num_samples, draws_per_batch):
        B = min(draws_per_batch, num_samples - start)
        nu = randn((B, problem.dim), generator=gen, dtype=problem.dtype, device=problem.device)
        thetas = theta[None, :] + sigma * nu
        if vectorize:
            losses = problem.batched_loss(thetas)
        else:
            with torch.no_grad():
                losses = torch.stack([problem.reduce_mean(_loss_at(problem, th)) for th in thetas])
        diffs.append(losses - L0)
    return _result(torch.cat(diffs), L0, sigma)


def _result(diffs: torch.Tensor, L0: torch.Tensor, sigma: float) -> ExpectedSharpness:
    """The dataclass from the draws' ``L(θ+ν) − L(θ)`` ``[S]``."""
    d = diffs.double()
    check_finite(d, "a perturbed loss", "Lower sigma: the perturbed model produced NaN/inf.")
    m = d.numel()
    return ExpectedSharpness(
        signed=float(d.mean()),
        absolute=float(d.abs().mean()),
        signed_stderr=float(d.std() / m**0.5),
        absolute_stderr=float(d.abs().std() / m**0.5),
        loss=float(L0),
        sigma=float(sigma),
        num_samples=m,
    )


def expected_sharpness_members(
    losses: Callable[[torch.Tensor], torch.Tensor],
    thetas: torch.Tensor,
    sigma: float,
    num_samples: int,
    generators: Sequence[torch.Generator],
    *,
    draws_per_batch: int = 16,
) -> list[ExpectedSharpness]:
    """:func:`expected_sharpness` at M parameter vectors at once, each with its own draws.

    Member j draws its perturbations from ``generators[j]`` exactly as :func:`expected_sharpness`
    with that generator would (``draws_per_batch`` draws ``[B, D]`` at a time, in the dtype and on
    the device of ``thetas``), so its result equals that call's up to the rounding of ``losses``;
    the losses of all members' draws of one batch are evaluated by one call of ``losses`` on
    ``[M·B, D]`` rows (e.g. :meth:`sgdnoise.engine.BatchedEngine.losses`).

    Args:
        losses: ``[K, D] ↦ [K]`` full-batch training losses at K parameter vectors.
        thetas: ``[M, D]`` the members' parameters (float32 or float64).
        sigma, num_samples, draws_per_batch: as :func:`expected_sharpness`.
        generators: M generators, one per row of ``thetas``.

    Returns:
        One :class:`~sgdnoise.results.ExpectedSharpness` per member, in order.

    Raises:
        ValueError: bad sigma/num_samples/draws_per_batch, ``thetas`` not ``[M, D]``, a generator
            count other than M, or a 16-bit dtype (use :func:`expected_sharpness`, which upcasts).
        FloatingPointError: a perturbed loss is NaN/inf (lower sigma).
    """
    _check_arguments(sigma, num_samples, draws_per_batch)
    if thetas.ndim != 2 or len(generators) != thetas.shape[0]:
        raise ValueError(
            f"thetas must be [M, D] with one generator per row; got shape {list(thetas.shape)} "
            f"and {len(generators)} generators"
        )
    if thetas.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"expected_sharpness_members takes float32/float64 parameters, got {thetas.dtype}; "
            "use expected_sharpness, which evaluates 16-bit models on a float32 copy"
        )
    M, D = thetas.shape
    L0 = losses(thetas)
    diffs = []
    for start in range(0, num_samples, draws_per_batch):
        B = min(draws_per_batch, num_samples - start)
        nu = torch.stack([
            randn((B, D), generator=g, dtype=thetas.dtype, device=thetas.device)
            for g in generators
        ])  # fmt: skip
        perturbed = (thetas[:, None, :] + sigma * nu).reshape(M * B, D)
        diffs.append(losses(perturbed).reshape(M, B) - L0[:, None])
    d = torch.cat(diffs, dim=1)
    return [_result(d[j], L0[j], sigma) for j in range(M)]
