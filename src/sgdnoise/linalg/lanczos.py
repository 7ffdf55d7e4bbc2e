"""Top eigenpairs of a symmetric operator: block Lanczos with full reorthogonalisation and thick
restarts (a Krylov–Schur scheme), matrix-free.

The basis ``Q`` (``[D, j]``, orthonormal) and its image ``A Q`` are kept; the projected matrix
``T = Qᵀ A Q`` is formed explicitly and solved with ``eigh`` in float64. The basis is expanded by
blocks ``A Q_last`` orthogonalised twice against all of ``Q`` (so no spurious copies of converged
eigenvalues appear) and, once it reaches ``basis_size`` columns, restarted with the best Ritz
vectors — the Ritz residuals of a Krylov–Schur basis all lie in the next Krylov direction, so the
restart loses nothing. Products are batched ``block_size`` at a time (one forward pass, or vmapped
tangents, for the whole block; a Hessian whose products keep the gradient's graph within the
solver's :meth:`~sgdnoise.linalg.LinearOperator.session` builds it once for all blocks).

Convergence: Ritz pair ``(λ, u)`` is accepted when ``‖A u − λ u‖ ≤ tol · ‖A‖_est`` (and its Ritz
value has stopped moving, see ``_iterate``), with
``‖A‖_est`` the largest |Ritz value| seen (an absolute value: a negative estimate must not stop
early).

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
import warnings

import torch

from .._utils import randn, resolve_generator
from ..results import format_table
from ._orth import inner64, orthonormalize_against
from .operators import LinearOperator, check_operator

__all__ = ["ConvergenceError", "EigenPairs", "default_tol", "top_eigenpairs", "work_dtype"]

#: Relative size of the random part added to a folded warm-start block (see top_eigenpairs).
_WARM_RANDOM = 0.03

#: Default relative Ritz-residual tolerance per operator dtype (see :func:`default_tol`).
DEFAULT_TOL = {
    torch.float64: 1e-6,
    torch.float32: 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the solvers keep their vectors and small dense algebra in for an operator dtype:
    float32 for float16/bfloat16 (PyTorch has no 16-bit QR or ``eigh``), the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    num_matvecs: int
    converged: bool
    tol: float

    def __new__(
        cls,
        eigenvalues: torch.Tensor,
        eigenvectors: torch.Tensor,
        *,
        residuals: torch.Tensor,
        num_matvecs: int,
        converged: bool,
        tol: float,
    ) -> EigenPairs:
        self = super().__new__(cls, (eigenvalues, eigenvectors))
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.residuals = residuals
        self.num_matvecs = num_matvecs
        self.converged = converged
        self.tol = tol
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
    b: int,
) -> str:
    """Why the pairs did not converge, from the residual history: an unreachable tolerance, a
    stagnation (a cluster the basis cannot resolve, or a non-deterministic operator), or a budget
    that ran out while the residuals were still decreasing (with the products still needed)."""
    scale = max(norm_est, torch.finfo(torch.float64).tiny)
    worst = float(res.max()) / scale
    n_bad = int((res > tol * scale).sum())
    head = (
        f"top_eigenpairs: {n_bad} of {k} eigenpairs did not converge within {matvecs} products "
        f"(worst relative residual {worst:.2e} > tol {tol:.1e}). "
    )
    floor = _rounding_floor(op_dtype)
    if tol < floor:
        return head + (
            f"Cause: tol {tol:.1e} is below what {op_dtype} products can resolve (relative rounding "
            f"~{floor:.0e}), so no budget reaches it. Fix: loosen tol to ≥ {floor:.0e} "
            f"(the default for {op_dtype} is {default_tol(op_dtype):.0e}) or run the model in "
            "float64."
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
    rate = math.log(ratio) / window  # log-residual change per product (< 0)
    needed = max(b, math.ceil(math.log(tol / worst) / rate)) if worst > 0 else b
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
        v0: warm start ``[D]`` or ``[D, j]`` (e.g. the eigenvectors of a previous refresh); random
            columns fill up the first block.
        block_size: products per batch (default ``min(k, 8)``: a block finds an eigenvalue
            repeated up to that many times, which single columns cannot; ``block_size=1`` needs
            fewer products on a spectrum without repeats, e.g. a Hessian whose products keep
            the gradient's graph, where a block saves no pass).
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
        ValueError: for k outside ``[1, D]`` or bad options.
        ConvergenceError: if the pairs did not converge (with ``on_nonconvergence="raise"``).
    """
    check_operator(op, "op", "top_eigenpairs")
    D = op.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= D:
        raise ValueError(f"k must be an integer in [1, D] = [1, {D}], got {k!r}")
    tol, b, m, budget = _options(op, k, tol, block_size, basis_size, max_matvecs, on_nonconvergence)
    gen = resolve_generator(seed, generator)
    basis = _Basis(op, m, gen)
    # What the solver holds while a product runs counts against the budget of that product's
    # passes: the basis Q and its image AQ ([D, m] each, preallocated), the Ritz vectors U of the
    # wanted and candidate pairs ([D, k + b]), and the new block with its orthonormalisation
    # temporaries (about 4 [D, b] blocks).
    held = (2 * basis.cap + min(basis.cap, k + b) + 4 * b) * D * torch.finfo(basis.dtype).bits // 8
    with op.holding(held), op.session():
        basis.expand(_start_block(v0, D, b, basis.dtype, op.device, gen))
        theta, U, res, converged, norm_est, history = _iterate(basis, k, b, float(tol), budget)
    result = EigenPairs(
        theta[:k].to(basis.dtype),
        _fix_signs(U[:, :k]),
        residuals=res[:k],
        num_matvecs=basis.matvecs,
        converged=converged,
        tol=float(tol),
    )
    if not converged:
        msg = _nonconvergence_message(
            res[:k], theta, norm_est, tol, k, basis.matvecs, history, op.dtype, m, b
        )
        if on_nonconvergence == "raise":
            raise ConvergenceError(msg, result)
        if on_nonconvergence == "warn":
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return result


def _options(
    op: LinearOperator,
    k: int,
    tol: float | None,
    block_size: int | None,
    basis_size: int | None,
    max_matvecs: int | None,
    on_nonconvergence: str,
) -> tuple[float, int, int, int]:
    """Validated ``(tol, block, basis size, product budget)`` of :func:`top_eigenpairs`."""
    D = op.shape[0]
    if on_nonconvergence not in ("raise", "warn", "ignore"):
        raise ValueError(
            f"on_nonconvergence must be 'raise', 'warn' or 'ignore', got {on_nonconvergence!r}"
        )
    if tol is None:
        tol = default_tol(op.dtype)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    b = min(k, 8) if block_size is None else int(block_size)
    if not 1 <= b <= D:
        raise ValueError(f"block_size must be in [1, D] = [1, {D}], got {block_size}")
    m = max(2 * k + 2 * b, k + 20) if basis_size is None else int(basis_size)
    m = min(D, m)
    if m < min(D, k + b):
        raise ValueError(f"basis_size must be at least k + block_size = {k + b}, got {basis_size}")
    budget = max(2000, 50 * k) if max_matvecs is None else int(max_matvecs)
    return tol, b, m, budget


def _start_block(
    v0: torch.Tensor | None,
    D: int,
    b: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
) -> torch.Tensor:
    """The first block ``[D, b]``: random, or made from the warm start ``v0``.

    A warm start of j > b columns (e.g. the k = 20 eigenvectors of the previous refresh, b = 8)
    is folded into ONE block of b random combinations ``V G`` of the warm vectors (``G`` [j, b]
    Gaussian from ``generator``), plus a 3 % random admixture, and Lanczos runs from it as from a
    cold block. Why: (1) using the j columns themselves as the first block made a basis whose
    residual ``(I − VVᵀ) A V`` has rank j, while the Krylov recurrence expands from only b
    directions, so the residual directions of the other j − b warm vectors were never added (13
    of 20 pairs unconverged after 2,000 products at a moved θ, where a cold start needs ~200);
    (2) a block of j columns also fills the basis with a polynomial of degree 1 in A, whereas a
    b-column start gets degree ⌈products / b⌉; (3) a start block with O(1) weight on every warm
    direction and only O(move) on the rest is what makes Krylov converge faster than from a
    random block (the classical restart vector of implicitly restarted Lanczos). The random
    admixture keeps a direction outside span V (an eigenvalue entering the top k) reachable, as
    from a cold start. With j ≤ b the warm columns are used as they are, random columns fill up.
    """
    if v0 is None:
        return randn((D, b), generator=gen, dtype=dtype, device=device)
    if v0.ndim == 1:
        v0 = v0[:, None]
    if v0.ndim != 2 or v0.shape[0] != D:
        raise ValueError(f"v0 must have shape [{D}] or [{D}, j], got {list(v0.shape)}")
    X = v0.to(device=device, dtype=dtype)
    if X.shape[1] > b:
        tiny = torch.finfo(dtype).tiny
        G = randn((X.shape[1], b), generator=gen, dtype=dtype, device=device)
        X = torch.linalg.qr(X)[0] @ G
        Z = randn((D, b), generator=gen, dtype=dtype, device=device)
        X = X + _WARM_RANDOM * Z * (X.norm(dim=0) / Z.norm(dim=0).clamp_min(tiny))[None, :]
    elif X.shape[1] < b:
        fill = randn((D, b - X.shape[1]), generator=gen, dtype=dtype, device=device)
        X = torch.cat([X, fill], dim=1)
    return X


class _Basis:
    """The orthonormal basis ``Q`` ``[D, q]``, its image ``A Q`` and the products spent.

    ``Q`` and ``AQ`` are views of two ``[m, D]`` buffers (transposed) allocated once: appending a block and
    the thick restart write into them in place, so the solver never holds a second copy of its
    basis (a ResNet-18's ``[D, m]`` block is 45 MB per column in float32).
    """

    def __init__(self, op: LinearOperator, m: int, gen: torch.Generator) -> None:
        self.op, self.m, self.gen = op, m, gen
        self.D = op.shape[0]
        self.cap = min(m, self.D)
        self.dtype = work_dtype(op.dtype)  # basis and small dense algebra; products in op.dtype
        self.device = op.device
        # stored transposed ([m, D], a column of Q is a contiguous row): appending a column
        # writes D consecutive numbers, not D numbers m apart (a cache line each)
        self._Qt = torch.empty(self.cap, self.D, dtype=self.dtype, device=self.device)
        self._AQt = torch.empty(self.cap, self.D, dtype=self.dtype, device=self.device)
        self.q = 0
        self.matvecs = 0

    @property
    def Q(self) -> torch.Tensor:
        return self._Qt[: self.q].T

    @property
    def AQ(self) -> torch.Tensor:
        return self._AQt[: self.q].T

    def expand(self, X: torch.Tensor) -> int:
        """Orthonormalise ``X`` against Q, append it and its image; the columns added."""
        room = self.cap - self.q
        Xq = orthonormalize_against(X[:, :room], self.Q, self.gen)
        n = Xq.shape[1]
        if n == 0:
            return 0
        op = self.op
        AX = op @ Xq if op.dtype == self.dtype else (op @ Xq.to(op.dtype)).to(self.dtype)
        self.matvecs += n
        self._Qt[self.q : self.q + n] = Xq.T
        self._AQt[self.q : self.q + n] = AX.T
        self.q += n
        return n

    def restart(self, Y: torch.Tensor) -> None:
        """``Q ← Q Y``, ``AQ ← AQ Y`` (``Y`` ``[q, p]``, p ≤ q) in place, a block of entries at a
        time (a ``[p, rows]`` temporary, never a second ``[D, p]`` block)."""
        q, p = self.q, Y.shape[1]
        rows = max(1, (1 << 22) // max(1, q))
        Yt = Y.T.contiguous()
        for buf in (self._Qt, self._AQt):  # [m, D]: entries r0 … r0 + rows of every column
            for r0 in range(0, self.D, rows):
                block = buf[:, r0 : r0 + rows]
                block[:p] = Yt @ block[:q]
        self.q = p

    def reset(self, U: torch.Tensor, AU: torch.Tensor) -> None:
        """The basis becomes ``U`` (orthonormal ``[D, c]``) with its image ``AU`` (copied in)."""
        c = U.shape[1]
        self._Qt[:c] = U.T
        self._AQt[:c] = AU.T
        self.q = c

    def random(self, p: int) -> torch.Tensor:
        return randn((self.D, p), generator=self.gen, dtype=self.dtype, device=self.device)


class _Ritz:
    """Rayleigh–Ritz on span Q: values ``theta`` (descending, float64), vectors ``Y`` of the
    small problem, and for the first ``c`` pairs ``U``, ``AU``, residuals ``R`` and norms."""

    def __init__(self, basis: _Basis, k: int, b: int, tol: float, norm_est: float) -> None:
        Q, AQ, dtype = basis.Q, basis.AQ, basis.dtype
        tiny = torch.finfo(dtype).tiny
        self.q = Q.shape[1]
        T = inner64(Q, AQ)  # accumulated in float64 (see inner64)
        T = (T + T.T) / 2
        theta, Y = torch.linalg.eigh(T)
        self.theta, self.Y = theta.flip(0), Y.flip(1)
        self.norm_est = max(norm_est, float(self.theta.abs().max()))
        self.c = min(self.q, k + b)  # the wanted pairs and the next b (candidates for a block)
        self._Q, self._AQ = Q, AQ
        self._Yc = self.Y[:, : self.c].to(dtype)
        # R = AQ Yc − Q Yc diag(θ) in one [D, c] block (two products into it, no U or AU: those
        # are formed only when asked for, at convergence, a probe or the end)
        self.R = torch.addmm(AQ @ self._Yc, Q, self._Yc * -self.theta[: self.c].to(dtype))
        self.res = self.R.norm(dim=0)
        self.thresh = tol * max(self.norm_est, tiny)
        self.ok = self.res <= self.thresh
        self._U: torch.Tensor | None = None

    @property
    def U(self) -> torch.Tensor:
        """The Ritz vectors ``Q Y[:, :c]`` ``[D, c]`` (formed once, on first use)."""
        if self._U is None:
            self._U = self._Q @ self._Yc
        return self._U

    @property
    def AU(self) -> torch.Tensor:
        """Their images ``AQ Y[:, :c]`` (formed on each use: needed once, for a probe)."""
        return self._AQ @ self._Yc


def _iterate(
    basis: _Basis, k: int, b: int, tol: float, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, float, list[tuple[int, float]]]:
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
    most ``_STEADY · tol·‖A‖`` since the previous block), then a probe (below).

    Returns ``(theta, U, res, converged, norm_est, history)``.
    """
    D, m = basis.D, basis.m
    tiny = torch.finfo(basis.dtype).tiny
    norm_est = 0.0
    history: list[tuple[int, float]] = []  # (products, worst relative residual of the k pairs)
    filled, probes = False, 0
    # The first convergence check: once the basis holds 2k + 2b columns (a float32/float64
    # residual below tol then bounds the eigenvalue's error by the residual, and the probe below
    # guards against missed pairs); for 16-bit products, whose rounding (~1e-2) makes an early
    # residual an unreliable signal, once the basis has filled (eigenvalues were off by more than
    # the residual on a bfloat16 matrix when judged earlier).
    sixteen = torch.finfo(basis.op.dtype).bits < 32
    first_check = min(m, D) if sixteen else min(m, D, 2 * k + 2 * b)
    accepted: tuple | None = None  # the converged state before a probe
    prev: torch.Tensor | None = None
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
        converged = full_space or (filled and r.q >= k and bool(r.ok[:k].all()) and steady)
        history.append((basis.matvecs, float(res[: min(k, r.c)].max()) / max(norm_est, tiny)))
        if accepted is not None:
            # After a probe: did the enlarged basis find a Ritz value above the accepted k-th?
            if float(theta[k - 1]) <= accepted[0] + r.thresh:
                theta, U, res, converged = accepted[1], accepted[2], accepted[3], True
                return theta, U, res, converged, norm_est, history
            accepted, filled = None, True  # something was missed: iterate on
            converged = False
        elif converged and not full_space and probes < _MAX_PROBES and D - r.c > 0:
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
            return accepted[1], accepted[2], accepted[3], converged, norm_est, history
        if converged or basis.matvecs >= budget:
            break
        if not _next_block(basis, r, k, b):
            break
    return theta, r.U, res, converged, norm_est, history


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
