"""``sgdnoise.check``: cheap self-consistency checks of a user's model, loss and data.

Every quantity sgdnoise measures rests on a few assumptions about the problem: finite parameters
and loss, a loss that is the *mean* of independent per-sample losses, per-sample gradients that
average to ∇L, Hessian products that are the derivative of ∇L, and a forward pass that is
deterministic. :func:`check` tests each of them on a small random subset of the data and returns a
:class:`CheckReport`; it never raises because a check failed (an exception inside a check is that
check's failure, with its message).

The checks, in the order :func:`check` runs them:

1. **parameters_finite** — every entry of θ is finite (value: how many are not).
   *Fix*: reload a checkpoint from before the divergence, lower the learning rate.
2. **data_finite** — the floating inputs and targets of the subset are finite (a NaN/inf input
   can give a finite loss, tanh(inf) = 1, but NaN gradients). *Fix*: clean the data.
3. **loss_finite** — the loss on the subset is finite; when it is not, the failure names the
   samples whose single-sample losses are not finite. *Fix*: use a stable loss
   (``F.cross_entropy`` on logits), clamp inside logs. When 1, 2 or 3 fails (or the loss
   cannot be evaluated at all, e.g. BatchNorm or dropout in training mode, which
   :class:`Problem` refuses), the remaining checks are skipped.
4. **per_sample_gradients** — ``mean_i g_i = ∇L`` on 16 samples, with ``g_i`` from
   :meth:`Problem.per_sample_gradients` and ∇L from an ordinary backward pass; error relative
   to ``‖mean_i |g_i|‖`` (elementwise absolute values, so cancellation near a minimum does not
   inflate it); plus the first two rows against their gradients computed alone. Tolerance
   ``r``. Catches a per-sample fast path that is wrong for the model (in-place ops, a
   parameter used twice). *Fix*: ``method='vmap'``; report the model.
5. **loss_is_sample_mean** — ``loss_fn`` on a batch of 16 samples equals the mean of its 16
   single-sample losses, relative to ``mean_i |ℓ_i|``, tolerance ``r``. A failure says
   whether the loss is a sum (``reduction='sum'``), or samples are weighted unequally (token
   mean with ``ignore_index``/padding) or coupled (batch statistics). *Fix*:
   ``reduction='mean'``, or ``Problem(..., reduction='none')`` with one loss per sample.
6. **hvp_finite_differences** — ``H v`` (:meth:`Problem.hvp`, random unit ``v`` from
   ``generator``) against central differences ``D(ε) = (∇L(θ+εv) − ∇L(θ−εv))/(2ε)`` of the
   gradient on 16 samples. For a float32/float16/bfloat16 model the differences are taken on
   a float64 copy of it (see ``float64_reference``), in the reference dtype's steps
   ``ε_k = τ(1+‖θ‖)4^{-k}`` (τ = 1e-5 in float64, 3e-3 in float32, 3e-2 in half precision).
   Successive steps are computed until two agree to ``max(30 r_ref, r)`` (at most 6 steps):
   their spread ``s = ‖D(ε_k) − D(ε_{k+1})‖`` bounds the finite-difference error of
   ``D(ε_{k+1})`` (truncation falls 16-fold per step, rounding grows 4-fold), so the check
   passes when ``‖Hv − D(ε_{k+1})‖ ≤ 3 s + 10 r``, relative to ``max(‖Hv‖, ‖D‖)``. At ReLU
   or max-pool kinks the differences disagree between steps (a kink crossed inside ±ε adds a
   jump divided by ε), the spread is large and the check passes as *inconclusive* (said in
   the detail) rather than failing; a wrong second derivative gives differences that agree
   with each other but not with ``Hv``. This catches faults inside PyTorch or custom
   ``autograd.Function`` s (a backward that is right but whose own derivative is wrong)
   without knowing them in advance, because the differences use first derivatives only.
   *Fix*: build that backward from differentiable operations (or give the Function a correct
   jvp).
7. **hvp_symmetry** — ``uᵀHv = vᵀHu`` for two random unit vectors, on the subset; error
   relative to ``max(‖Hu‖, ‖Hv‖)``, tolerance ``10 r``.
8. **determinism** — the loss and the product ``H@[u v]`` computed twice agree to ``10 r``
   (exactly, on a CPU). Dropout or noise in training mode and augmentation inside the model
   break Lanczos and trace estimates. *Fix*: ``model.eval()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._check_results import CheckReport, CheckResult, _exception_text
from ._data import _leaves
from ._finite_differences import (
    _FEW,
    _hvp,
    _random_subset,
    _rel,
    _rtol,
    _single_loss,
    _unit,
    hvp_finite_difference_check,
)
from ._utils import resolve_generator
from .problem import Problem

__all__ = ["CheckReport", "CheckResult", "check", "hvp_finite_difference_check"]


class _Skip(Exception):
    """Raised inside a check to mark it skipped (with the reason)."""


# ---------------------------------------------------------------------------- the checks
class _Checker:
    def __init__(
        self,
        problem: Problem,
        gen: torch.Generator,
        sub: torch.Tensor,
        rtol: float,
        float64_reference: bool,
    ) -> None:
        self.p = problem
        self.float64_reference = float64_reference
        self.gen = gen
        self.sub = sub
        self.few = sub[:_FEW]
        self.rtol = rtol
        self.theta = problem.theta()
        self.loss: torch.Tensor | None = None
        self.HUV: torch.Tensor | None = None
        self.UV: torch.Tensor | None = None

    # 1a
    def parameters_finite(self) -> CheckResult:
        bad = []
        total = 0
        for name, piece in self.p.unflatten(self.theta).items():
            n = int((~torch.isfinite(piece)).sum())
            if n:
                bad.append(f"{name} ({n} of {piece.numel()})")
                total += n
        if bad:
            return CheckResult(
                "parameters_finite",
                False,
                float(total),
                0.0,
                f"{total} of {self.p.dim} parameters are NaN or inf: {', '.join(bad[:5])}"
                + (" ..." if len(bad) > 5 else "")
                + ". Likely cause: a diverged training run (learning rate too large) or a bad "
                "initialisation. Fix: reload a checkpoint from before the divergence or lower the "
                "learning rate.",
            )
        return CheckResult(
            "parameters_finite", True, 0.0, 0.0, f"all {self.p.dim} parameters are finite"
        )

    # 1b
    def data_finite(self) -> CheckResult:
        bad = []
        for what, part in zip(("inputs", "targets"), self.p.take(self.sub), strict=True):
            rows = torch.zeros(len(self.sub), dtype=torch.bool, device=self.sub.device)
            for t in _leaves(part):
                if t.is_floating_point() or t.is_complex():
                    rows |= ~torch.isfinite(t).reshape(len(self.sub), -1).all(1).to(rows.device)
            if bool(rows.any()):
                bad.append(f"{what} of samples {self.sub[rows].tolist()[:10]}")
        if bad:
            return CheckResult(
                "data_finite",
                False,
                float(len(bad)),
                0.0,
                f"NaN or inf in the {' and the '.join(bad)} (among {len(self.sub)} samples "
                "checked). Gradients through them are NaN even where the loss is finite (e.g. "
                "tanh(inf) = 1 but 0·inf = NaN). Fix: clean or impute the data.",
            )
        return CheckResult(
            "data_finite", True, 0.0, 0.0, f"inputs and targets of {len(self.sub)} samples finite"
        )

    # 1c
    def samples_independent(self) -> CheckResult:
        """BatchNorm or dropout in training mode couple the samples or make them random."""
        try:
            self.p.check_decoupled("sgdnoise.check")
        except RuntimeError as exc:
            return CheckResult("samples_independent", False, None, None, str(exc))
        return CheckResult(
            "samples_independent", True, None, None, "no BatchNorm/dropout in training mode"
        )

    def loss_finite(self) -> CheckResult:
        try:
            value = self.p.loss(self.theta, self.sub)  # the problem's own route and checks
        except FloatingPointError:
            value = _single_loss(self.p, self.theta, self.sub)  # the value, for the report
        self.loss = value
        if bool(torch.isfinite(value)):
            return CheckResult(
                "loss_finite",
                True,
                float(value),
                None,
                f"L = {float(value):.6g} on {len(self.sub)} samples",
            )
        where = ""
        try:
            with torch.no_grad():
                per = torch.stack(
                    [
                        _single_loss(self.p, self.theta, self.sub[i : i + 1])
                        for i in range(len(self.sub))
                    ]
                )
            bad = self.sub[~torch.isfinite(per)].tolist()
            if bad:
                where = f" Non-finite single-sample losses at samples {bad[:10]}" + (
                    " ..." if len(bad) > 10 else ""
                )
                where += "."
        except Exception:  # a best-effort pointer to the samples only
            pass
        return CheckResult(
            "loss_finite",
            False,
            float(value),
            None,
            f"the loss on {len(self.sub)} samples is {float(value)}.{where} Likely cause: NaN/inf "
            "inputs or targets, log(0) or division by zero in the loss, or diverged parameters. "
            "Fix: clean the data, clamp inside logs, or use a numerically stable loss "
            "(F.cross_entropy on logits rather than log(softmax)).",
        )

    # 2
    def per_sample_gradients(self) -> CheckResult:
        few = self.few
        G = self.p.per_sample_gradients(few).double()
        g = self.p.gradient(self.theta, few).double()
        scale = float(G.abs().mean(0).norm())
        tiny = torch.finfo(torch.float64).tiny
        err_mean = _rel(G.mean(0), g, max(scale, tiny))
        errs = [err_mean]
        worst_row = None
        for i in range(min(2, len(few))):
            gi = self.p.gradient(self.theta, few[i : i + 1]).double()
            row_scale = max(float(G[i].norm()), float(gi.norm()), 1e-6 * scale, tiny)
            e = _rel(G[i], gi, row_scale)
            errs.append(e)
            if e > self.rtol and worst_row is None:
                worst_row = (int(few[i]), e)
        tol = self.rtol
        value = max(errs)
        if value <= tol:
            return CheckResult(
                "per_sample_gradients",
                True,
                value,
                tol,
                f"mean of {len(few)} per-sample gradients = ∇L on them (relative error "
                f"{err_mean:.1e}); {len(errs) - 1} rows checked alone",
            )
        route = getattr(self.p, "routes", {}).get("per_sample", "")
        parts = [
            f"the mean of the per-sample gradients of {len(few)} samples differs from the gradient "
            f"of the loss on the same samples by {err_mean:.2e} (relative to ‖mean_i |g_i|‖ = "
            f"{scale:.3g}; tolerance {tol:.0e})"
        ]
        if worst_row is not None:
            parts.append(
                f"; the row of sample {worst_row[0]} differs from its gradient computed alone by "
                f"{worst_row[1]:.2e}"
            )
        if route:
            parts.append(f" (per-sample route: {route})")
        parts.append(
            ". Likely cause: a per-sample fast path that does not hold for this model (an in-place "
            "operation on a layer's output, a parameter used twice or outside its layer, an "
            "unusual convolution, a model that reorders the batch), or a loss that is not a "
            "sample mean. Fix: compute per-sample gradients with method='vmap' and report the "
            "model; check 'loss_is_sample_mean' below."
        )
        return CheckResult("per_sample_gradients", False, value, tol, "".join(parts))

    # 3
    def loss_is_sample_mean(self) -> CheckResult:
        few = self.few
        if len(few) < 2:
            raise _Skip("needs at least 2 samples")
        batch = _single_loss(self.p, self.theta, few).double()
        singles = torch.stack(
            [_single_loss(self.p, self.theta, few[i : i + 1]).double() for i in range(len(few))]
        )
        if not bool(torch.isfinite(singles).all()):
            bad = few[~torch.isfinite(singles)].tolist()
            return CheckResult(
                "loss_is_sample_mean",
                False,
                math.nan,
                self.rtol,
                f"the loss of a batch of {len(few)} samples is {float(batch):.6g}, but samples "
                f"{bad[:10]} alone have a non-finite loss. Likely cause: a "
                "token mean in which a sample has no counted token (all targets ignore_index or "
                "padding: 0/0). Fix: pass reduction='none' to Problem with a loss_fn returning one "
                "loss per sample that gives such samples a defined value (e.g. 0), or drop them.",
            )
        mean = singles.mean()
        scale = float(singles.abs().mean())
        tiny = torch.finfo(torch.float64).tiny
        value = _rel(batch, mean, max(scale, tiny))
        tol = self.rtol
        n = len(few)
        if value <= tol:
            return CheckResult(
                "loss_is_sample_mean",
                True,
                value,
                tol,
                f"loss of a batch of {n} = mean of their {n} single-sample losses",
            )
        b, m = float(batch), float(mean)
        what = (
            f"loss_fn on a batch of {n} samples gives {b:.6g}, but the mean of their single-sample "
            f"losses is {m:.6g} (relative difference {value:.2e}, tolerance {tol:.0e})"
        )
        if scale > 0 and abs(b - n * m) <= 10 * tol * n * scale:
            cause = (
                ": the loss is summed over the batch (it equals the sum). sgdnoise needs the mean "
                "loss L = (1/N) Σ_i ℓ_i. Fix: use reduction='mean' (e.g. "
                "nn.CrossEntropyLoss(reduction='mean')) or divide by the batch size."
            )
        else:
            cause = (
                ". Likely cause: samples are weighted unequally (a token mean over padded "
                "sequences or ignore_index weights each sample by its number of tokens) or "
                "coupled by the model (BatchNorm in training mode, a layer using batch "
                "statistics). Fix: pass reduction='none' to Problem with a loss_fn returning one "
                "loss per sample (e.g. the masked token mean of each sequence), or make the model "
                "treat samples independently (model.eval(), GroupNorm/LayerNorm)."
            )
        return CheckResult("loss_is_sample_mean", False, value, tol, what + cause)

    # 4
    def hvp_finite_differences(self) -> CheckResult:
        return hvp_finite_difference_check(
            self.p,
            self.theta,
            self.few,
            self.gen,
            rtol=self.rtol,
            float64_reference=self.float64_reference,
        )

    # 5
    def hvp_symmetry(self) -> CheckResult:
        p = self.p
        u, v = _unit(p, self.gen), _unit(p, self.gen)
        UV = torch.stack([u, v], dim=1)
        HUV = _hvp(p, UV, self.theta, self.sub)
        self.UV, self.HUV = UV, HUV
        Hu, Hv = HUV[:, 0].double(), HUV[:, 1].double()
        a, b = float(u.double() @ Hv), float(v.double() @ Hu)
        scale = max(float(Hu.norm()), float(Hv.norm()), torch.finfo(torch.float64).tiny)
        value = abs(a - b) / scale
        tol = 10 * self.rtol
        if value <= tol:
            return CheckResult(
                "hvp_symmetry", True, value, tol, f"uᵀHv = vᵀHu to {value:.1e} (relative to ‖Hu‖)"
            )
        return CheckResult(
            "hvp_symmetry",
            False,
            value,
            tol,
            f"uᵀHv = {a:.6g} but vᵀHu = {b:.6g} for random unit u, v (difference {value:.2e} "
            f"relative to max(‖Hu‖, ‖Hv‖); tolerance {tol:.0e}): the Hessian products are not "
            "symmetric. Likely cause: a wrong second derivative in the model (custom "
            "autograd.Function), or a forward pass that changes between calls (see "
            "'determinism'). Lanczos and trace estimates assume a symmetric H. Fix: repair the "
            "operation's backward; run hvp_finite_differences to locate it.",
        )

    # 6
    def determinism(self) -> CheckResult:
        p = self.p
        tol = 10 * self.rtol
        problems = []
        values = [0.0]
        if self.loss is not None and bool(torch.isfinite(self.loss)):
            again = p.loss(self.theta, self.sub)
            d = _rel(again, self.loss, max(abs(float(self.loss)), torch.finfo(torch.float64).tiny))
            values.append(d)
            if d > tol:
                problems.append(
                    f"the loss on the same {len(self.sub)} samples at the same θ was "
                    f"{float(self.loss):.6g} then {float(again):.6g} (relative difference {d:.2e})"
                )
        try:
            if self.HUV is None or self.UV is None:
                self.UV = torch.stack([_unit(p, self.gen), _unit(p, self.gen)], dim=1)
                self.HUV = _hvp(p, self.UV, self.theta, self.sub)
            again = _hvp(p, self.UV, self.theta, self.sub)
            d = _rel(again, self.HUV, max(float(self.HUV.double().norm()), 1e-300))
            values.append(d)
            if d > tol:
                problems.append(f"the same product H@[u v] computed twice differs by {d:.2e}")
        except Exception as exc:  # reported with the loss result
            if not problems:
                raise
            problems.append(f"a Hessian product raised {_exception_text(exc)}")
        value = max(values)
        if not problems:
            return CheckResult(
                "determinism",
                True,
                value,
                tol,
                "the same loss and Hessian product computed twice agree",
            )
        return CheckResult(
            "determinism",
            False,
            value,
            tol,
            "; ".join(problems)
            + f" (tolerance {tol:.0e}). The forward pass is random or changes state between "
            "calls (dropout or noise layers in training mode, data augmentation inside the "
            "model, a layer that updates a buffer). Lanczos, trace estimates and finite "
            "differences need the same function every time. Fix: model.eval(), or move the "
            "randomness out of the model.",
        )


def _as_problem(obj: Any) -> Problem:
    if isinstance(obj, Problem):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) == 4:
        return Problem(*obj)
    raise TypeError(
        "check() needs a sgdnoise.Problem or a tuple (model, loss_fn, inputs, targets), got "
        f"{type(obj).__name__}"
    )


def check(
    problem: Problem | Sequence[Any],
    *,
    seed: int | None = 0,
    generator: torch.Generator | int | None = None,
    max_samples: int = 64,
    indices: torch.Tensor | Sequence[int] | None = None,
    float64_reference: bool = True,
) -> CheckReport:
    """Cheap self-consistency checks of a model, loss and data set: a doctor for a user's model.

    Runs the checks below on a random subset of at most ``max_samples`` samples (the per-sample
    and finite-difference checks on its first 16), costing a few loss evaluations, one
    per-sample-gradient pass on 16 samples, 4 to 12 gradient passes on 16 samples and three
    Hessian products with one or two columns: cheap whatever N is. Tolerances are relative and
    scale with the working precision ``r`` of the model's dtype (``r`` = 1e-9 in float64, 2e-4 in
    float32 — 3e-3 on CUDA when TF32 is allowed —, 1e-2 in float16, 5e-2 in bfloat16).

    The eight checks, in order (each with its tolerance and fix in the module docstring):
    ``parameters_finite``, ``data_finite``, ``loss_finite`` (a failure of one of these three
    skips the rest), ``per_sample_gradients``, ``loss_is_sample_mean``,
    ``hvp_finite_differences``, ``hvp_symmetry``, ``determinism``.

    Nothing here modifies the model: every evaluation passes θ explicitly, and random vectors and
    the subset come from ``generator`` only.

    Args:
        problem: a :class:`Problem`, or a tuple ``(model, loss_fn, inputs, targets)`` (then
            building the Problem is itself a check, ``"problem"``, whose error is reported).
        seed, generator: randomness of the subset and the random directions (the generator
            wins; else a fresh generator seeded with ``seed``, default 0).
        max_samples: largest subset of samples used (a random one, sorted).
        indices: check these samples instead of a random subset (at most ``max_samples`` used).
            On a problem sharded over processes, every rank checks its *own* samples (indices
            local to its shard, ``0 … shard.local − 1``), without collectives; call it on every
            rank (or on any one) and read each rank's report.
        float64_reference: for a model in float32 or lower precision, take the finite
            differences of check 6 on a float64 copy of the model (a deep copy: θ, the steps and
            the gradients in float64), so that rounding no longer limits the step and kinks are
            rarely crossed; the model's own H@v is compared with them at its own precision. Falls
            back to the model's dtype when the copy cannot be made or run.

    Returns:
        A :class:`CheckReport`: ``.ok``, ``.failures`` (readable sentences), ``.checks``
        (name, passed, value, tolerance, detail per check) and a readable ``str``.

    Raises:
        TypeError, ValueError, IndexError: only for invalid arguments (``generator``,
            ``max_samples``, ``indices``), never because a check failed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sgdnoise
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
        >>> report = sgdnoise.check(sgdnoise.Problem(model, nn.functional.cross_entropy, x, y))
        >>> report.ok, report.failures
        (True, [])
    """
    gen = resolve_generator(seed, generator)
    if not isinstance(max_samples, int) or isinstance(max_samples, bool) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive int, got {max_samples!r}")
    results: list[CheckResult] = []
    if not isinstance(problem, Problem):
        built = _build(problem, results)
        if built is None:
            return CheckReport(results, "Problem(...) not built", 0)
        problem = built
    described = repr(problem)
    if problem.shard is not None:  # each rank checks its own shard (no collectives: a check
        # that fails on one rank must not leave the others waiting in a reduction)
        described = f"{described}, {problem.shard!r} (this rank's samples)"
        problem = problem.local_shard()
    sub = _subset(problem, indices, max_samples, gen)
    rtol = _rtol(problem.dtype, problem.device)
    _run_checks(_Checker(problem, gen, sub, rtol, float64_reference), results)
    return CheckReport(results, described, len(sub))


def _subset(
    problem: Problem,
    indices: torch.Tensor | Sequence[int] | None,
    max_samples: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """The samples to check: ``indices`` (at most ``max_samples``) or a random sorted subset."""
    if indices is None:
        sub = _random_subset(problem.num_samples, min(max_samples, problem.num_samples), gen)
    else:
        chosen = problem.check_indices(indices)
        assert chosen is not None
        sub = chosen[:max_samples]
    return sub.to(problem.device)


def _build(obj: Sequence[Any], results: list[CheckResult]) -> Problem | None:
    """``Problem(*obj)``, its construction recorded as the check ``"problem"`` (``None``: failed)."""
    try:
        problem = _as_problem(obj)
    except Exception as exc:  # the construction's error is the finding
        results.append(
            CheckResult(
                "problem",
                False,
                None,
                None,
                f"building sgdnoise.Problem(model, loss_fn, inputs, targets) raised "
                f"{_exception_text(exc)}",
            )
        )
        return None
    results.append(CheckResult("problem", True, None, None, "sgdnoise.Problem built"))
    return problem


def _run_checks(checker: _Checker, results: list[CheckResult]) -> None:
    """Run the checks in order, appending their results; a check that raises has failed."""
    names: list[tuple[str, Callable[[], CheckResult]]] = [
        ("parameters_finite", checker.parameters_finite),
        ("data_finite", checker.data_finite),
        ("samples_independent", checker.samples_independent),
        ("loss_finite", checker.loss_finite),
        ("per_sample_gradients", checker.per_sample_gradients),
        ("loss_is_sample_mean", checker.loss_is_sample_mean),
        ("hvp_finite_differences", checker.hvp_finite_differences),
        ("hvp_symmetry", checker.hvp_symmetry),
        ("determinism", checker.determinism),
    ]
    blocked = ""
    for name, run in names:
        if blocked:
            results.append(CheckResult(name, None, None, None, f"skipped: {blocked}"))
            continue
        try:
            result = run()
        except _Skip as why:
            result = CheckResult(name, None, None, None, f"skipped: {why}")
        except Exception as exc:  # a check that raises is a failed check
            result = CheckResult(name, False, None, None, f"raised {_exception_text(exc)}")
        results.append(result)
        first = ("parameters_finite", "data_finite", "samples_independent", "loss_finite")
        if name in first and result.passed is False:
            blocked = f"needs a finite, computable loss ('{name}' failed)"
