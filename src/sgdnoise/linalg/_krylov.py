"""The Krylov basis of :func:`~sgdnoise.linalg.top_eigenpairs`: its first block (cold or warm,
:func:`_start_block`), an orthonormal ``Q`` with its
image ``A Q`` and the projected matrix ``QᵀAQ`` kept up to date (:class:`_Basis`), and the
Rayleigh–Ritz step on it (:class:`_Ritz`)."""

from __future__ import annotations

import math

import torch

from .._utils import randn
from ._orth import inner64, orthonormalize_against
from .operators import LinearOperator

#: Relative size of the random part added to a folded warm-start block (see _start_block).
_WARM_RANDOM = 0.03


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the solvers keep their vectors and small dense algebra in for an operator dtype:
    float32 for float16/bfloat16 (PyTorch has no 16-bit QR or ``eigh``), the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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
    if not isinstance(v0, torch.Tensor) or v0.is_complex() or not v0.is_floating_point():
        what = v0.dtype if isinstance(v0, torch.Tensor) else type(v0).__name__
        raise TypeError(
            f"v0 must be a real floating-point torch.Tensor (a warm start, e.g. the eigenvectors "
            f"of a previous call), got {what}; convert with torch.as_tensor(v0, dtype=...)"
        )
    if v0.ndim == 1:
        v0 = v0[:, None]
    if v0.ndim != 2 or v0.shape[0] != D or v0.shape[1] > D:
        raise ValueError(f"v0 must have shape [{D}] or [{D}, j] with j ≤ {D}, got {list(v0.shape)}")
    X = v0.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(X).all()) or bool((X.abs().amax(dim=0) == 0).any()):
        raise ValueError(
            "v0 must be finite with no zero column (a warm start is a direction); drop the "
            "columns that are NaN, Inf or 0, or pass v0=None for a cold start"
        )
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
        # T = QᵀAQ (float64), kept up to date: an appended block adds its rows and columns (one
        # pass over Q against the new images), a restart or reset recomputes it
        self._T = torch.zeros(self.cap, self.cap, dtype=torch.float64, device=self.device)
        self.q = 0
        self.matvecs = 0

    def held_bytes(self, k: int, b: int) -> int:
        """What the solver holds while a product runs, which counts against the budget of that
        product's passes: the basis Q and its image AQ (``[m, D]`` each, preallocated), the Ritz
        vectors of the wanted and candidate pairs (``[D, k + b]``) and the new block with its
        orthonormalisation temporaries (about 4 ``[D, b]`` blocks), at block size ``b``."""
        cols = 2 * self.cap + min(self.cap, k + b) + 4 * b
        return cols * self.D * torch.finfo(self.dtype).bits // 8

    @property
    def T(self) -> torch.Tensor:
        """The projected matrix ``QᵀAQ`` ``[q, q]`` (float64, symmetric)."""
        return self._T[: self.q, : self.q]

    def _project(self, start: int) -> None:
        """Fill rows and columns ``start … q`` of ``T`` (``Q[:, :q]ᵀ AQ[:, start:q]``, accumulated
        in float64; the new diagonal block symmetrised)."""
        q = self.q
        if start >= q:
            return
        C = inner64(self._Qt[:q].T, self._AQt[start:q].T)  # [q, q − start]
        new = C[start:]
        self._T[:q, start:q] = C
        self._T[start:q, :start] = C[:start].T
        self._T[start:q, start:q] = (new + new.T) / 2

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
        self._Qt[self.q : self.q + n] = Xq.T
        # the product takes the rows just written, as columns ([D, n] with unit-stride columns:
        # a column-by-column product reads and writes D consecutive numbers, and its result
        # keeps that layout, so the copy into AQ's rows below is contiguous too)
        Xv = self._Qt[self.q : self.q + n].T
        AX = op @ Xv if op.dtype == self.dtype else (op @ Xv.to(op.dtype)).to(self.dtype)
        if not bool(torch.isfinite(AX).all()):
            raise FloatingPointError(
                f"top_eigenpairs: the operator's product has non-finite entries (NaN or Inf) "
                f"after {self.matvecs} finite products; check the matrix, or the model and loss "
                "at θ (a loss that overflowed, a NaN in the data), for non-finite values"
            )
        self.matvecs += n
        self._AQt[self.q : self.q + n] = AX.T
        self.q += n
        self._project(self.q - n)
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
        self._project(0)

    def reset(self, U: torch.Tensor, AU: torch.Tensor) -> None:
        """The basis becomes ``U`` (orthonormal ``[D, c]``) with its image ``AU`` (copied in)."""
        c = U.shape[1]
        self._Qt[:c] = U.T
        self._AQt[:c] = AU.T
        self.q = c
        self._project(0)

    def random(self, p: int) -> torch.Tensor:
        return randn((self.D, p), generator=self.gen, dtype=self.dtype, device=self.device)


class _Ritz:
    """Rayleigh–Ritz on span Q: values ``theta`` (descending, float64), vectors ``Y`` of the
    small problem, and for the first ``c`` pairs ``U``, ``AU``, residuals ``R`` and norms."""

    def __init__(self, basis: _Basis, k: int, b: int, tol: float, norm_est: float) -> None:
        Q, AQ, dtype = basis.Q, basis.AQ, basis.dtype
        tiny = torch.finfo(dtype).tiny
        self.q = Q.shape[1]
        theta, Y = torch.linalg.eigh(basis.T)  # QᵀAQ, kept up to date by the basis
        self.theta, self.Y = theta.flip(0), Y.flip(1)
        self.norm_est = max(norm_est, float(self.theta.abs().max()))
        self.c = min(self.q, k + b)  # the wanted pairs and the next b (candidates for a block)
        self._Q, self._AQ = Q, AQ
        self._Yc = self.Y[:, : self.c].to(dtype)
        # R = AQ Yc − Q Yc diag(θ) in one [D, c] block (two products into it, no U or AU: those
        # are formed only when asked for, at convergence, a probe or the end)
        self.R = torch.addmm(AQ @ self._Yc, Q, self._Yc * -self.theta[: self.c].to(dtype))
        self.scale = _rescale(self.norm_est, dtype)
        if self.scale == 1.0:
            self.res = self.R.norm(dim=0)
        else:  # squares of the entries would underflow (or overflow): norms of R / 2^j
            self.res = (self.R / self.scale).norm(dim=0) * self.scale
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


def _rescale(norm: float, dtype: torch.dtype) -> float:
    """1.0 where norms of vectors whose entries are ~1e-3·``norm``/√D can be taken as they are;
    else the power of two nearest ``norm``, to divide by first. Squared entries leave float32's
    range below ‖A‖ ≈ 1e-10 (a covariance at a loss of 1e-12: every residual read 0, so any
    Ritz pair passed) or above ~1e15; float64's beyond 1e-140 and 1e140."""
    lo, hi = (1e-140, 1e140) if dtype == torch.float64 else (1e-10, 1e15)
    if norm == 0.0 or lo <= norm <= hi or not math.isfinite(norm):
        return 1.0
    return 2.0 ** round(math.log2(norm))
