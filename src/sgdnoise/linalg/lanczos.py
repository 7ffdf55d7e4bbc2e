"""Top eigenpairs of a symmetric operator: block Lanczos with full reorthogonalisation and thick
restarts (a Krylov–Schur scheme), matrix-free.

The basis ``Q`` (``[D, j]``, orthonormal) and its image ``A Q`` are kept; the projected matrix
``T = Qᵀ A Q`` is kept explicitly (each appended block adds its rows and columns; a restart
recomputes it) and solved with ``eigh`` in float64. The basis is expanded by
blocks ``A Q_last`` orthogonalised twice against all of ``Q`` (so no spurious copies of converged
eigenvalues appear) and, once it reaches ``basis_size`` columns, restarted with the best Ritz
vectors — the Ritz residuals of a Krylov–Schur basis all lie in the next Krylov direction, so the
restart loses nothing. Products are batched ``block_size`` at a time (one forward pass, or vmapped
tangents, for the whole block; a Hessian whose products keep the gradient's graph within the
solver's :meth:`~sgdnoise.linalg.LinearOperator.session` builds it once for all blocks).

Convergence: Ritz pair ``(λ, u)`` is accepted when ``‖A u − λ u‖ ≤ tol · ‖A‖_est`` (and its Ritz
value has stopped moving, see ``_iterate``), with
``‖A‖_est`` the largest |Ritz value| seen (an absolute value: a negative estimate must not stop
early). A converged Ritz value lies within its residual of *an* eigenvalue: where eigenvalues
sit closer together than ``tol·‖A‖`` (a cluster), or an eigenvalue a few ``tol·‖A‖`` above a
large cluster has not yet separated from it, a value can stand for a neighbour's and be off by a
few ``tol·‖A‖``; tighten ``tol`` to resolve such a spectrum. The default block grows up to 8
columns; an eigenvalue found that many times among the top k gets a warning (pass
``block_size=k``).

Precision: every inner product and norm of the basis (Gram–Schmidt, ``QᵀAQ``) sums its blocks
of 1,024 rows in float64 (:func:`~sgdnoise.linalg._orth.inner64`): one float32 inner product
over millions of entries loses enough of its value to let a saturated Krylov basis lose its
orthogonality. For a float16/bfloat16 operator the basis and its image are kept in
float32 (``eigh`` in float64); only the operator products run in the operator's dtype (each block
is cast down for the product and the result cast back up). PyTorch has no 16-bit QR/eigh, and a
16-bit basis would lose orthogonality at the 1e-2 level.

Memory: ``Q`` and ``AQ`` live in two ``[m, D]`` buffers (column j of Q is row j) allocated once (appends and restarts write
in place); what the solver holds while a product runs (those buffers, the Ritz vectors, the new
block) counts against the operator's memory budget (``op.holding``).
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from .._utils import resolve_generator
from ..results import format_table
from ._krylov import _Basis, _Ritz, _start_block, work_dtype
from .operators import LinearOperator, check_operator

__all__ = ["ConvergenceError", "EigenPairs", "default_tol", "top_eigenpairs", "work_dtype"]

#: Default relative Ritz-residual tolerance per operator dtype (see :func:`default_tol`).
DEFAULT_TOL = {
    torch.float64: 1e-6,
    torch.float32: 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


def default_tol(dtype: torch.dtype) -> float:
    """Default relative tolerance of :func:`top_eigenpairs` for an operator of this dtype.

    1e-6 (float64), 1e-3 (float32), 1e-2 (float16: products carry ~1e-3 relative rounding, which
    accumulates through a network) and 3e-2 (bfloat16: ~4e-3 per rounding, ~1e-2 per product), so
    that the default is reachable with products in the operator's own precision.
    """
    return DEFAULT_TOL.get(dtype, 1e-3)


class ConvergenceError(RuntimeError):
    """Raised when the eigensolver stops before the requested pairs meet the tolerance.

    Attributes:
        result: the :class:`EigenPairs` reached so far (with their residuals), for inspection.
    """

    def __init__(self, message: str, result: EigenPairs) -> None:
        super().__init__(message)
        self.result = result


class EigenPairs(tuple):
    """``(eigenvalues [k], eigenvectors [D, k])``, unpackable as a pair, with diagnostics.

    Attributes:
        eigenvalues: the k algebraically largest eigenvalues, descending.
        eigenvectors: orthonormal columns, ``[D, k]``.

    Both are in the solver's working dtype (:func:`work_dtype`): the operator's dtype, except
    **float32 for float16/bfloat16 operators** (cast with ``.to(op.dtype)`` before ``op @ u``).
        residuals: ``‖A u_i − λ_i u_i‖`` for each pair.
        num_matvecs: operator products used (columns).
        converged: whether every pair met the tolerance.
        tol: the relative tolerance used.
        block_size: the block the solver ended with (the default block grows where repeated
            eigenvalues appear; see :func:`top_eigenpairs`).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    num_matvecs: int
    converged: bool
    tol: float
    block_size: int | None

    def __new__(
        cls,
        eigenvalues: torch.Tensor,
        eigenvectors: torch.Tensor,
        *,
        residuals: torch.Tensor,
        num_matvecs: int,
        converged: bool,
        tol: float,
        block_size: int | None = None,
    ) -> EigenPairs:
        self = super().__new__(cls, (eigenvalues, eigenvectors))
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.residuals = residuals
        self.num_matvecs = num_matvecs
        self.converged = converged
        self.tol = tol
        self.block_size = block_size
        return self

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.eigenvalues.tolist()[:5])
        more = ", ..." if self.eigenvalues.numel() > 5 else ""
        return (
            f"EigenPairs(k={self.eigenvalues.numel()}, eigenvalues=[{vals}{more}], "
            f"max_residual={float(self.residuals.max()):.3g}, matvecs={self.num_matvecs}, "
            f"converged={self.converged})"
        )

    def __str__(self) -> str:
        rows: list[tuple[str, object, float | None]] = [
            (f"λ{i + 1}", float(v), None) for i, v in enumerate(self.eigenvalues.tolist()[:10])
        ]
        if self.eigenvalues.numel() > 10:
            rows.append(("...", f"{self.eigenvalues.numel() - 10} more", None))
        rows.append(("max residual", float(self.residuals.max()), None))
        state = "converged" if self.converged else "NOT converged"
        note = (
            f"k={self.eigenvalues.numel()}, {self.num_matvecs} products, tol={self.tol:g}, {state}"
        )
        return format_table("EigenPairs", rows, note)


def _rounding_floor(dtype: torch.dtype) -> float:
    """Relative residual below which products in ``dtype`` cannot be trusted: ~10 ε (rounding
    through a network accumulates to several ε per product), but a third of :func:`default_tol`
    for 16-bit dtypes, whose defaults are chosen to be reachable."""
    return min(10 * torch.finfo(dtype).eps, default_tol(dtype) / 3)


def _unconfirmed_message(tol: float, k: int, matvecs: int, blocks: tuple[int, int]) -> str:
    """Why pairs whose residuals all meet tol were not accepted when the budget ran out."""
    b0, b = blocks
    why = (
        f"the block grew from {b0} to {b} columns after an eigenvalue came out as many times "
        "as the block had columns (a block finds at most that many copies), and the budget "
        "ran out before the new columns had as many steps as the first, which would show "
        "further copies. Fix: raise max_matvecs (e.g. to "
        f"{2 * matvecs}), or pass a block_size above the eigenvalue's multiplicity"
        if b > b0
        else "the Ritz values were still moving (a pair still converging can have a small "
        f"residual). Fix: raise max_matvecs (e.g. to {2 * matvecs})"
    )
    return (
        f"top_eigenpairs: every residual meets tol {tol:.1e}, but the {k} pairs were not "
        f"confirmed within {matvecs} products: {why}."
    )


def _nonconvergence_message(
    res: torch.Tensor,
    theta: torch.Tensor,
    norm_est: float,
    tol: float,
    k: int,
    matvecs: int,
    history: list[tuple[int, float]],
    op_dtype: torch.dtype,
    m: int,
    blocks: tuple[int, int],
) -> str:
    """Why the pairs did not converge, from the residual history: an unreachable tolerance, a
    stagnation (a cluster the basis cannot resolve, or a non-deterministic operator), or a budget
    that ran out while the residuals were still decreasing (with the products still needed)."""
    scale = max(norm_est, torch.finfo(torch.float64).tiny)
    worst = float(res.max()) / scale
    n_bad = int((res > tol * scale).sum())
    b = blocks[1]
    if n_bad == 0:
        return _unconfirmed_message(tol, k, matvecs, blocks)
    head = (
        f"top_eigenpairs: {n_bad} of {k} eigenpairs did not converge within {matvecs} products "
        f"(worst relative residual {worst:.2e} > tol {tol:.1e}). "
    )
    floor = _rounding_floor(op_dtype)
    if tol < floor:
        return head + (
            f"Cause: tol {tol:.1e} is below what {op_dtype} products can resolve (relative rounding "
            f"~{floor:.0e}), so no budget reaches it. Fix: loosen tol to ≥ {floor:.0e} "
            f"(the default for {op_dtype} is {default_tol(op_dtype):.0e})"
            + ("." if op_dtype == torch.float64 else " or run the model in float64.")
        )
    window = max(m, 4 * b)
    past = [w for n, w in history if n <= matvecs - window]
    recent = [w for n, w in history if n > matvecs - window] + [worst]
    if not past:
        return head + (
            f"Cause: the budget was spent before the solver made {window} products of progress "
            f"(basis size {m}). Fix: raise max_matvecs (e.g. to {max(4 * window, 2 * matvecs)})."
        )
    # Best residual reached in the last window against the best before it (the worst residual
    # of k pairs is not monotone: Ritz values reorder as they converge).
    ratio = min(recent) / max(min(past), torch.finfo(torch.float64).tiny)
    if ratio > 0.9:
        if worst < 100 * floor:
            return head + (
                f"Cause: the residuals stopped decreasing at {worst:.1e}, near the rounding level "
                f"of {op_dtype} products (~{floor:.0e}): tol {tol:.1e} is not reachable in this "
                "dtype. Fix: loosen tol or use float64."
            )
        gap = ""
        if theta.numel() > k:
            rel_gap = float(theta[k - 1] - theta[k]) / scale
            gap = (
                f" (λ_{k} ≈ {float(theta[k - 1]):.4g}, λ_{k + 1} ≈ {float(theta[k]):.4g}, "
                f"relative gap {rel_gap:.1e})"
            )
        return head + (
            f"Cause: the residuals stagnated (×{ratio:.2f} over the last {window} products): the "
            f"wanted eigenvalues sit in a cluster{gap} that a basis of {m} columns does not "
            "resolve, or the operator is not deterministic (dropout, data augmentation, shuffling "
            f"inside the loss). Fix: raise basis_size (e.g. to {2 * m}), choose k at a gap in the "
            "spectrum, or make the operator deterministic."
        )
    rate = math.log(max(ratio, 1e-300)) / window  # log-residual change per product (< 0)
    finite = 0 < worst < math.inf and rate < 0
    needed = max(b, math.ceil(math.log(tol / worst) / rate)) if finite else b
    return head + (
        f"Cause: the budget ran out while the residuals were still decreasing (×{ratio:.2f} over "
        f"the last {window} products); at that rate about {needed} more products are needed. "
        f"Fix: raise max_matvecs to about {matvecs + needed}, or loosen tol."
    )


#: Random directions (and one Krylov step from them) probed before convergence is accepted.
_PROBE_SIZE = 2

#: Convergence also needs the k Ritz values to have moved by at most this fraction of the
#: residual threshold since the previous block: a Ritz value still climbing towards an eigenvalue
#: the basis has barely seen can have a small residual (a ResNet's 5th Hessian eigenvalue came
#: out 438 for 639 at tol 1e-2 without this; see _iterate).
_STEADY = 0.1
_MAX_PROBES = 3


def top_eigenpairs(
    op: LinearOperator,
    k: int,
    *,
    tol: float | None = None,
    seed: int | None = 0,
    generator: torch.Generator | int | None = None,
    v0: torch.Tensor | None = None,
    block_size: int | None = None,
    basis_size: int | None = None,
    max_matvecs: int | None = None,
    on_nonconvergence: str = "raise",
) -> EigenPairs:
    """The k algebraically largest eigenpairs of a symmetric operator, matrix-free.

    Args:
        op: a symmetric :class:`~sgdnoise.linalg.LinearOperator` (Hessian, covariance, dense...).
        k: number of pairs, ``1 <= k <= D``.
        tol: relative residual tolerance, ``‖A u − λ u‖ ≤ tol · max|λ|``; default
            (:func:`default_tol`) 1e-6 in float64, 1e-3 in float32, 1e-2 in float16 and 3e-2 in
            bfloat16 (residuals of 16-bit operators are measured on their 16-bit products, whose
            relative rounding is ~1e-2; eigenvalues are then accurate to about that level).
        seed, generator: randomness of the start and of random fills (the generator wins; else
            a fresh generator seeded with ``seed``, default 0). Never the global RNG.
        v0: warm start ``[D]`` or ``[D, j]``, j ≤ D (e.g. the eigenvectors of a previous
            refresh); random columns fill up the first block.
        block_size: products per batch. Default ``min(k, 2)``, doubled (up to ``min(k, 8)``)
            where b converged values are equal: b columns find at most b copies of an
            eigenvalue. A given ``block_size`` stays fixed; ``1`` needs the fewest products
            without repeats but cannot find them.
        basis_size: Krylov basis size before a restart (default ``max(2k + 2·block, k + 20)``,
            capped at D).
        max_matvecs: budget of products (default ``max(2000, 50 k)``).
        on_nonconvergence: ``"raise"`` (:class:`ConvergenceError`, the default), ``"warn"`` or
            ``"ignore"`` when the budget is spent before every pair converged.

    Returns:
        :class:`EigenPairs` — ``(eigenvalues [k] descending, eigenvectors [D, k] orthonormal)``
        plus ``residuals``, ``num_matvecs``, ``converged``; in the operator's dtype, or in float32
        for float16/bfloat16 operators (the basis and the Rayleigh–Ritz step run in float32/float64
        there; only the products are 16-bit).

    Raises:
        ValueError: for k outside ``[1, D]`` or bad options; TypeError: a complex or integer
            operator; FloatingPointError: a product with NaN or Inf entries; ConvergenceError:
            pairs not converged (``on_nonconvergence="raise"``). RuntimeWarning: a given
            ``block_size`` b ≥ 2 found an eigenvalue b times (there may be more copies).
    """
    check_operator(op, "op", "top_eigenpairs")
    D = op.shape[0]
    tol, b, b_max, m, budget = _options(
        op, k, tol, block_size, basis_size, max_matvecs, on_nonconvergence
    )
    gen = resolve_generator(seed, generator)
    basis = _Basis(op, m, gen)
    with op.holding(basis.held_bytes(k, b_max)), op.session():
        basis.expand(_start_block(v0, D, b, basis.dtype, op.device, gen))
        theta, U, res, converged, norm_est, history, grown = _iterate(
            basis, k, (b, b_max), tol, budget
        )
    result = EigenPairs(
        theta[:k].to(basis.dtype),
        _fix_signs(U[:, :k]),
        residuals=res[:k],
        num_matvecs=basis.matvecs,
        converged=converged,
        tol=tol,
        block_size=grown,
    )
    if not converged:
        msg = _nonconvergence_message(
            res[:k], theta, norm_est, tol, k, basis.matvecs, history, op.dtype, m, (b, grown)
        )
        if on_nonconvergence == "raise":
            raise ConvergenceError(msg, result)
        if on_nonconvergence == "warn":
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    elif grown >= 2 and (block_size is not None or grown == b_max):
        _warn_filled_block(theta, k, grown, tol * norm_est, block_size is None)
    return result


def _warn_filled_block(
    theta: torch.Tensor, k: int, b: int, thresh: float, at_cap: bool = False
) -> None:
    """Warn when a block of ``b`` columns (given, or the default grown to its cap) found an
    eigenvalue ``b`` times above the k-th (it may have more copies than the block can see)."""
    run, value = _inner_run(theta, k, thresh)
    if run >= b:
        how = f"the default block grown to its cap of {b}" if at_cap else f"block_size={b}"
        fix = (
            f"pass block_size={k} (more memory: the basis grows with the block)"
            if at_cap
            else "leave block_size at its default, which grows where this happens"
        )
        warnings.warn(
            f"top_eigenpairs: with {how}, the eigenvalue {value:.6g} came out {run} times among "
            f"the top {k}; a block of {b} columns finds at most {b} copies of one eigenvalue, so "
            f"it may have more. Fix: {fix}",
            RuntimeWarning,
            stacklevel=3,
        )


def _options(
    op: LinearOperator,
    k: int,
    tol: float | None,
    block_size: int | None,
    basis_size: int | None,
    max_matvecs: int | None,
    on_nonconvergence: str,
) -> tuple[float, int, int, int, int]:
    """Validated ``(tol, block, largest block, basis size, product budget)`` of
    :func:`top_eigenpairs` (the default block starts at ``min(k, 2)`` and may grow to
    ``min(k, 8)``; a given ``block_size`` is kept)."""
    D = op.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= D:
        raise ValueError(f"k must be an integer in [1, D] = [1, {D}], got {k!r}")
    if op.dtype.is_complex or not op.dtype.is_floating_point:
        raise TypeError(
            f"top_eigenpairs: the operator must be real and floating point (a symmetric matrix), "
            f"got dtype {op.dtype}; for a Hermitian matrix M, use the real symmetric "
            "[[Re M, −Im M], [Im M, Re M]], whose eigenvalues are M's, each twice"
        )
    if on_nonconvergence not in ("raise", "warn", "ignore"):
        raise ValueError(
            f"on_nonconvergence must be 'raise', 'warn' or 'ignore', got {on_nonconvergence!r}"
        )
    if tol is None:
        tol = default_tol(op.dtype)
    if isinstance(tol, torch.Tensor) and tol.numel() == 1 and tol.is_floating_point():
        tol = float(tol)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < float(tol) < 1:
        raise ValueError(
            f"tol must be a relative residual in (0, 1) (e.g. 1e-3), got {tol!r}: a residual "
            "tolerance of max|λ| or more accepts any vector"
        )
    tol = float(tol)
    block_size, basis_size, max_matvecs = (
        _positive_int(name, value)
        for name, value in (
            ("block_size", block_size),
            ("basis_size", basis_size),
            ("max_matvecs", max_matvecs),
        )
    )
    b_max = min(k, 8) if block_size is None else block_size
    if not 1 <= b_max <= D:
        raise ValueError(f"block_size must be in [1, D] = [1, {D}], got {block_size}")
    m = min(D, max(2 * k + 2 * b_max, k + 20) if basis_size is None else basis_size)
    if m < min(D, k + b_max):
        what = "block_size" if block_size is not None else "the default block min(k, 8)"
        raise ValueError(
            f"basis_size must be at least k + {what} = {k + b_max}, got {basis_size} (or pass "
            "a smaller block_size)"
        )
    b = min(b_max, 2) if block_size is None else b_max
    budget = max(2000, 50 * k) if max_matvecs is None else max_matvecs
    return tol, b, b_max, m, budget


def _positive_int(name: str, value: object) -> int | None:
    """``value`` as an int when it is a positive integer (Python or NumPy), ``None`` for None;
    else a one-line ValueError."""
    if value is None:
        return None
    if not isinstance(value, bool) and isinstance(value, numbers.Integral) and int(value) >= 1:
        return int(value)
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _iterate(
    basis: _Basis, k: int, blocks: tuple[int, int], tol: float, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, float, list[tuple[int, float]], int]:
    """Block Krylov–Schur iterations until the top k pairs converge or the budget is spent.

    Expansion by Ritz residuals: after every block, Rayleigh–Ritz on span Q, and the next block
    is the residuals ``A u − θ u`` of the first b *unconverged* wanted Ritz pairs (then of the
    pairs just below the k-th). For a Krylov basis (every start is one block) these residuals
    span exactly the next Krylov block ``(I − QQᵀ) A Q_last``, so this is block Lanczos /
    Krylov–Schur and the thick restart with the best Ritz vectors loses nothing; it also stays a
    sound subspace method if the basis is not Krylov (Rayleigh–Ritz and residuals are always
    explicit). Convergence is first judged once the basis holds 2k + 2b columns (16-bit
    products: once it has filled, as a Krylov–Schur cycle would), then after every block; it
    needs every wanted residual below ``tol·‖A‖`` and the wanted Ritz values steady (moved by at
    most ``_STEADY · tol·‖A‖`` since the previous block), then a block growth check
    (:func:`_grown_block`) and a probe (below).

    ``blocks``: the block size b and the largest it may grow to. Returns ``(theta, U, res,
    converged, norm_est, history, b)``.
    """
    (b, b_max), hold = blocks, 0  # hold: no acceptance before this many products (after growth)
    D, m, tiny, norm_est = basis.D, basis.m, torch.finfo(basis.dtype).tiny, 0.0
    history: list[tuple[int, float]] = []  # (products, worst relative residual of the k pairs)
    filled, probes, prev = False, 0, None
    # The first convergence check: once the basis holds 2k + 2b columns; for 16-bit products,
    # whose rounding (~1e-2) makes an early residual unreliable, once the basis has filled
    # (eigenvalues were off by more than the residual on a bfloat16 matrix when judged earlier).
    sixteen = torch.finfo(basis.op.dtype).bits < 32
    first_check = min(m, D) if sixteen else min(m, D, 2 * k + 2 * b)
    accepted: tuple | None = None  # the converged state before a probe
    while True:
        r = _Ritz(basis, k, b, tol, norm_est)
        norm_est = r.norm_est
        theta, res = r.theta, r.res
        full_space = r.q >= D
        filled = filled or r.q >= first_check
        steady = (
            prev is not None
            and r.q >= k
            and bool((theta[:k] - prev).abs().max() <= _STEADY * r.thresh)
        )
        prev = theta[:k].clone() if r.q >= k else None
        converged = full_space or (
            filled and basis.matvecs >= hold and r.q >= k and bool(r.ok[:k].all()) and steady
        )
        history.append((basis.matvecs, float(res[: min(k, r.c)].max()) / max(norm_est, tiny)))
        judged = converged and not full_space  # to be checked: block growth, then a probe
        if accepted is not None:
            # After a probe: did the enlarged basis find a Ritz value above the accepted k-th?
            if float(theta[k - 1]) <= accepted[0] + r.thresh:
                theta, U, res, converged = accepted[1], accepted[2], accepted[3], True
                return theta, U, res, converged, norm_est, history, b
            accepted, filled = None, True  # something was missed: iterate on
            converged = False
        elif judged and (grown := _grown_block(theta, k, b, b_max, r.thresh)) > b:
            # grow (random columns join the next block), as many block steps again before judging
            b, converged, hold = grown, False, basis.matvecs + -(-basis.matvecs // b) * grown
        elif judged and probes < _MAX_PROBES and D - r.c > 0:
            # Converged residuals cannot tell a top-k eigenpair from any other: a start block
            # inside an invariant subspace (a warm start made of exact eigenvectors) or an
            # eigenvalue of multiplicity above the block size leaves larger eigenvalues unseen
            # with every residual small. Probe: keep the Ritz vectors, add a random block
            # orthogonal to them and one Krylov step from it, and see whether the k-th Ritz
            # value rises.
            probes += 1
            U = r.U
            accepted = (float(theta[k - 1]), theta, U, res)
            basis.reset(U, r.AU)
            added = basis.expand(basis.random(min(_PROBE_SIZE, D - r.c)))
            if added:
                basis.expand(basis.AQ[:, -added:])
                continue
            return accepted[1], accepted[2], accepted[3], converged, norm_est, history, b
        if converged or basis.matvecs >= budget:
            break
        if not _next_block(basis, r, k, b):
            break
    return theta, r.U, res, converged, norm_est, history, b


def _grown_block(theta: torch.Tensor, k: int, b: int, b_max: int, thresh: float) -> int:
    """The block size the converged top-k Ritz values ``theta`` call for: twice the longest
    run of them that agree to ``thresh`` (= tol·‖A‖) between neighbours, where that run is at
    least ``b`` long and ends above the k-th value (doubling: few growths, each of which costs
    as many block steps again); else ``b``; capped at ``b_max``.

    Why: a Krylov space from b start columns holds at most b directions of one eigenspace
    (each Krylov vector is a polynomial in A applied to the b columns), so an eigenvalue of
    multiplicity above b shows b times, however long the solver runs; a run of b equal values
    is the sign. A run that reaches the k-th value needs nothing: further copies would only
    replace values equal to it.
    """
    if b >= b_max:
        return b
    longest = _inner_run(theta, k, thresh)[0]
    return min(b_max, max(longest + 1, 2 * longest)) if longest >= b else b


def _inner_run(theta: torch.Tensor, k: int, thresh: float) -> tuple[int, float]:
    """The longest run of at least two of the top-k values ``theta`` (descending) that agree to
    ``thresh`` between neighbours and end above the k-th value, as ``(length, value)``;
    ``(0, nan)`` if none."""
    longest, value, run = 0, math.nan, 1
    for i in range(1, k):
        run = run + 1 if float(theta[i - 1] - theta[i]) <= thresh else 1
        if i < k - 1 and run > longest and float(theta[i] - theta[i + 1]) > thresh:
            longest, value = run, float(theta[i])
    return (longest, value) if longest >= 2 else (0, math.nan)


def _next_block(basis: _Basis, r: _Ritz, k: int, b: int) -> bool:
    """Add the next block (residuals of unconverged pairs, random fill), restarting a full basis;
    ``False`` when nothing could be added."""
    m, D = basis.m, basis.D
    bad = (~r.ok[: min(k, r.c)]).nonzero().flatten().tolist()
    pick = (bad + list(range(min(k, r.c), r.c)))[:b]
    if r.q >= min(m, D):
        # Thick restart with the best p_keep Ritz vectors (Krylov–Schur); the residuals R are
        # orthogonal to the old basis, hence to the kept one.
        p_keep = min(r.q, max(k, min(m - b, k + max(b, (m - k) // 2))))
        _ = r.U  # formed from the basis before the restart rewrites it (the result if none adds)
        basis.restart(r.Y[:, :p_keep].to(basis.dtype))
    X = r.R[:, pick]  # a copy (list index): the residuals and images can go before the product
    if r.scale != 1.0:
        X /= r.scale  # an operator of tiny or huge norm: the directions, at a safe scale
    r.R = torch.empty(0, dtype=basis.dtype, device=basis.device)
    if X.shape[1] < b:  # fewer unconverged directions than a block: explore at random
        X = torch.cat([X, basis.random(b - X.shape[1])], dim=1)
    return basis.expand(X) != 0


def _fix_signs(Uk: torch.Tensor) -> torch.Tensor:
    """Eigenvectors are defined up to sign; fix it (largest-magnitude entry positive) so that the
    same operator gives the same vectors whatever rounding led there (routes, chunking)."""
    pivot = Uk.abs().argmax(dim=0)
    signs = torch.sign(Uk[pivot, torch.arange(Uk.shape[1], device=Uk.device)])
    return Uk * torch.where(signs == 0, torch.ones_like(signs), signs)[None, :]
