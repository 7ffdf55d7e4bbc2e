"""Which tensors an optimizer over a :class:`~sgdnoise.Problem` trains (with helpful errors)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .linalg import covariance as _covariance
from .problem import Problem

__all__ = ["check_lr", "is_int", "materializes", "split_parameters"]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` (``bool`` excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_lr(lr: float) -> float:
    """``lr`` as a float; ``ValueError`` unless it is a finite number > 0 (the step size η)."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0 (the step size η), got {lr!r}")
    return float(lr)


def materializes(problem: Problem) -> bool:
    """Whether the ``[N, D]`` per-sample matrix may be stored: ``N·D ≤ MATERIALIZE_LIMIT``, the
    rule of :func:`~sgdnoise.gradient_noise_covariance` (read at call time, so lowering
    ``sgdnoise.linalg.covariance.MATERIALIZE_LIMIT`` takes effect at once)."""
    return problem.num_samples * problem.dim <= _covariance.MATERIALIZE_LIMIT


def split_parameters(
    cls: str, params: Iterable[torch.Tensor], problem: Problem
) -> tuple[list[torch.Tensor], list[str]]:
    """Check that ``params`` are exactly the problem's trainable parameters (frozen ones skipped).

    Args:
        cls: the optimizer's class name (for messages).
        params: an iterable of tensors, e.g. ``problem.model.parameters()``.
        problem: the problem whose θ the optimizer trains.

    Returns:
        ``(trained, frozen_names)``: the tensors with ``requires_grad`` (in the order given) and
        the names of the frozen ones that were passed.

    Raises:
        TypeError: ``problem`` is not a Problem, or an element is not a tensor.
        ValueError: parameter groups were passed, or the trained set differs from the problem's
            trainable parameters (the message names the missing and extra ones and the fix).
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a sgdnoise.Problem, got {type(problem).__name__}")
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    if any(isinstance(p, dict) for p in params):
        raise ValueError(
            f"{cls} takes one parameter group (θ is one flat vector); pass "
            "problem.model.parameters() itself, not a list of groups"
        )
    names = {id(p): n for n, p in problem.model.named_parameters(remove_duplicate=False)}
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"{cls} expected parameters (tensors) such as problem.model.parameters(), got "
                f"an element of type {type(p).__name__}"
            )
    trained = [p for p in params if p.requires_grad]
    frozen = [names.get(id(p), f"<tensor {list(p.shape)}>") for p in params if not p.requires_grad]
    theirs = problem.trainable_parameters()
    theirs_ids = {id(p) for p in theirs}
    mine_ids = {id(p) for p in trained}
    missing = [n for n, p in zip(problem.param_names, theirs, strict=True) if id(p) not in mine_ids]
    extra, seen = [], set(theirs_ids)
    for p in trained:
        if id(p) not in seen:
            seen.add(id(p))
            extra.append(p)
    if missing or extra:
        raise ValueError(_mismatch(cls, problem, names, missing, extra))
    return trained, frozen


def _mismatch(
    cls: str,
    problem: Problem,
    names: dict[int, str],
    missing: list[str],
    extra: list[torch.Tensor],
) -> str:
    """The message naming the missing and extra parameters and the fix."""
    theirs = problem.trainable_parameters()
    parts = []
    if missing:
        pairs = zip(problem.param_names, theirs, strict=True)
        now_frozen = {n for n, p in pairs if not p.requires_grad}
        parts.append(
            "missing "
            + ", ".join(
                f"{n} (requires_grad=False now but trainable when the Problem was built: "
                "rebuild the Problem)"
                if n in now_frozen
                else n
                for n in missing
            )
        )
    if extra:
        described = []
        for p in extra:
            if id(p) in names:
                described.append(
                    f"{names[id(p)]} (trainable but not in the Problem's θ: frozen when "
                    "the Problem was built, or left out by its params= selection)"
                )
            else:
                described.append(f"a tensor of shape {list(p.shape)} not in problem.model")
        parts.append(f"extra {', '.join(described)}")
    fix = (
        "pass only the parameters named in problem.param_names, or build the optimizer "
        "with make_optimizer(...)"
        if extra
        else "pass problem.model.parameters() (frozen parameters are skipped automatically)"
    )
    return (
        f"{cls} must train exactly the problem's trainable parameters "
        f"({', '.join(problem.param_names)}; D = {problem.dim}) but got {'; '.join(parts)}; " + fix
    )
