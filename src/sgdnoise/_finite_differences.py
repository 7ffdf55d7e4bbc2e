"""The finite-difference check of Hessian-vector products (used by :func:`sgdnoise.check` and,
once per problem, by :meth:`sgdnoise.Problem.hvp`), and the small helpers the checks share."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from ._check_results import CheckResult, _exception_text
from .problem import Problem

__all__ = ["hvp_finite_difference_check"]

#: Samples used by the per-sample checks and the finite-difference check (a subset of the subset).
_FEW = 16
#: Finite-difference steps ε_k = τ·(1 + ‖θ‖)·4^{-k}, k < _FD_LEVELS (more levels only if needed).
_FD_LEVELS = 6
_FD_STEP = {torch.float64: 1e-5, torch.float32: 3e-3}
_FD_STEP_LOW = 3e-2  # float16 / bfloat16


def _rtol(dtype: torch.dtype, device: torch.device) -> float:
    """Working relative precision of sums over a batch in ``dtype`` (the checks' unit tolerance).

    float32 on CUDA may run convolutions and matrix products in TF32 (10-bit mantissa), so the
    tolerance is looser there when TF32 is allowed.
    """
    if dtype == torch.float64:
        return 1e-9
    if dtype == torch.float32:
        if device.type == "cuda" and (
            torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
        ):
            return 3e-3
        return 2e-4
    if dtype == torch.bfloat16:
        return 5e-2
    return 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    diff = float((a.double() - b.double()).norm())
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def _unit(problem: Problem, gen: torch.Generator) -> torch.Tensor:
    """A random unit vector ``[D]`` (drawn in float64 on the generator's device)."""
    v = torch.randn(problem.dim, generator=gen, dtype=torch.float64, device=gen.device)
    v = v / v.norm()
    return v.to(problem.device, problem.dtype)


def _single_loss(problem: Problem, theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` of one batch holding exactly the samples ``idx`` (no chunking)."""
    x, y = problem.take(idx)
    batch_loss = getattr(problem, "batch_loss", None)
    with torch.no_grad():
        if batch_loss is not None:
            return batch_loss(theta, x, y)
        return problem.loss(theta, idx)  # a Problem without batch_loss: its chunked loss


def _hvp(problem: Problem, V: torch.Tensor, theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``H V`` by the problem's own route, without its one-time self-check where it has one
    (the checks here measure and report what that self-check would only refuse)."""
    unchecked = getattr(problem, "hvp_unchecked", None)
    if unchecked is not None:
        return unchecked(V, theta, idx)
    return problem.hvp(V, theta, idx)


def _random_subset(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """``m`` distinct sample indices out of ``n``, sorted (no ``[n]`` permutation for large n)."""
    if n <= 1 << 20:
        return torch.randperm(n, generator=gen, device=gen.device)[:m].sort().values
    picked = torch.randint(0, n, (2 * m,), generator=gen, device=gen.device).unique()
    while picked.numel() < m:  # repeats are rare when m << n
        more = torch.randint(0, n, (2 * m,), generator=gen, device=gen.device)
        picked = torch.cat([picked, more]).unique()
    # a uniformly random m of the distinct draws (unique() sorts: never take its first m)
    keep = torch.randperm(picked.numel(), generator=gen, device=gen.device)[:m]
    return picked[keep].sort().values


def _float64_reference(
    p: Problem, theta: torch.Tensor, few: torch.Tensor, float64_reference: bool
) -> tuple[Problem, str, torch.Tensor]:
    """The problem the finite differences run on and the indices of ``few`` in it: a float64
    copy of the model on those samples alone when the model is in lower precision (its rounding
    no longer limits the step size), else the problem itself."""
    if p.dtype == torch.float64 or not float64_reference:
        return p, "", few
    try:
        kwargs: dict[str, Any] = {"chunk_size": p.chunk_size, "params": list(p.param_names)}
        kwargs["process_group"] = False  # a check on this rank's own samples: no collectives
        if getattr(p, "reduction", "mean") != "mean":
            kwargs["reduction"] = p.reduction
        model = copy.deepcopy(p.model).to(torch.float64)
        ref = Problem(model, p.loss_fn, *p.take(few), **kwargs)
        local = torch.arange(len(few), device=ref.device)
        if ref.dim != p.dim or ref.param_names != p.param_names:
            raise ValueError("the float64 copy has other parameters")
        x1, y1 = ref.take(local[:1])
        with torch.no_grad():
            loss = ref.batch_loss(theta.double(), x1, y1)  # it runs, in the loss's own dtype
        if loss.dtype != torch.float64:
            raise TypeError(f"its loss is {loss.dtype}: the model casts inside its forward")
    except Exception as exc:  # any failure: finite differences in the model's own dtype
        return p, f"; in {str(p.dtype)[6:]} (a float64 copy failed: {_exception_text(exc)})", few
    return ref, "; differences on a float64 copy of the model", local


def hvp_finite_difference_check(
    p: Problem,
    theta: torch.Tensor,
    few: torch.Tensor,
    gen: torch.Generator,
    *,
    rtol: float | None = None,
    float64_reference: bool = True,
    levels: int | None = None,
) -> CheckResult:
    """``H v`` against central differences of ∇L on the samples ``few``, along a random unit v.

    Steps ``ε_k = τ(1 + ‖θ‖)·4^{-k}`` are added until two consecutive differences agree; the
    check passes if ``‖Hv − D‖ ≤ 3·spread + 10·rtol`` (relative). Near ReLU/max-pool kinks the
    differences disagree between steps and the check is inconclusive (passes, with a note); a
    wrong second derivative gives differences that agree with each other but not with ``H v``.
    Below float64 the differences are taken on a float64 copy of the model when it can be made.
    Used by :func:`check` and, once per problem, by :meth:`Problem.hvp`.
    """
    if rtol is None:
        rtol = _rtol(p.dtype, p.device)
    v = _unit(p, gen)
    h = _hvp(p, v[:, None], theta, few)[:, 0].double()
    ref, how, ref_few = _float64_reference(p, theta, few, float64_reference)
    theta, v = theta.to(ref.dtype), v.to(ref.dtype)
    step = _FD_STEP.get(ref.dtype, _FD_STEP_LOW)
    eps0 = step * (1.0 + float(theta.double().norm()))
    tiny = torch.finfo(torch.float64).tiny
    floor = 10 * rtol  # the model's H@v is computed in its own precision
    # differences this consistent are conclusive (their spread no longer matters)
    good = max(30 * _rtol(ref.dtype, ref.device), floor / 10)
    pairs: list[tuple[float, float, float]] = []  # (spread, error, eps) relative to scale
    prev: torch.Tensor | None = None
    for k in range(_FD_LEVELS if levels is None else max(2, levels)):
        eps = eps0 / 4**k
        gp = ref.gradient(theta + eps * v, ref_few).double()
        gm = ref.gradient(theta - eps * v, ref_few).double()
        D = (gp - gm) / (2 * eps)
        if prev is not None:
            scale = max(float(h.norm()), float(D.norm()), tiny)
            pairs.append((_rel(D, prev, scale), _rel(h, D, scale), eps))
            if pairs[-1][0] <= good:
                break
        prev = D
    spread, err, eps = min(pairs, key=lambda t: t[0])
    tol = 3 * spread + floor
    levels = len(pairs) + 1
    if err <= tol:
        note = ""
        if spread > 0.1:
            note = (
                " (inconclusive along this direction: the finite differences disagree between "
                "step sizes, as at ReLU/max-pool kinks; H@v was only checked to "
                f"{tol:.0e})"
            )
        return CheckResult(
            "hvp_finite_differences",
            True,
            err,
            tol,
            f"H@v matches central differences of ∇L to {err:.1e} (step {eps:.1e}, "
            f"{levels} step sizes{how}){note}",
        )
    return _failure(p, err, tol, spread, eps, len(few), how)


def _failure(
    p: Problem, err: float, tol: float, spread: float, eps: float, n: int, how: str
) -> CheckResult:
    """The failed finite-difference check, with the likely cause and the fix."""
    route = getattr(p, "routes", {}).get("hvp", "")
    return CheckResult(
        "hvp_finite_differences",
        False,
        err,
        tol,
        f"H@v differs from central finite differences of the gradient, (∇L(θ+εv) − "
        f"∇L(θ−εv))/(2ε), by {err:.2e} relative (the differences agree between step sizes "
        f"ε = {4 * eps:.1e} and {eps:.1e} to {spread:.1e}; tolerance {tol:.1e}), on "
        f"{n} samples along a random unit v{how}"
        + (f"; Hessian route: {route}" if route else "")
        + ". The gradient is right but its derivative is not: likely cause: an operation "
        "whose second derivative is wrong or missing (a custom autograd.Function whose "
        "backward is not differentiable correctly, or a jvp/vmap rule that disagrees with "
        "its backward; a .detach() or no_grad inside the backward). Fix: make that backward "
        "built from differentiable operations (or give the Function a correct jvp), then run "
        "sgdnoise.check again.",
    )
