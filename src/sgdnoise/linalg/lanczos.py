"""Top eigenpairs of a symmetric operator: block Lanczos with full reorthogonalisation and thick
restarts (a Krylov–Schur scheme), matrix-free.

The basis ``Q`` (``[D, j]``, orthonormal) and its image ``A Q`` are kept; the projected matrix
``T = Qᵀ A Q`` is formed explicitly and solved with ``eigh`` in float64. The basis is expanded by
blocks ``A Q_last`` orthogonalised twice against all of ``Q`` (so no spurious copies of converged
eigenvalues appear) and, once it reaches ``basis_size`` columns, restarted with the best Ritz
vectors — the Ritz residuals of a Krylov–Schur basis all lie in the next Krylov direction, so the
restart loses nothing. Products are batched ``block_size`` at a time, which is what makes Hessian
products cheap (one double-backward graph for the whole block).

Convergence: Ritz pair ``(λ, u)`` is accepted when ``‖A u − λ u‖ ≤ tol · ‖A‖_est``, with
``‖A‖_est`` the largest |Ritz value| seen (an absolute value: a negative estimate must not stop
early).

Low precision: for a float16/bfloat16 operator the basis, its image and all small dense algebra
(Gram–Schmidt, QR, ``eigh``) are kept in float32 (``eigh`` in float64); only the operator products
run in the operator's dtype (each block is cast down for the product and the result cast back up).
PyTorch has no 16-bit QR/eigh, and a 16-bit basis would lose orthogonality at the 1e-2 level.
"""

from __future__ import annotations

import warnings

import torch

from .._utils import as_generator, randn
from .operators import LinearOperator

__all__ = ["ConvergenceError", "EigenPairs", "default_tol", "top_eigenpairs", "work_dtype"]

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


def _orthonormalize_against(
    X: torch.Tensor, Q: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Columns spanning ``X`` minus its projection on ``Q``, orthonormal, with random refills.

    Classical Gram–Schmidt twice ("twice is enough") against ``Q``, then a QR of the block. A
    column that vanishes (``X`` already inside span ``Q``: an invariant subspace was found) is
    replaced by a random direction, orthogonalised the same way, so the basis keeps growing.
    """
    D = X.shape[0]
    eps = torch.finfo(X.dtype).eps
    for attempt in range(4):
        ref = X.norm(dim=0).clamp_min(torch.finfo(X.dtype).tiny)
        for _ in range(2):
            if Q.shape[1]:
                X = X - Q @ (Q.T @ X)
        Qx, R = torch.linalg.qr(X)
        keep = R.diagonal().abs() > 1e3 * eps * ref
        if bool(keep.all()):
            # One more pass: QR in float32 can leave a little of span(Q) behind.
            if Q.shape[1]:
                Qx = Qx - Q @ (Q.T @ Qx)
                Qx, _ = torch.linalg.qr(Qx)
            return Qx
        if attempt == 3 or Q.shape[1] + X.shape[1] > D:
            return Qx[:, keep]
        fresh = randn((D, int((~keep).sum())), generator=generator, dtype=X.dtype, device=X.device)
        X = torch.cat([Qx[:, keep], fresh], dim=1)
    return X  # pragma: no cover


def top_eigenpairs(
    op: LinearOperator,
    k: int,
    *,
    tol: float | None = None,
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
        generator: random start (a generator or an int seed); ``None`` uses seed 0, so results are
            reproducible. Never the global RNG.
        v0: warm start ``[D]`` or ``[D, j]`` (e.g. the eigenvectors of a previous refresh); random
            columns fill up the first block.
        block_size: products per batch (default ``min(k, 8)``).
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
    if not isinstance(op, LinearOperator):
        raise TypeError(f"top_eigenpairs needs a sgdnoise LinearOperator, got {type(op).__name__}")
    D = op.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= D:
        raise ValueError(f"k must be an integer in [1, D] = [1, {D}], got {k!r}")
    if on_nonconvergence not in ("raise", "warn", "ignore"):
        raise ValueError(
            f"on_nonconvergence must be 'raise', 'warn' or 'ignore', got {on_nonconvergence!r}"
        )
    op_dtype, device = op.dtype, op.device
    dtype = work_dtype(op_dtype)  # basis and small dense algebra; products in op_dtype
    if tol is None:
        tol = default_tol(op_dtype)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    gen = as_generator(0 if generator is None else generator)
    b = min(k, 8) if block_size is None else int(block_size)
    if not 1 <= b <= D:
        raise ValueError(f"block_size must be in [1, D] = [1, {D}], got {block_size}")
    m = max(2 * k + 2 * b, k + 20) if basis_size is None else int(basis_size)
    m = min(D, m)
    if m < min(D, k + b):
        raise ValueError(f"basis_size must be at least k + block_size = {k + b}, got {basis_size}")
    budget = max(2000, 50 * k) if max_matvecs is None else int(max_matvecs)

    # Initial block: warm-start vectors first, random columns to fill a block.
    if v0 is not None:
        if v0.ndim == 1:
            v0 = v0[:, None]
        if v0.ndim != 2 or v0.shape[0] != D:
            raise ValueError(f"v0 must have shape [{D}] or [{D}, j], got {list(v0.shape)}")
        X = v0.to(device=device, dtype=dtype)[:, : m - b]
        if X.shape[1] < b:
            fill = randn((D, b - X.shape[1]), generator=gen, dtype=dtype, device=device)
            X = torch.cat([X, fill], dim=1)
    else:
        X = randn((D, b), generator=gen, dtype=dtype, device=device)

    Q = torch.zeros(D, 0, dtype=dtype, device=device)
    AQ = torch.zeros(D, 0, dtype=dtype, device=device)
    matvecs = 0
    norm_est = 0.0
    tiny = torch.finfo(dtype).tiny

    def expand(X: torch.Tensor) -> int:
        nonlocal Q, AQ, matvecs
        room = min(m, D) - Q.shape[1]
        Xq = _orthonormalize_against(X[:, :room], Q, gen)
        if Xq.shape[1] == 0:
            return 0
        AX = op @ Xq if op_dtype == dtype else (op @ Xq.to(op_dtype)).to(dtype)
        matvecs += Xq.shape[1]
        Q = torch.cat([Q, Xq], dim=1)
        AQ = torch.cat([AQ, AX], dim=1)
        return Xq.shape[1]

    expand(X)
    while True:
        while Q.shape[1] < min(m, D) and matvecs < budget:
            if expand(AQ[:, -b:]) == 0:
                break
        T = (Q.T @ AQ).double()
        T = (T + T.T) / 2
        theta, Y = torch.linalg.eigh(T)
        theta, Y = theta.flip(0), Y.flip(1)
        norm_est = max(norm_est, float(theta.abs().max()))
        p_keep = min(Q.shape[1], max(k, min(m - b, k + max(b, (m - k) // 2))))
        Yk = Y[:, :p_keep].to(dtype)
        U = Q @ Yk
        AU = AQ @ Yk
        R = AU - U * theta[:p_keep].to(dtype)[None, :]
        res = R.norm(dim=0)
        full_space = Q.shape[1] >= D
        converged = full_space or bool((res[:k] <= tol * max(norm_est, tiny)).all())
        if converged or matvecs >= budget:
            break
        # Thick restart with the best p_keep Ritz vectors; their residuals span the next direction.
        Q, AQ = U, AU

    result = EigenPairs(
        theta[:k].to(dtype),
        U[:, :k],
        residuals=res[:k],
        num_matvecs=matvecs,
        converged=converged,
        tol=float(tol),
    )
    if not converged:
        worst = float(res[:k].max()) / max(norm_est, tiny)
        msg = (
            f"top_eigenpairs: {int((res[:k] > tol * norm_est).sum())} of {k} eigenpairs did not "
            f"converge within {matvecs} products (worst relative residual {worst:.2e} > tol "
            f"{tol:.1e}). Raise max_matvecs or basis_size, loosen tol, or use float64"
            + (
                f" (products in {op_dtype} carry ~1e-2 relative rounding; tol below that is not "
                "reachable)."
                if op_dtype != dtype
                else "."
            )
        )
        if on_nonconvergence == "raise":
            raise ConvergenceError(msg, result)
        if on_nonconvergence == "warn":
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return result
