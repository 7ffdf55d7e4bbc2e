"""The Krylov basis of :func:`~sgdnoise.linalg.top_eigenpairs`: an orthonormal ``Q`` with its
image ``A Q`` and the projected matrix ``QᵀAQ`` kept up to date (:class:`_Basis`), and the
Rayleigh–Ritz step on it (:class:`_Ritz`)."""

from __future__ import annotations

import torch

from .._utils import randn
from ._orth import inner64, orthonormalize_against
from .operators import LinearOperator


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the solvers keep their vectors and small dense algebra in for an operator dtype:
    float32 for float16/bfloat16 (PyTorch has no 16-bit QR or ``eigh``), the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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
